"""The cloud store: SQLite (one file, WAL) or PostgreSQL, with migrations and idempotent applies.

`apply()` validates each record, writes the rows and the custody inbox state in the same
transaction, so a redelivered batch changes nothing. Records that fail validation are kept in
`rejected` with their reason (they are acknowledged: a re-send would not make them valid).

The schema is written once, as `MIGRATIONS` in SQLite's dialect with the column types `TEXT`,
`INTEGER`, `REAL` and `BLOB`; `cloud_sink.postgres` translates those types for PostgreSQL. The
validation (`record_rows()`) is pure and shared: the two stores differ only in how they open a
transaction, keep the inbox and insert rows (`CloudStore`).
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from fogline.cloudstores import is_url
from fogline.codec import Ack, Batch, Record
from fogline.custody import Inbox
from fogline.db import connect, migrate, transaction

STORE_FILE = "cloud.db"
#: Tables `apply()` writes, in the order it inserts them.
TABLES = ("summaries", "events", "drops", "drop_ranges", "rollups", "model_events", "rejected")
#: Largest integer both stores hold (SQLite INTEGER, PostgreSQL BIGINT).
MAX_INT = 2**63 - 1

#: The schema, step by step, in SQLite's dialect (`cloud_sink.postgres` translates the types).
MIGRATIONS = [
    """
    CREATE TABLE summaries (
        src TEXT NOT NULL, seq INTEGER NOT NULL, edge TEXT NOT NULL, device TEXT NOT NULL,
        first INTEGER NOT NULL, last INTEGER NOT NULL, count INTEGER NOT NULL,
        t0 REAL, t1 REAL, fields TEXT, min TEXT, mean TEXT, max TEXT, std TEXT,
        events INTEGER, stored REAL NOT NULL, PRIMARY KEY (src, seq));
    CREATE INDEX summaries_device ON summaries(device, first);
    CREATE TABLE events (
        src TEXT NOT NULL, seq INTEGER NOT NULL, edge TEXT NOT NULL, device TEXT NOT NULL,
        first INTEGER NOT NULL, last INTEGER NOT NULL, count INTEGER NOT NULL, ts REAL,
        kind TEXT, field TEXT, value REAL, baseline REAL, z REAL, stored REAL NOT NULL,
        PRIMARY KEY (src, seq));
    CREATE INDEX events_device ON events(device, ts);
    CREATE TABLE drops (
        src TEXT NOT NULL, seq INTEGER NOT NULL, origin TEXT, reason TEXT NOT NULL,
        records INTEGER, kinds TEXT, ts REAL, stored REAL NOT NULL, PRIMARY KEY (src, seq));
    CREATE TABLE drop_ranges (
        src TEXT NOT NULL, seq INTEGER NOT NULL, device TEXT NOT NULL,
        first INTEGER NOT NULL, last INTEGER NOT NULL, reason TEXT NOT NULL);
    CREATE INDEX drop_ranges_device ON drop_ranges(device, first);
    CREATE TABLE rollups (
        src TEXT NOT NULL, seq INTEGER NOT NULL, fog TEXT, edge TEXT, t0 REAL, t1 REAL,
        readings INTEGER, summaries INTEGER, events INTEGER, dropped INTEGER, devices INTEGER,
        stored REAL NOT NULL, PRIMARY KEY (src, seq));
    CREATE TABLE rejected (
        src TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT, reason TEXT NOT NULL,
        body TEXT, stored REAL NOT NULL, PRIMARY KEY (src, seq))
    """,
    # Decisions made with models: status, fault class, confidence, hours to failure, who decided.
    """
    ALTER TABLE events ADD COLUMN status TEXT;
    ALTER TABLE events ADD COLUMN score REAL;
    ALTER TABLE events ADD COLUMN threshold REAL;
    ALTER TABLE events ADD COLUMN fault TEXT;
    ALTER TABLE events ADD COLUMN confidence REAL;
    ALTER TABLE events ADD COLUMN hours_to_failure REAL;
    ALTER TABLE events ADD COLUMN recommendation TEXT;
    ALTER TABLE events ADD COLUMN escalated INTEGER;
    ALTER TABLE events ADD COLUMN verdict_by TEXT;
    ALTER TABLE events ADD COLUMN unconfirmed INTEGER;
    ALTER TABLE events ADD COLUMN model TEXT;
    ALTER TABLE events ADD COLUMN evidence BLOB
    """,
    # Warnings the edge held off: how many repeats an event stands for.
    """
    ALTER TABLE events ADD COLUMN repeats INTEGER
    """,
    # Model rollouts: every step a fog took and every edge's install answer.
    """
    CREATE TABLE model_events (
        src TEXT NOT NULL, seq INTEGER NOT NULL, fog TEXT, name TEXT NOT NULL,
        version INTEGER NOT NULL, event TEXT NOT NULL, edge TEXT, detail TEXT, ts REAL,
        stored REAL NOT NULL, PRIMARY KEY (src, seq));
    CREATE INDEX model_events_name ON model_events(name, version)
    """,
]


class InvalidRecord(ValueError):
    """A record body does not have the fields its kind needs."""


def _int(body: dict[str, Any], key: str) -> int:
    v = body.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INT:
        raise InvalidRecord(f"{key} must be a natural number below 2**63")
    return v


def _num(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise InvalidRecord(f"{key} must be a finite number")
    return float(v)


def _str(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v or len(v) > 64 or "\x00" in v:
        raise InvalidRecord(f"{key} must be a short string")
    return v


def _range(body: dict[str, Any]) -> tuple[int, int, int]:
    first, last, count = _int(body, "first"), _int(body, "last"), _int(body, "count")
    if last < first or count != last - first + 1:
        raise InvalidRecord("first/last/count disagree")
    return first, last, count


_PLAIN = frozenset((str, int, float))
_NUMBERS = frozenset((int, float))
_STRINGS_JSON: dict[tuple[str, ...], str] = {}  # field-name lists repeat on every summary


def _plain_json(key: str, v: Any) -> str:
    """A list of strings or finite numbers (what summaries carry) as JSON, else InvalidRecord."""
    if not isinstance(v, list):
        raise InvalidRecord(f"{key} must be a list")
    types = set(map(type, v))  # exact types: no bools, no nesting
    if types <= _NUMBERS:
        if not all(map(math.isfinite, v)):
            raise InvalidRecord(f"{key} must hold strings or finite numbers")
        return "[" + ", ".join(map(repr, v)) + "]"  # what json.dumps writes for these
    if not types <= _PLAIN:
        raise InvalidRecord(f"{key} must hold strings or finite numbers")
    if types == {str}:
        names = tuple(v)
        text = _STRINGS_JSON.get(names)
        if text is None:
            text = json.dumps(v)
            if len(_STRINGS_JSON) < 1024:
                _STRINGS_JSON[names] = text
        return text
    try:
        return json.dumps(v, allow_nan=False)
    except ValueError as exc:  # NaN or infinite
        raise InvalidRecord(f"{key} must hold strings or finite numbers") from exc


def _counts(v: Any) -> dict[str, int]:
    """A map of names to counts (a drop's `kinds`), else InvalidRecord."""
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) for k, n in v.items()
    ):
        raise InvalidRecord("kinds must map kind names to counts")
    return v


