"""Custody: every record reaches the receiver exactly once, or its loss is counted and reported."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from fogline import codec, db
from fogline.codec import Ack, Batch, Record
from fogline.custody import PRIORITY, Inbox, Outbox, OutboxLimits, Uplink, merge_ranges

STREAM = "edge-1"
TOPIC_UP = "fl/v1/edge/edge-1/up"


class Boom(Exception):
    """Raised inside a transaction to make it fail."""


def _outbox(path: Path, limits: OutboxLimits | None = None) -> Outbox:
    return Outbox(db.connect(path, synchronous="OFF"), stream=STREAM, limits=limits)


def _held(path: Path) -> Outbox:
    """The outbox as a restarted process sees it (fresh connection, counts from disk)."""
    return _outbox(path)


def _size(body: dict[str, Any]) -> int:
    return len(codec.encode_record_body(body))


def _body(device: str, first: int, last: int, **extra: Any) -> dict[str, Any]:
    return {"device": device, "first": first, "last": last, "pad": "x" * 40, **extra}


def _take(outbox: Outbox, now: float) -> Batch | None:
    """The batch `take_due` marks as sent at `now` (checking the message it encoded for it)."""
    due = outbox.take_due(now)
    if due is None:
        return None
    batch, payload = due
    env = codec.decode(payload, expect="batch")
    assert (env.src, env.ts, env.body) == (outbox.stream, now, batch)
    return batch


def _drain(outbox: Outbox, now: float) -> list[Record]:
    """Everything `take_due` hands out at `now`, in order."""
    out: list[Record] = []
    while (batch := _take(outbox, now)) is not None:
        out.extend(batch.records)
    return out


def _everything(path: Path) -> list[Record]:
    """Every record the outbox at `path` holds, in sending order, leaving the file untouched.

    Reads a snapshot copy through a fresh outbox far in the future, so nothing is marked sent.
    """
    snapshot = sqlite3.connect(":memory:", isolation_level=None)
    source = sqlite3.connect(str(path))
    source.backup(snapshot)
    source.close()
    return _drain(Outbox(snapshot, stream=STREAM), now=1e12)


class Receiver:
    """A receiver that stores what it applies, as the fog or cloud does."""

    def __init__(self, path: Path) -> None:
        self.conn = db.connect(path, synchronous="OFF")
        self.inbox = Inbox(self.conn)
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS stored (stream TEXT, seq INTEGER, kind TEXT, n INTEGER)"
        )

    def apply(self, stream: str, batch: Batch, *, fail: bool = False) -> list[Record]:
        """Store the fresh records of `batch` in one transaction (failing it when asked)."""
        with db.transaction(self.conn):
            fresh = self.inbox.accept(stream, batch)
            self.conn.executemany(
                "INSERT INTO stored VALUES (?, ?, ?, ?)",
                [(stream, r.seq, r.kind, r.body.get("n")) for r in fresh],
            )
            if fail:
                raise Boom
        return fresh

    def stored_seqs(self, stream: str = STREAM) -> list[int]:
        rows = self.conn.execute("SELECT seq FROM stored WHERE stream = ? ORDER BY seq", (stream,))
        return [r[0] for r in rows]


def _batch(low: int, seqs: Iterable[int]) -> Batch:
    return Batch(low=low, records=tuple(Record(s, "event", {"n": s}) for s in seqs))


# --------------------------------------------------------------------------- outbox: put


def test_put_numbers_from_zero_and_numbering_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    out = _outbox(path)
    bodies = [{"n": i, "device": "d1", "first": 10 * i, "last": 10 * i + 9} for i in range(5)]
    with db.transaction(out.conn):
        assert out.put([("event", b) for b in bodies[:3]], now=1.0) == 3
    assert out.put([("summary", b) for b in bodies[3:]], now=2.0) == 2
    assert out.put([], now=2.0) == 0
    assert out.records == 5
    assert out.held_bytes == sum(_size(b) for b in bodies)

    again = _held(path)
    assert (again.records, again.held_bytes) == (out.records, out.held_bytes)
    held_bytes = again.held_bytes
    again.put([("train", {"n": 5})], now=3.0)
    assert (again.records, again.held_bytes) == (6, held_bytes + _size({"n": 5}))

    records = _everything(path)
    assert sorted(r.seq for r in records) == [0, 1, 2, 3, 4, 5]
    assert {r.seq: r.body["n"] for r in records} == {i: i for i in range(6)}


def test_seqs_are_not_reused_after_acked_rows_are_deleted(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    out = _outbox(path)
    out.put([("event", {"n": i}) for i in range(3)], now=0.0)
    out.on_ack(Ack(STREAM, hwm=2))
    assert out.records == 0
    _held(path).put([("event", {"n": 3})], now=0.0)
    assert [r.seq for r in _everything(path)] == [3]


def test_put_rolled_back_by_the_callers_transaction_leaves_no_trace(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    one = _body("d1", 0, 9)
    out = _outbox(path, OutboxLimits(max_bytes=3 * _size(one)))
    out.put([("event", one), ("event", _body("d1", 10, 19))], now=0.0)
    with pytest.raises(Boom), db.transaction(out.conn):
        out.put([("event", _body("d1", 20, 29)), ("event", _body("d1", 30, 39))], now=0.0)
        raise Boom

    # Two records are well under the bound of three: nothing may be evicted.
    assert out.enforce_bounds(now=0.0) == {}
    assert [r.body["first"] for r in _everything(path)] == [0, 10]
    assert (out.records, out.held_bytes) == (_held(path).records, _held(path).held_bytes)


# --------------------------------------------------------------------------- outbox: sending


def test_take_due_orders_by_priority_then_seq(tmp_path: Path) -> None:
    out = _outbox(tmp_path / "edge.db")
    kinds = ["train", "summary", "event", "rollup", "drop", "escalation", "train", "event", "drop"]
    out.put([(k, {"n": i}) for i, k in enumerate(kinds)], now=0.0)
    got = [(r.kind, r.seq) for r in _drain(out, now=0.0)]
    assert got == [
        ("drop", 4),
        ("drop", 8),
        ("event", 2),
        ("event", 7),
        ("escalation", 5),
        ("summary", 1),
        ("rollup", 3),
        ("train", 0),
        ("train", 6),
    ]
    assert PRIORITY["drop"] > PRIORITY["event"] > PRIORITY["escalation"] > PRIORITY["summary"]
    assert PRIORITY["summary"] == PRIORITY["rollup"] > PRIORITY["train"]


def test_take_due_respects_batch_records(tmp_path: Path) -> None:
    out = _outbox(tmp_path / "edge.db", OutboxLimits(batch_records=4))
    out.put([("event", {"n": i}) for i in range(10)], now=0.0)
    sizes = []
    while (batch := _take(out, 0.0)) is not None:
        sizes.append([r.seq for r in batch.records])
    assert sizes == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_take_due_respects_batch_bytes(tmp_path: Path) -> None:
    body = {"pad": "y" * 100}
    out = _outbox(tmp_path / "edge.db", OutboxLimits(batch_bytes=int(2.5 * _size(body))))
    out.put([("event", {**body, "n": i}) for i in range(5)], now=0.0)
    batches = []
    while (batch := _take(out, 0.0)) is not None:
        assert sum(_size(r.body) for r in batch.records) <= out.limits.batch_bytes
        batches.append([r.body["n"] for r in batch.records])
    assert batches == [[0, 1], [2, 3], [4]]


def test_a_record_larger_than_batch_bytes_is_still_sent_alone(tmp_path: Path) -> None:
    out = _outbox(tmp_path / "edge.db", OutboxLimits(batch_bytes=50))
    out.put([("event", {"n": 0, "pad": "z" * 500}), ("event", {"n": 1})], now=0.0)
    first = _take(out, 0.0)
    assert first is not None
    assert [r.seq for r in first.records] == [0]
    second = _take(out, 0.0)
    assert second is not None
    assert [r.seq for r in second.records] == [1]


def test_take_due_respects_the_in_flight_window(tmp_path: Path) -> None:
    limits = OutboxLimits(batch_records=2, window=3, resend_after=10.0)
    out = _outbox(tmp_path / "edge.db", limits)
    out.put([("event", {"n": i}) for i in range(6)], now=0.0)
    assert [r.seq for r in _drain(out, now=0.0)] == [0, 1, 2]
    assert _take(out, 5.0) is None  # still 3 in flight
    out.on_ack(Ack(STREAM, hwm=1))  # two acked: room for two more
    assert [r.seq for r in _drain(out, now=6.0)] == [3, 4]
    assert _take(out, 6.0) is None


def test_sent_records_come_back_only_after_resend_after(tmp_path: Path) -> None:
    out = _outbox(tmp_path / "edge.db", OutboxLimits(resend_after=5.0))
    out.put([("event", {"n": i}) for i in range(3)], now=100.0)
    first = _take(out, 100.0)
    assert first is not None
    assert [r.seq for r in first.records] == [0, 1, 2]
    assert _take(out, 100.0) is None
    assert _take(out, 104.9) is None

    out.put([("event", {"n": 3})], now=104.9)
    new = _take(out, 104.9)
    assert new is not None
    assert [r.seq for r in new.records] == [3]  # only the new one

    again = _take(out, 105.0)
    assert again is not None
    assert again.records == first.records  # the same records, bodies included
    assert _take(out, 105.0) is None
    assert [r.seq for r in _drain(out, now=110.0)] == [0, 1, 2, 3]


def test_batch_low_is_the_lowest_seq_still_held(tmp_path: Path) -> None:
    out = _outbox(tmp_path / "edge.db", OutboxLimits(batch_records=2))
    out.put([("event", {"n": i}) for i in range(5)], now=0.0)
    first = _take(out, 0.0)
    assert first is not None
    assert first.low == 0
    out.on_ack(Ack(STREAM, hwm=1))
    second = _take(out, 0.0)
    assert second is not None
    assert second.low == 2


# --------------------------------------------------------------------------- inbox


def test_accept_returns_only_unseen_records(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "fog.db")
    assert [r.seq for r in rx.apply(STREAM, _batch(0, [0, 1, 2]))] == [0, 1, 2]
    assert rx.apply(STREAM, _batch(0, [0, 1, 2])) == []
    assert rx.stored_seqs() == [0, 1, 2]
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=2)


def test_duplicates_inside_one_batch_are_applied_once(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "fog.db")
    assert [r.seq for r in rx.apply(STREAM, _batch(0, [0, 1, 1, 0, 2]))] == [0, 1, 2]
    assert rx.stored_seqs() == [0, 1, 2]


def test_out_of_order_and_overlapping_batches(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "fog.db")
    assert [r.seq for r in rx.apply(STREAM, _batch(0, [5, 6]))] == [5, 6]
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=-1, ranges=((5, 6),))
    assert [r.seq for r in rx.apply(STREAM, _batch(0, [2, 3]))] == [2, 3]
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=-1, ranges=((2, 3), (5, 6)))
    assert [r.seq for r in rx.apply(STREAM, _batch(0, [3, 4, 5, 6, 7]))] == [4, 7]
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=-1, ranges=((2, 7),))
    assert [r.seq for r in rx.apply(STREAM, _batch(0, [1, 0, 2]))] == [1, 0]
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=7)
    assert rx.stored_seqs() == list(range(8))


def test_ack_reports_hwm_and_ranges(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "fog.db")
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=-1)
    rx.apply(STREAM, _batch(0, [0, 1, 4, 5, 9, 11, 10, 13]))
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=1, ranges=((4, 5), (9, 11), (13, 13)))


def test_low_above_hwm_raises_hwm_and_gaps_below_are_closed(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "fog.db")
    rx.apply(STREAM, _batch(0, [0, 1]))
    # Seqs 2..9 were acked elsewhere or evicted: the sender says its lowest is 10.
    assert [r.seq for r in rx.apply(STREAM, _batch(10, [10, 12]))] == [10, 12]
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=10, ranges=((12, 12),))
    # A late copy of something below low is a duplicate.
    assert rx.apply(STREAM, _batch(0, [5])) == []
    # low past a stored range swallows it.
    assert rx.apply(STREAM, _batch(14, [14])) != []
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=14)


def test_rolled_back_accept_leaves_the_inbox_unchanged(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "fog.db")
    rx.apply(STREAM, _batch(0, [0]))
    with pytest.raises(Boom):
        rx.apply(STREAM, _batch(0, [1, 2]), fail=True)
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=0)
    assert rx.stored_seqs() == [0]
    # Redelivery applies the records that were rolled back.
    assert [r.seq for r in rx.apply(STREAM, _batch(0, [1, 2]))] == [1, 2]
    assert rx.stored_seqs() == [0, 1, 2]


def test_inbox_state_survives_a_restart(tmp_path: Path) -> None:
    Receiver(tmp_path / "fog.db").apply(STREAM, _batch(0, [0, 1, 3]))
    again = Receiver(tmp_path / "fog.db")
    assert again.inbox.ack(STREAM) == Ack(STREAM, hwm=1, ranges=((3, 3),))
    assert [r.seq for r in again.apply(STREAM, _batch(0, [1, 2, 3]))] == [2]


def test_streams_are_kept_apart(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "fog.db")
    rx.apply("edge-1", _batch(0, [0, 1]))
    assert [r.seq for r in rx.apply("edge-2", _batch(0, [0, 1]))] == [0, 1]
    assert rx.inbox.ack("edge-2") == Ack("edge-2", hwm=1)
    assert rx.inbox.ack("edge-3") == Ack("edge-3", hwm=-1)


# --------------------------------------------------------------------------- outbox: acks


def test_on_ack_deletes_exactly_what_it_covers(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    out = _outbox(path)
    bodies = [{"n": i, "pad": "p" * i} for i in range(10)]
    out.put([("event", b) for b in bodies], now=0.0)
    removed = out.on_ack(Ack(STREAM, hwm=2, ranges=((5, 6), (8, 8))))
    assert removed == 6
    kept = [3, 4, 7, 9]
    assert [r.seq for r in _everything(path)] == kept
    assert out.records == 4
    assert out.held_bytes == sum(_size(bodies[i]) for i in kept)
    assert (_held(path).records, _held(path).held_bytes) == (out.records, out.held_bytes)
    # Acks are idempotent.
    assert out.on_ack(Ack(STREAM, hwm=2, ranges=((5, 6), (8, 8)))) == 0
    assert out.records == 4


def test_ack_for_another_stream_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    out = _outbox(path)
    out.put([("event", {"n": i}) for i in range(3)], now=0.0)
    assert out.on_ack(Ack("edge-2", hwm=5, ranges=((0, 9),))) == 0
    assert out.records == 3
    assert len(_everything(path)) == 3


def test_empty_ack_removes_nothing(tmp_path: Path) -> None:
    out = _outbox(tmp_path / "edge.db")
    out.put([("event", {"n": 0})], now=0.0)
    assert out.on_ack(Ack(STREAM, hwm=-1)) == 0
    assert out.records == 1


# --------------------------------------------------------------------------- end to end


def test_every_record_arrives_exactly_once_despite_loss_and_duplication(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    total = 400
    limits = OutboxLimits(batch_records=9, window=60, resend_after=4.0)
    out = _outbox(tmp_path / "edge.db", limits)
    published: list[tuple[str, bytes]] = []
    uplink = Uplink(out, topic_up=TOPIC_UP, publish=lambda t, p: published.append((t, p)))
    rx = Receiver(tmp_path / "fog.db")
    kinds = ["train", "summary", "rollup", "escalation", "event"]

    to_receiver: list[tuple[float, bytes]] = []
    to_sender: list[tuple[float, bytes]] = []
    put = duplicates_seen = lost = 0
    t = 0.0
    for _ in range(3000):
        if put < total:
            chunk = min(total - put, rng.randint(0, 12))
            out.put([(rng.choice(kinds), {"n": put + i}) for i in range(chunk)], now=t)
            put += chunk
        uplink.pump(t)
        for topic, payload in published:
            assert topic == TOPIC_UP
            if rng.random() < 0.3:
                lost += 1
                continue
            for _copy in range(2 if rng.random() < 0.25 else 1):
                to_receiver.append((t + rng.choice([0.0, 1.0, 2.0, 5.0]), payload))
        published.clear()

        due = [m for m in to_receiver if m[0] <= t]
        to_receiver = [m for m in to_receiver if m[0] > t]
        rng.shuffle(due)
        for _at, payload in due:
            env = codec.decode(payload, expect="batch")
            fresh = rx.apply(env.src, env.body)
            duplicates_seen += len(env.body.records) - len(fresh)
            ack = codec.encode_ack("fog-1", rx.inbox.ack(env.src), seq=0, ts=t)
            if rng.random() >= 0.2:  # acks get lost too
                to_sender.append((t + rng.choice([0.0, 1.0]), ack))

        due = [m for m in to_sender if m[0] <= t]
        to_sender = [m for m in to_sender if m[0] > t]
        for _at, payload in due:
            uplink.on_ack(codec.decode(payload, expect="ack").body)

        if put == total and out.records == 0:
            break
        t += 1.0

    assert out.records == 0, f"outbox still holds {out.records} records at t={t}"
    assert _held(tmp_path / "edge.db").records == 0
    rows = rx.conn.execute("SELECT n, count(*) FROM stored GROUP BY n ORDER BY n").fetchall()
    assert rows == [(n, 1) for n in range(total)]
    assert rx.stored_seqs() == list(range(total))
    assert rx.inbox.ack(STREAM) == Ack(STREAM, hwm=total - 1)
    assert lost > 0
    assert duplicates_seen > 0


# --------------------------------------------------------------------------- bounds


def _drops(path: Path) -> list[dict[str, Any]]:
    return [r.body for r in _everything(path) if r.kind == "drop"]


def test_eviction_takes_lowest_priority_first_and_reports_it(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    records = [
        ("event", _body("d1", 0, 9)),  # 0
        ("train", _body("d1", 10, 19)),  # 1
        ("summary", _body("d1", 20, 29)),  # 2
        ("train", _body("d1", 30, 39)),  # 3
        ("drop", {"reason": "earlier", "records": 1}),  # 4
        ("escalation", _body("d2", 0, 9)),  # 5
        ("train", _body("d2", 10, 19)),  # 6
        ("summary", _body("d2", 20, 29)),  # 7
        ("rollup", _body("d1", 40, 49)),  # 8
    ]
    total = sum(_size(b) for _, b in records)
    must_go = sum(_size(records[i][1]) for i in (1, 3, 6, 2))
    out = _outbox(path, OutboxLimits(max_bytes=total - must_go))
    out.put(records, now=50.0)
    before = _held(path).records

    evicted = out.enforce_bounds(now=60.0)

    assert evicted == {"outbox_full": 4}
    held = _everything(path)
    assert sorted(r.seq for r in held) == [0, 4, 5, 7, 8, 9]
    drops = [r for r in held if r.kind == "drop" and r.seq == 9]
    assert len(drops) == 1
    body = drops[0].body
    assert body["reason"] == "outbox_full"
    assert body["records"] == 4
    assert body["kinds"] == {"train": 3, "summary": 1}
    assert body["ranges"] == [["d1", 10, 39], ["d2", 10, 19]]
    assert body["origin"] == STREAM

    after = _held(path)
    drops_added = 1
    assert before - after.records + drops_added == sum(evicted.values())
    assert (out.records, out.held_bytes) == (after.records, after.held_bytes)
    assert out.held_bytes - _size(body) <= out.limits.max_bytes


def test_drop_records_are_never_evicted(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    out = _outbox(path, OutboxLimits(max_bytes=1))
    out.put(
        [
            ("event", _body("d1", 0, 9)),
            ("drop", {"reason": "earlier", "records": 2}),
            ("train", _body("d1", 10, 19)),
            ("escalation", _body("d1", 20, 29)),
        ],
        now=0.0,
    )
    assert out.enforce_bounds(now=0.0) == {"outbox_full": 3}
    held = _everything(path)
    assert [r.kind for r in held] == ["drop", "drop"]
    new = held[1].body
    assert (new["reason"], new["records"]) == ("outbox_full", 3)
    assert new["kinds"] == {"event": 1, "train": 1, "escalation": 1}
    assert new["ranges"] == [["d1", 0, 29]]

    # Still over the bound, but nothing is evictable: no eviction, no new drop record.
    assert out.enforce_bounds(now=0.0) == {}
    assert [r.kind for r in _everything(path)] == ["drop", "drop"]


def test_unsent_rows_are_evicted_before_sent_ones(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    bodies = [_body("d1", 0, 9), _body("d1", 10, 19), _body("d1", 20, 29)]
    total = sum(_size(b) for b in bodies)
    out = _outbox(path, OutboxLimits(batch_records=1, max_bytes=total - _size(bodies[1])))
    out.put([("train", b) for b in bodies], now=0.0)
    sent = _take(out, 0.0)
    assert sent is not None
    assert [r.seq for r in sent.records] == [0]

    assert out.enforce_bounds(now=0.0) == {"outbox_full": 1}
    (drop,) = _drops(path)
    assert drop["ranges"] == [["d1", 10, 19]]  # the unsent seq 1, not the in-flight seq 0
    assert sorted(r.body["first"] for r in _everything(path) if r.kind == "train") == [0, 20]


def test_priority_beats_sent_state_when_evicting(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    train, summary = _body("d1", 0, 9), _body("d1", 10, 19)
    out = _outbox(path, OutboxLimits(max_bytes=_size(summary)))
    out.put([("train", train)], now=0.0)
    assert _take(out, 0.0) is not None  # the train record is in flight
    out.put([("summary", summary)], now=0.0)
    assert out.enforce_bounds(now=0.0) == {"outbox_full": 1}
    (drop,) = _drops(path)
    assert drop["kinds"] == {"train": 1}


def test_within_bounds_nothing_is_evicted(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    out = _outbox(path)
    out.put([("train", _body("d1", 0, 9))], now=0.0)
    assert out.enforce_bounds(now=10.0) == {}
    assert [r.kind for r in _everything(path)] == ["train"]


def test_records_older_than_max_age_expire_and_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    out = _outbox(path, OutboxLimits(max_age=100.0))
    out.put(
        [
            ("train", _body("d1", 0, 9)),
            ("event", _body("d2", 0, 4)),
            ("drop", {"reason": "earlier", "records": 1}),
            ("train", _body("d1", 10, 19)),
        ],
        now=0.0,
    )
    out.put([("event", _body("d2", 5, 9))], now=150.0)
    before = _held(path).records

    evicted = out.enforce_bounds(now=200.0)

    assert evicted == {"expired": 3}
    held = _everything(path)
    new_drops = [r.body for r in held if r.kind == "drop" and r.body["reason"] != "earlier"]
    assert len(new_drops) == 1
    body = new_drops[0]
    assert body["reason"] == "expired"
    assert body["records"] == 3
    assert body["kinds"] == {"train": 2, "event": 1}
    assert body["ranges"] == [["d1", 0, 19], ["d2", 0, 4]]
    assert [r.body["first"] for r in held if r.kind == "event"] == [5]
    assert before - _held(path).records + 1 == 3


def test_expiry_and_overflow_in_one_call_report_each_reason_once(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    young = [_body("d1", 100 + 10 * i, 109 + 10 * i) for i in range(4)]
    out = _outbox(path, OutboxLimits(max_age=100.0, max_bytes=2 * _size(young[0])))
    out.put([("train", _body("d1", 0, 9))], now=0.0)
    out.put([("summary", b) for b in young], now=150.0)

    evicted = out.enforce_bounds(now=200.0)

    assert evicted["expired"] == 1
    assert evicted["outbox_full"] >= 2
    reasons = sorted(d["reason"] for d in _drops(path))
    assert reasons == ["expired", "outbox_full"]
    lost = sum(d["records"] for d in _drops(path))
    assert lost == sum(evicted.values())
    assert _held(path).records == 5 - lost + 2


def test_merge_ranges_merges_touching_and_overlapping_ranges_per_device() -> None:
    ranges = [
        ("d2", 5, 9),
        ("d1", 10, 19),
        ("d1", 0, 9),
        ("d1", 30, 39),
        ("d2", 0, 4),
        ("d1", 15, 25),
    ]
    assert merge_ranges(ranges) == [["d1", 0, 25], ["d1", 30, 39], ["d2", 0, 9]]
    assert merge_ranges([]) == []
    assert merge_ranges([("d1", 0, 100), ("d1", 5, 6)]) == [["d1", 0, 100]]


# --------------------------------------------------------------------------- uplink


def _uplink(
    path: Path, limits: OutboxLimits | None = None, **kwargs: Any
) -> tuple[Uplink, list[tuple[str, bytes]]]:
    published: list[tuple[str, bytes]] = []
    uplink = Uplink(
        _outbox(path, limits),
        topic_up=TOPIC_UP,
        publish=lambda topic, payload: published.append((topic, payload)),
        **kwargs,
    )
    return uplink, published


def _published_seqs(published: list[tuple[str, bytes]]) -> list[list[int]]:
    return [[r.seq for r in codec.decode(p, expect="batch").body.records] for _, p in published]


def test_pump_publishes_encoded_batches(tmp_path: Path) -> None:
    uplink, published = _uplink(tmp_path / "edge.db", OutboxLimits(batch_records=2))
    uplink.outbox.put([("event", {"n": i}) for i in range(5)], now=10.0)

    assert uplink.pump(now=10.0) == 5

    assert [topic for topic, _ in published] == [TOPIC_UP] * 3
    envelopes = [codec.decode(p, expect="batch") for _, p in published]
    assert {e.src for e in envelopes} == {STREAM}
    assert [e.ts for e in envelopes] == [10.0] * 3
    seqs = [e.seq for e in envelopes]
    assert seqs == sorted(set(seqs))  # message numbers increase
    assert [[(r.seq, r.body["n"]) for r in e.body.records] for e in envelopes] == [
        [(0, 0), (1, 1)],
        [(2, 2), (3, 3)],
        [(4, 4)],
    ]
    assert all(e.body.low == 0 for e in envelopes)

    assert uplink.pump(now=10.0) == 0
    assert len(published) == 3


def test_pump_publishes_at_most_max_batches(tmp_path: Path) -> None:
    limits = OutboxLimits(batch_records=1)
    uplink, published = _uplink(tmp_path / "edge.db", limits, max_batches_per_pump=2)
    uplink.outbox.put([("event", {"n": i}) for i in range(3)], now=0.0)
    assert uplink.pump(now=0.0) == 2
    assert uplink.pump(now=0.0) == 1
    assert _published_seqs(published) == [[0], [1], [2]]


def test_uplink_on_ack_removes_rows_and_they_are_not_resent(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    uplink, published = _uplink(path, OutboxLimits(resend_after=5.0))
    uplink.outbox.put([("event", {"n": i}) for i in range(5)], now=0.0)
    uplink.pump(now=0.0)
    uplink.on_ack(Ack(STREAM, hwm=2, ranges=((4, 4),)))
    assert uplink.outbox.records == 1
    assert [r.seq for r in _everything(path)] == [3]
    published.clear()
    assert uplink.pump(now=5.0) == 1
    assert _published_seqs(published) == [[3]]


def test_receiver_restart_triggers_a_resend_of_in_flight_rows(tmp_path: Path) -> None:
    uplink, published = _uplink(tmp_path / "edge.db", OutboxLimits(resend_after=60.0))
    uplink.outbox.put([("event", {"n": i}) for i in range(3)], now=0.0)
    assert uplink.pump(now=0.0) == 3
    assert uplink.pump(now=1.0) == 0  # in flight, not yet timed out

    uplink.on_receiver_status({"state": "online", "started": 1000.0})
    assert uplink.pump(now=2.0) == 3

    uplink.on_receiver_status({"state": "online", "started": 1000.0})  # same run: no resend
    assert uplink.pump(now=3.0) == 0

    uplink.on_receiver_status({"state": "offline"})
    assert uplink.pump(now=4.0) == 0

    uplink.on_receiver_status({"state": "online", "started": 2000.0})  # restarted
    assert uplink.pump(now=5.0) == 3
    uplink.on_receiver_status({"state": "online", "started": 2000.0})
    assert uplink.pump(now=6.0) == 0

    assert _published_seqs(published) == [[0, 1, 2]] * 3


def test_resent_records_are_deduplicated_by_the_receiver(tmp_path: Path) -> None:
    uplink, published = _uplink(tmp_path / "edge.db", OutboxLimits(resend_after=60.0))
    rx = Receiver(tmp_path / "fog.db")
    uplink.outbox.put([("event", {"n": i}) for i in range(4)], now=0.0)
    uplink.pump(now=0.0)
    uplink.on_receiver_status({"state": "online", "started": 1.0})
    uplink.pump(now=1.0)
    for _, payload in published:
        env = codec.decode(payload, expect="batch")
        rx.apply(env.src, env.body)
    uplink.on_ack(rx.inbox.ack(STREAM))
    assert rx.stored_seqs() == [0, 1, 2, 3]
    assert uplink.outbox.records == 0
