"""Custody: records survive every hop because the sender keeps them until the receiver acks.

Sender side (`Outbox`): each record is committed to SQLite with a per-stream `seq` before it is
published; acknowledged rows are deleted; unacknowledged rows are re-sent after a timeout or when
the receiver comes back. The outbox is bounded in bytes and age; when it must shed, the lowest
priority goes first and every eviction becomes a `drop` record (never evicted itself) that travels
upstream, so loss is counted with its reason instead of being silent.

Receiver side (`Inbox`): `accept()` runs inside the receiver's apply transaction and returns only
the records it has not seen, so a redelivered record is a no-op; `ack()` gives the cumulative
acknowledgement (high-water mark plus ranges) to publish after the commit.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fogline.codec import (
    Ack,
    Batch,
    Record,
    decode_record_body,
    encode_batch,
    encode_record_body,
)
from fogline.config import ServiceConfig, setting
from fogline.db import migrate, transaction

#: Eviction order under pressure: lower goes first. Drop notices are never evicted.
PRIORITY: dict[str, int] = {
    "train": 0,
    "summary": 1,
    "rollup": 1,
    "escalation": 2,
    "event": 3,
    "drop": 9,
}
NEVER_EVICT = 9

_OUTBOX_MIGRATIONS = [
    """
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        priority INTEGER NOT NULL,
        created REAL NOT NULL,
        size INTEGER NOT NULL,
        device TEXT,
        first INTEGER,
        last INTEGER,
        body BLOB NOT NULL,
        sent REAL,
        tries INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_evict ON outbox(priority, seq);
    CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO outbox_meta(key, value) VALUES ('next_seq', 0);
    INSERT INTO outbox_meta(key, value) VALUES ('sent_bytes', 0);
    INSERT INTO outbox_meta(key, value) VALUES ('sent_records', 0);
    INSERT INTO outbox_meta(key, value) VALUES ('records', 0);
    INSERT INTO outbox_meta(key, value) VALUES ('bytes', 0)
    """,
]

#: The receiver's inbox table (SQLite dialect; `cloud_sink.postgres` translates it).
INBOX_MIGRATIONS = [
    """
    CREATE TABLE inbox (
        stream TEXT PRIMARY KEY,
        hwm INTEGER NOT NULL,
        ranges TEXT NOT NULL DEFAULT '[]',
        records INTEGER NOT NULL DEFAULT 0,
        duplicates INTEGER NOT NULL DEFAULT 0
    )
    """,
]


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bounds of an outbox and its sending behaviour."""

    max_bytes: int = 256 * 1024 * 1024
    max_age: float = 7 * 24 * 3600.0
    batch_records: int = 500
    batch_bytes: int = 256 * 1024
    window: int = 5000
    resend_after: float = 5.0


@dataclass
class SenderConfig(ServiceConfig):
    """Settings of a process that sends records upstream through an outbox."""

    outbox_max_mb: float = setting(
        256.0, "Outbox bound in MiB; beyond it records are shed by priority.", minimum=0.001
    )
    outbox_max_age: float = setting(
        7 * 86400.0, "Seconds a record may wait in the outbox before it is shed.", minimum=1.0
    )
    resend_after: float = setting(
        5.0, "Seconds without an ack before a record is sent again.", minimum=0.1
    )

    def outbox_limits(self) -> OutboxLimits:
        """The outbox bounds these settings describe."""
        return OutboxLimits(
            max_bytes=int(self.outbox_max_mb * 1024 * 1024),
            max_age=self.outbox_max_age,
            resend_after=self.resend_after,
        )


def coverage(body: dict[str, Any]) -> tuple[str | None, int | None, int | None]:
    """The `(device, first, last)` reading range a record body covers, when it has one."""
    device, first, last = body.get("device"), body.get("first"), body.get("last")
    if isinstance(device, str) and isinstance(first, int) and isinstance(last, int):
        return device, first, last
    return None, None, None