def _jsonable(obj: Any) -> Any:
    """Any decoded msgpack value as JSON-ready data: bytes become hex, keys become strings."""
    if isinstance(obj, dict):
        return {
            str(k) if not isinstance(k, bytes) else k.hex(): _jsonable(v) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    return obj


def _summary(src: str, rec: Record, now: float) -> dict[str, Any]:
    b = rec.body
    first, last, count = _range(b)
    lists = {k: b.get(k) for k in ("fields", "min", "mean", "max", "std")}
    if not all(isinstance(v, list) for v in lists.values()):
        raise InvalidRecord("fields/min/mean/max/std must be lists")
    return {
        "src": src, "seq": rec.seq, "edge": _str(b, "edge"), "device": _str(b, "device"),
        "first": first, "last": last, "count": count, "t0": _num(b, "t0"), "t1": _num(b, "t1"),
        **{k: _plain_json(k, v) for k, v in lists.items()},
        "events": _int(b, "events"), "stored": now,
    }  # fmt: skip


def _opt_text(body: dict[str, Any], key: str, limit: int = 1000) -> str | None:
    v = body.get(key)
    if v is not None and (not isinstance(v, str) or len(v) > limit or "\x00" in v):
        raise InvalidRecord(f"{key} must be text of at most {limit} characters (no NUL)")
    return v


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else _str(body, key)


def _flag(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise InvalidRecord(f"{key} must be true or false")
    return int(v)


def _event(src: str, rec: Record, now: float) -> dict[str, Any]:
    b = rec.body
    first, last, count = _range(b)
    kind = _str(b, "kind")
    row = {
        "src": src, "seq": rec.seq, "edge": _str(b, "edge"), "device": _str(b, "device"),
        "first": first, "last": last, "count": count, "ts": _num(b, "ts"), "kind": kind,
        "stored": now,
    }  # fmt: skip
    if kind == "zscore":
        row |= {
            "field": _str(b, "field"), "value": _num(b, "value"),
            "baseline": _num(b, "baseline"), "z": _num(b, "z"),
        }  # fmt: skip
        return row
    evidence = b.get("evidence")
    if evidence is not None and not isinstance(evidence, bytes):
        raise InvalidRecord("evidence must be bytes")
    status = _str(b, "status")
    if status not in ("normal", "warning"):
        raise InvalidRecord("status must be normal or warning")
    return row | {
        "status": status, "score": _num(b, "score"), "threshold": _num(b, "threshold"),
        "fault": _opt_str(b, "fault"), "confidence": _num(b, "confidence"),
        "hours_to_failure": _num(b, "hours_to_failure"),
        "recommendation": _opt_str(b, "recommendation") if b.get("recommendation") else None,
        "escalated": _flag(b, "escalated"), "verdict_by": _opt_str(b, "verdict_by"),
        "unconfirmed": _flag(b, "unconfirmed"), "model": _opt_str(b, "model"),
        "evidence": evidence, "repeats": _int(b, "repeats") if "repeats" in b else None,
    }  # fmt: skip


def _drop(src: str, rec: Record, now: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    b = rec.body
    reason = _str(b, "reason")
    ranges = b.get("ranges")
    if not isinstance(ranges, list):
        raise InvalidRecord("ranges must be a list")
    rows = []
    for r in ranges:
        ok = isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)
        ok = ok and 0 < len(r[0]) <= 64 and "\x00" not in r[0]
        bounds = ok and all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_INT for x in r[1:]
        )
        if not bounds or r[2] < r[1]:
            raise InvalidRecord("a range is [device, first, last]")
        rows.append(
            {
                "src": src,
                "seq": rec.seq,
                "device": r[0],
                "first": r[1],
                "last": r[2],
                "reason": reason,
            }
        )
    row = {
        "src": src, "seq": rec.seq, "origin": _str(b, "origin"), "reason": reason,
        "records": _int(b, "records"), "kinds": json.dumps(_counts(b.get("kinds") or {})),
        "ts": _num(b, "ts"), "stored": now,
    }  # fmt: skip
    return row, rows


def _rollup(src: str, rec: Record, now: float) -> dict[str, Any]:
    b = rec.body
    return {
        "src": src, "seq": rec.seq, "fog": _str(b, "fog"), "edge": _str(b, "edge"),
        "t0": _num(b, "t0"), "t1": _num(b, "t1"), "readings": _int(b, "readings"),
        "summaries": _int(b, "summaries"), "events": _int(b, "events"),
        "dropped": _int(b, "dropped"), "devices": _int(b, "devices"), "stored": now,
    }  # fmt: skip


def _model_event(src: str, rec: Record, now: float) -> dict[str, Any]:
    b = rec.body
    return {
        "src": src, "seq": rec.seq, "fog": _str(b, "fog"), "name": _str(b, "name"),
        "version": _int(b, "version"), "event": _str(b, "event"),
        "edge": _opt_str(b, "edge"), "detail": _opt_text(b, "detail"),
        "ts": _num(b, "ts"), "stored": now,
    }  # fmt: skip


def _rejected(src: str, rec: Record, reason: str, now: float) -> dict[str, Any]:
    body = json.dumps(_jsonable(rec.body))[:2000]
    # The kind comes from the wire as is; PostgreSQL text cannot hold NUL.
    kind = rec.kind.replace("\x00", "\\x00")
    return {
        "src": src, "seq": rec.seq, "kind": kind, "reason": reason, "body": body, "stored": now,
    }  # fmt: skip


Rows = list[tuple[str, dict[str, Any]]]


def record_rows(src: str, rec: Record, now: float) -> tuple[str, Rows]:
    """The rows a record becomes, `(table, row)`, and what it counts as: its kind, or
    `rejected` (then one row for `rejected` with the reason). Pure: no database."""
    try:
        if rec.kind == "summary":
            return rec.kind, [("summaries", _summary(src, rec, now))]
        if rec.kind == "event":
            return rec.kind, [("events", _event(src, rec, now))]
        if rec.kind == "drop":
            drop, ranges = _drop(src, rec, now)
            return rec.kind, [("drops", drop), *(("drop_ranges", r) for r in ranges)]
        if rec.kind == "rollup":
            return rec.kind, [("rollups", _rollup(src, rec, now))]
        if rec.kind == "model":
            return rec.kind, [("model_events", _model_event(src, rec, now))]
        raise InvalidRecord(f"unknown record kind {rec.kind!r}")
    except InvalidRecord as exc:
        return "rejected", [("rejected", _rejected(src, rec, str(exc), now))]


class InboxLike(Protocol):
    """What a store's custody inbox does (`fogline.custody.Inbox` on SQLite)."""

    def accept(self, stream: str, batch: Batch) -> list[Record]:
        """The records of `batch` not seen before, remembered in the open transaction."""
        ...

    def ack(self, stream: str) -> Ack:
        """The cumulative acknowledgement of `stream` as committed."""
        ...


class CloudStore(ABC):
    """What both stores share: validation outside the transaction, then one transaction that
    admits the batches through the inbox and inserts the new records' rows."""

    inbox: InboxLike
    #: Where the store is (a path, or a URL without its password), for logs and reports.
    location: str

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        #: When the devices published the windows of the events the last `apply` committed
        #: (their `published`): the sink's commit latency.
        self.published: list[float] = []

    @abstractmethod
    def _transaction(self, streams: Sequence[str]) -> AbstractContextManager[Any]:
        """One write transaction that has the inbox state of `streams` (sorted) to itself."""

    @abstractmethod
    def _insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Insert rows (dicts of column values; missing columns are NULL) inside the
        transaction."""

    @abstractmethod
    def close(self) -> None:
        """Close the store."""

    def apply(self, batches: list[tuple[str, Batch]], now: float | None = None) -> Counter[str]:
        """Store the new records of `(stream, batch)` pairs in one transaction; returns counts.

        Records are validated before the transaction (the first copy of each `(stream, seq)`,
        the one the inbox would take): only admitting and inserting hold the write lock.
        """
        now = time.time() if now is None else now
        converted: dict[tuple[str, int], tuple[str, Rows]] = {}
        for stream, batch in batches:
            for rec in batch.records:
                if (stream, rec.seq) not in converted:
                    converted[(stream, rec.seq)] = record_rows(stream, rec, now)
        counts: Counter[str] = Counter()
        rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        published: list[float] = []
        with self._transaction(sorted({stream for stream, _ in batches})):
            for stream, batch in batches:
                for rec in self.inbox.accept(stream, batch):
                    counted, made = converted[(stream, rec.seq)]
                    counts[counted] += 1
                    for table, row in made:
                        rows[table].append(row)
                    sent = rec.body.get("published") if counted == "event" else None
                    if isinstance(sent, int | float) and not isinstance(sent, bool):
                        published.append(float(sent))
            for table in TABLES:
                if rows.get(table):
                    self._insert(table, rows[table])
        counts["readings"] = sum(r["count"] for r in rows["summaries"])
        self.stats.update(counts)
        self.published = [p for p in published if math.isfinite(p)]
        return counts

    def _check_columns(self, table: str, rows: list[dict[str, Any]], known: Sequence[str]) -> None:
        unknown = set().union(*rows) - set(known)
        if unknown:  # a field added to a row without a migration: a bug, never silent
            raise RuntimeError(f"{table} has no columns {sorted(unknown)}: add a migration")


class Store(CloudStore):
    """The cloud database on SQLite: one file, WAL, migrated on open.

    Several processes may write the same file (cloud-sink workers on one machine): every apply
    takes SQLite's single write lock first (`BEGIN IMMEDIATE`), so the inbox read, its update
    and the rows are one serialised step.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.location = str(path)
        self.conn = connect(path)
        migrate(self.conn, "cloud", MIGRATIONS)
        self.db = sqlite_utils.Database(self.conn)
        self.inbox = Inbox(self.conn)
        self._columns = {
            t: [r[1] for r in self.conn.execute(f"PRAGMA table_info({t})")] for t in TABLES
        }

    def _transaction(self, streams: Sequence[str]) -> AbstractContextManager[Any]:
        return transaction(self.conn)

    def _insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        cols = self._columns[table]
        self._check_columns(table, rows, cols)
        marks = ", ".join("?" * len(cols))
        self.conn.executemany(
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})",
            [tuple(r.get(c) for c in cols) for r in rows],
        )

    def close(self) -> None:
        """Close the database."""
        self.conn.close()


def open_store(where: str | Path) -> CloudStore:
    """The store at `where`: a `postgresql://` URL, or the path of an SQLite file."""
    if is_url(where):
        # Imported here: psycopg is the optional `postgres` extra.
        from cloud_sink.postgres import PostgresStore

        return PostgresStore(str(where))
    return Store(Path(where))