class Outbox:
    """The sender's durable queue for one stream (one SQLite table; caller owns the connection)."""

    def __init__(
        self, conn: sqlite3.Connection, *, stream: str, limits: OutboxLimits | None = None
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.limits = limits or OutboxLimits()
        migrate(conn, "outbox", _OUTBOX_MIGRATIONS)
        self.dropped: Counter[str] = Counter()
        self.resent = 0
        self._message_seq = 0

    def _meta(self, key: str) -> int:
        (value,) = self.conn.execute(
            "SELECT value FROM outbox_meta WHERE key = ?", (key,)
        ).fetchone()
        return int(value)

    def _count(self, records: int, nbytes: int) -> None:
        """Keep the held totals in the same transaction as the rows they count."""
        self.conn.executemany(
            "UPDATE outbox_meta SET value = value + ? WHERE key = ?",
            [(records, "records"), (nbytes, "bytes")],
        )

    @property
    def records(self) -> int:
        """Records held (not yet acknowledged)."""
        return self._meta("records")

    @property
    def held_bytes(self) -> int:
        """Bytes of record bodies held."""
        return self._meta("bytes")

    def _next_seq(self, n: int) -> int:
        (first,) = self.conn.execute(
            "SELECT value FROM outbox_meta WHERE key='next_seq'"
        ).fetchone()
        self.conn.execute("UPDATE outbox_meta SET value = ? WHERE key='next_seq'", (first + n,))
        return int(first)

    def put(self, records: Iterable[tuple[str, dict[str, Any]]], now: float) -> int:
        """Append records `(kind, body)` (joins the caller's transaction); returns the count."""
        rows = []
        for kind, body in records:
            blob = encode_record_body(body)
            device, first, last = coverage(body)
            rows.append((kind, PRIORITY.get(kind, 1), now, len(blob), device, first, last, blob))
        if not rows:
            return 0
        with transaction(self.conn):
            seq0 = self._next_seq(len(rows))
            self.conn.executemany(
                "INSERT INTO outbox(seq, kind, priority, created, size, device, first, last, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(seq0 + i, *r) for i, r in enumerate(rows)],
            )
            self._count(len(rows), sum(r[3] for r in rows))
        return len(rows)

    def low(self) -> int:
        """The lowest seq still held: every lower seq was acked or evicted."""
        row = self.conn.execute("SELECT min(seq) FROM outbox").fetchone()
        if row[0] is not None:
            return int(row[0])
        return self._meta("next_seq")

    def take_due(self, now: float) -> tuple[Batch, bytes] | None:
        """Mark the next due records (never sent, or unacked for `resend_after`) and return them
        with the encoded message to publish; None when nothing is due or the window is full.

        Order: priority first (drop notices and events before summaries), then seq."""
        lim = self.limits
        stale = now - lim.resend_after
        (inflight,) = self.conn.execute(
            "SELECT count(*) FROM outbox WHERE sent IS NOT NULL AND sent > ?", (stale,)
        ).fetchone()
        room = min(lim.batch_records, lim.window - inflight)
        if room <= 0:
            return None
        rows = self.conn.execute(
            "SELECT seq, kind, body, tries FROM outbox WHERE sent IS NULL OR sent <= ?"
            " ORDER BY priority DESC, seq LIMIT ?",
            (stale, room),
        ).fetchall()
        if not rows:
            return None
        picked: list[tuple[int, str, bytes, int]] = []
        size = 0
        for seq, kind, body, tries in rows:
            if picked and size + len(body) > lim.batch_bytes:
                break
            picked.append((seq, kind, body, tries))
            size += len(body)
        records = tuple(Record(seq=s, kind=k, body=decode_record_body(b)) for s, k, b, _ in picked)
        batch = Batch(low=self.low(), records=records)
        self._message_seq += 1
        payload = encode_batch(self.stream, batch, seq=self._message_seq, ts=now)
        with transaction(self.conn):
            self.conn.executemany(
                "UPDATE outbox SET sent = ?, tries = tries + 1 WHERE seq = ?",
                [(now, p[0]) for p in picked],
            )
            self.conn.executemany(
                "UPDATE outbox_meta SET value = value + ? WHERE key = ?",
                [(len(payload), "sent_bytes"), (len(picked), "sent_records")],
            )
        self.resent += sum(1 for p in picked if p[3] > 0)
        return batch, payload

    def on_ack(self, ack: Ack) -> int:
        """Delete what the ack covers; returns how many rows it removed."""
        if ack.stream != self.stream:
            return 0
        with transaction(self.conn):
            cur = self.conn.execute("DELETE FROM outbox WHERE seq <= ? RETURNING size", (ack.hwm,))
            sizes = [r[0] for r in cur.fetchall()]
            for lo, hi in ack.ranges:
                cur = self.conn.execute(
                    "DELETE FROM outbox WHERE seq BETWEEN ? AND ? RETURNING size", (lo, hi)
                )
                sizes.extend(r[0] for r in cur.fetchall())
            self._count(-len(sizes), -sum(sizes))
        return len(sizes)

    def resend_all(self) -> None:
        """Make every unacknowledged record due now (after a reconnect or a receiver restart)."""
        with transaction(self.conn):
            self.conn.execute("UPDATE outbox SET sent = NULL WHERE sent IS NOT NULL")

    def enforce_bounds(self, now: float) -> Counter[str]:
        """Evict by priority when over the byte bound or age; return evicted counts by reason.

        Each eviction pass appends one `drop` record naming the reason, the kinds and the
        reading ranges lost, so the loss is reported upstream.
        """
        evicted: Counter[str] = Counter()
        cutoff = now - self.limits.max_age
        with transaction(self.conn):
            old = self.conn.execute(
                "DELETE FROM outbox WHERE created < ? AND priority < ?"
                " RETURNING kind, size, device, first, last",
                (cutoff, NEVER_EVICT),
            ).fetchall()
            if old:
                self._note_drop("expired", old, now)
                evicted["expired"] += len(old)
            excess = self.held_bytes - self.limits.max_bytes
            victims: list[tuple[Any, ...]] = []
            while excess > 0:
                # Unsent rows go first: a row already sent may still be applied downstream.
                row = self.conn.execute(
                    "DELETE FROM outbox WHERE seq = (SELECT seq FROM outbox WHERE priority < ?"
                    " ORDER BY priority, tries > 0, seq LIMIT 1)"
                    " RETURNING kind, size, device, first, last",
                    (NEVER_EVICT,),
                ).fetchone()
                if row is None:
                    break
                victims.append(row)
                excess -= row[1]
            if victims:
                self._note_drop("outbox_full", victims, now)
                evicted["outbox_full"] += len(victims)
        return evicted

    def _note_drop(self, reason: str, rows: list[tuple[Any, ...]], now: float) -> None:
        self._count(-len(rows), -sum(r[1] for r in rows))
        kinds = Counter(r[0] for r in rows)
        ranges = merge_ranges((r[2], r[3], r[4]) for r in rows if r[2] is not None)
        body = {
            "reason": reason,
            "origin": self.stream,
            "records": len(rows),
            "kinds": dict(kinds),
            "ranges": ranges,
            "ts": now,
        }
        self.dropped[reason] += len(rows)
        self.put([("drop", body)], now)

    def sent_bytes(self) -> int:
        """Bytes of messages published so far, re-sends included (persisted)."""
        return self._meta("sent_bytes")

    def oldest_age(self, now: float) -> float:
        """Age in seconds of the oldest held record (0 when empty)."""
        (created,) = self.conn.execute("SELECT min(created) FROM outbox").fetchone()
        return 0.0 if created is None else max(0.0, now - created)


def merge_ranges(ranges: Iterable[tuple[str, int, int]]) -> list[list[Any]]:
    """Merge `(device, first, last)` ranges that touch or overlap, sorted by device and first."""
    out: list[list[Any]] = []
    for device, first, last in sorted(ranges):
        if out and out[-1][0] == device and first <= out[-1][2] + 1:
            out[-1][2] = max(out[-1][2], last)
        else:
            out.append([device, first, last])
    return out


def _normalise(hwm: int, ranges: list[list[int]]) -> tuple[int, list[list[int]]]:
    ranges.sort()
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if hi <= hwm:
            continue
        lo = max(lo, hwm + 1)
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    while merged and merged[0][0] <= hwm + 1:
        hwm = max(hwm, merged.pop(0)[1])
    return hwm, merged


@dataclass(frozen=True, slots=True)
class Admission:
    """What `admit()` decided for one batch: its new records and the stream's state after it."""

    fresh: list[Record]
    hwm: int
    ranges: list[list[int]]
    duplicates: int


def admit(hwm: int, ranges: list[list[int]], batch: Batch) -> Admission:
    """The records of `batch` not in the seen state `(hwm, ranges)`, and the state with them.

    Pure: the inbox of each store reads the state, calls this and writes the result back in the
    transaction that applies the fresh records. The seen set only grows, so batches may be
    admitted in any order and every state written is a valid cumulative ack.
    """

    def seen(seq: int) -> bool:
        return seq <= hwm or any(lo <= seq <= hi for lo, hi in ranges)

    fresh: list[Record] = []
    taken: set[int] = set()
    for rec in batch.records:
        if seen(rec.seq) or rec.seq in taken:
            continue
        taken.add(rec.seq)
        fresh.append(rec)
    # Everything below the sender's low-water mark was acked or evicted: it is never re-sent.
    new_hwm, new_ranges = _normalise(
        max(hwm, batch.low - 1), ranges + [[s, s] for s in sorted(taken)]
    )
    return Admission(fresh, new_hwm, new_ranges, len(batch.records) - len(fresh))


class Inbox:
    """The receiver's record of what each sender stream has delivered (for dedupe and acks)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        migrate(conn, "inbox", INBOX_MIGRATIONS)

    def _state(self, stream: str) -> tuple[int, list[list[int]]]:
        row = self.conn.execute(
            "SELECT hwm, ranges FROM inbox WHERE stream = ?", (stream,)
        ).fetchone()
        return (-1, []) if row is None else (int(row[0]), json.loads(row[1]))

    def accept(self, stream: str, batch: Batch) -> list[Record]:
        """Return the records of `batch` not seen before and remember them.

        Must run inside the transaction that applies the returned records, so that a crash
        either keeps both or neither.
        """
        a = admit(*self._state(stream), batch)
        self.conn.execute(
            "INSERT INTO inbox(stream, hwm, ranges, records, duplicates) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(stream) DO UPDATE SET hwm = excluded.hwm, ranges = excluded.ranges,"
            " records = records + excluded.records, duplicates = duplicates + excluded.duplicates",
            (stream, a.hwm, json.dumps(a.ranges), len(a.fresh), a.duplicates),
        )
        return a.fresh

    def ack(self, stream: str) -> Ack:
        """The cumulative acknowledgement of `stream` as committed."""
        hwm, ranges = self._state(stream)
        return Ack(stream=stream, hwm=hwm, ranges=tuple((lo, hi) for lo, hi in ranges))


def now() -> float:
    """Wall-clock seconds (one place to read the clock for custody timestamps)."""
    return time.time()


class Uplink:
    """Moves an outbox upstream: publishes due batches, applies acks, resends after restarts.

    Transport-free: `publish(topic, payload)` is given by the owning service.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        topic_up: str,
        publish: Callable[[str, bytes], None],
        max_batches_per_pump: int = 20,
    ) -> None:
        self.outbox = outbox
        self.topic_up = topic_up
        self._publish = publish
        self._max = max_batches_per_pump
        self._receiver_started: float | None = None
        #: False while the receiver's retained status says it is down: publishing then would
        #: only be lost (receivers use clean sessions) and re-sent later anyway.
        self.receiver_online: bool | None = None
        self.batches_sent = 0
        self.acked = 0

    def pump(self, now: float) -> int:
        """Publish what is due; returns the number of records published."""
        sent = 0
        if self.receiver_online is False:
            return 0
        for _ in range(self._max):
            due = self.outbox.take_due(now)
            if due is None:
                break
            batch, payload = due
            self._publish(self.topic_up, payload)
            self.batches_sent += 1
            sent += len(batch.records)
        return sent

    def on_ack(self, ack: Ack) -> None:
        """Apply an acknowledgement from the receiver."""
        self.acked += self.outbox.on_ack(ack)

    def on_receiver_status(self, body: dict[str, Any]) -> None:
        """Resend everything unacknowledged when the receiver (re)starts."""
        started = body.get("started")
        self.receiver_online = body.get("state") == "online"
        if self.receiver_online and started != self._receiver_started:
            if self._receiver_started is not None or self.outbox.records:
                self.outbox.resend_all()
            self._receiver_started = started if isinstance(started, float | int) else None

    def on_reconnect(self) -> None:
        """After our own reconnect, in-flight batches may be gone: make them due again."""
        self.outbox.resend_all()
