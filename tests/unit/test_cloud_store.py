"""The cloud store: every valid record is stored once, every invalid one is kept as rejected.

Every test runs on SQLite and on PostgreSQL (`store_at`, see tests/conftest.py)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sink import store as store_module
from cloud_sink.store import CloudStore
from fogline.codec import Ack, Batch, Record
from tests.conftest import StoreUnderTest

STREAM = "fog-f0"


def _summary(device: str = "d0", first: int = 0, last: int = 9, **over: Any) -> dict[str, Any]:
    body = {
        "edge": "e0",
        "device": device,
        "first": first,
        "last": last,
        "count": last - first + 1,
        "t0": 1.0,
        "t1": 2.0,
        "fields": ["vib", "temp"],
        "min": [0.5, 40.0],
        "mean": [1.0, 50.0],
        "max": [1.5, 60.0],
        "std": [0.1, 2.0],
        "events": 1,
    }
    body.update(over)
    return body


def _event(device: str = "d0", first: int = 0, last: int = 9, **over: Any) -> dict[str, Any]:
    body = {
        "edge": "e0",
        "device": device,
        "first": first,
        "last": last,
        "count": last - first + 1,
        "ts": 3.0,
        "kind": "zscore",
        "field": "temp",
        "value": 90.0,
        "baseline": 50.0,
        "z": 12.5,
    }
    body.update(over)
    return body


def _drop(ranges: list[list[Any]], reason: str = "gap", **over: Any) -> dict[str, Any]:
    body = {
        "reason": reason,
        "origin": "e0",
        "records": 0,
        "kinds": {},
        "ranges": ranges,
        "ts": 4.0,
    }
    body.update(over)
    return body


def _rollup(**over: Any) -> dict[str, Any]:
    body = {
        "fog": "f0",
        "edge": "e0",
        "t0": 0.0,
        "t1": 60.0,
        "readings": 10,
        "summaries": 1,
        "events": 1,
        "dropped": 5,
        "devices": 1,
    }
    body.update(over)
    return body


def _batch(*recs: tuple[str, dict[str, Any]], start: int = 0, low: int | None = None) -> Batch:
    records = tuple(Record(seq=start + i, kind=k, body=b) for i, (k, b) in enumerate(recs))
    return Batch(low=start if low is None else low, records=records)


def _counts(at: StoreUnderTest) -> dict[str, int]:
    return {
        t: at.rows(f"SELECT count(*) FROM {t}")[0][0]
        for t in ("summaries", "events", "drops", "drop_ranges", "rollups", "rejected")
    }


@pytest.fixture
def store(store_at: StoreUnderTest) -> Iterator[CloudStore]:
    s = store_at.open()
    yield s
    s.close()


def _full_batch() -> Batch:
    return _batch(
        ("summary", _summary("d0", 0, 9)),
        ("event", _event("d0", 0, 9)),
        ("drop", _drop([["d0", 10, 14], ["d1", 0, 2]])),
        ("rollup", _rollup()),
        ("summary", _summary("d0", 15, 24)),
    )


def test_apply_stores_every_kind_of_record(store: CloudStore, store_at: StoreUnderTest) -> None:
    counts = store.apply([(STREAM, _full_batch())], now=100.0)
    assert counts["summary"] == 2
    assert counts["event"] == 1
    assert counts["drop"] == 1
    assert counts["rollup"] == 1
    assert counts["readings"] == 20
    assert counts["rejected"] == 0
    assert _counts(store_at) == {
        "summaries": 2,
        "events": 1,
        "drops": 1,
        "drop_ranges": 2,
        "rollups": 1,
        "rejected": 0,
    }

    rows = store_at.rows(
        "SELECT src, seq, device, first, last, count, mean, stored FROM summaries ORDER BY first"
    )
    assert rows == [
        (STREAM, 0, "d0", 0, 9, 10, "[1.0, 50.0]", 100.0),
        (STREAM, 4, "d0", 15, 24, 10, "[1.0, 50.0]", 100.0),
    ]
    assert store_at.rows("SELECT device, first, last, field, z FROM events") == [
        ("d0", 0, 9, "temp", 12.5)
    ]
    assert store_at.rows("SELECT seq, origin, reason FROM drops") == [(2, "e0", "gap")]
    assert store_at.rows("SELECT device, first, last, reason FROM drop_ranges ORDER BY device") == [
        ("d0", 10, 14, "gap"),
        ("d1", 0, 2, "gap"),
    ]
    assert store_at.rows("SELECT fog, edge, readings, dropped FROM rollups") == [
        ("f0", "e0", 10, 5)
    ]
    assert store.inbox.ack(STREAM).hwm == 4


def test_applying_the_same_batch_twice_stores_nothing_new(
    store: CloudStore, store_at: StoreUnderTest
) -> None:
    batch = _full_batch()
    store.apply([(STREAM, batch)], now=1.0)
    before = _counts(store_at)
    again = store.apply([(STREAM, batch)], now=2.0)
    assert again["summary"] == again["event"] == again["drop"] == again["rollup"] == 0
    assert again["readings"] == 0
    assert _counts(store_at) == before
    ack = store.inbox.ack(STREAM)
    assert (ack.hwm, ack.ranges) == (4, ())

    # The same batch twice within one apply, and a batch that only partly repeats.
    tail = Batch(low=4, records=(batch.records[4],))
    more = _batch(("summary", _summary("d0", 25, 29)), ("event", _event("d0", 25, 29)), start=5)
    counts = store.apply([(STREAM, tail), (STREAM, more), (STREAM, more)], now=3.0)
    assert (counts["summary"], counts["event"]) == (1, 1)
    after = _counts(store_at)
    assert (after["summaries"], after["events"]) == (before["summaries"] + 1, before["events"] + 1)
    assert store.inbox.ack(STREAM).hwm == 6


def test_streams_are_independent(store: CloudStore, store_at: StoreUnderTest) -> None:
    store.apply([("fog-f0", _batch(("summary", _summary("d0", 0, 9))))], now=1.0)
    store.apply([("fog-f1", _batch(("summary", _summary("d5", 0, 9))))], now=1.0)
    assert _counts(store_at)["summaries"] == 2
    assert store.inbox.ack("fog-f0").hwm == 0
    assert store.inbox.ack("fog-f1").hwm == 0


INVALID = {
    "missing_device": ("summary", {k: v for k, v in _summary().items() if k != "device"}),
    "missing_first": ("event", {k: v for k, v in _event().items() if k != "first"}),
    "missing_stats": ("summary", {k: v for k, v in _summary().items() if k != "mean"}),
    "missing_reason": ("drop", {k: v for k, v in _drop([["d0", 0, 1]]).items() if k != "reason"}),
    "missing_readings": ("rollup", {k: v for k, v in _rollup().items() if k != "readings"}),
    "str_first": ("summary", {**_summary(), "first": "0"}),
    "float_count": ("event", _event(count=10.0)),
    "bool_events": ("summary", _summary(events=True)),
    "negative_first": ("summary", {**_summary(), "first": -1, "count": 11}),
    "list_device": ("event", {**_event(), "device": ["d0"]}),
    "stats_not_list": ("summary", _summary(min=0.5)),
    "ranges_not_list": ("drop", _drop("d0:0-9")),  # type: ignore[arg-type]
    "range_short": ("drop", _drop([["d0", 0]])),
    "range_reversed": ("drop", _drop([["d0", 9, 0]])),
    "range_str_bounds": ("drop", _drop([["d0", "0", "9"]])),
    "nan_t0": ("summary", _summary(t0=float("nan"))),
    "inf_value": ("event", _event(value=float("inf"))),
    "nan_z": ("event", _event(z=float("nan"))),
    "nan_rollup_t1": ("rollup", _rollup(t1=float("nan"))),
    "first_after_last": ("summary", {**_summary(), "first": 9, "last": 0, "count": 10}),
    "count_mismatch": ("event", _event(count=11)),
    "unknown_kind": ("tele", {"device": "d0"}),
    "unknown_kind_2": ("ack", {}),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_record_is_rejected_with_a_reason_and_acknowledged(
    store: CloudStore, store_at: StoreUnderTest, case: str
) -> None:
    kind, body = INVALID[case]
    batch = _batch(("summary", _summary("d0", 0, 9)), (kind, body), ("event", _event("d0", 0, 9)))
    counts = store.apply([(STREAM, batch)], now=5.0)
    assert counts["rejected"] == 1
    assert _counts(store_at) | {"drops": 0, "drop_ranges": 0, "rollups": 0} == {
        "summaries": 1,
        "events": 1,
        "drops": 0,
        "drop_ranges": 0,
        "rollups": 0,
        "rejected": 1,
    }
    ((src, seq, rkind, reason, stored),) = store_at.rows(
        "SELECT src, seq, kind, reason, stored FROM rejected"
    )
    assert (src, seq, rkind, stored) == (STREAM, 1, kind, 5.0)
    assert reason
    assert store.inbox.ack(STREAM).hwm == 2

    # A re-send does not make it valid and does not store it twice.
    store.apply([(STREAM, batch)], now=6.0)
    assert _counts(store_at)["rejected"] == 1
    assert _counts(store_at)["summaries"] == 1


def test_a_drop_with_an_invalid_range_stores_none_of_its_ranges(
    store: CloudStore, store_at: StoreUnderTest
) -> None:
    batch = _batch(("drop", _drop([["d0", 0, 4], ["d1", 9, 0]])))
    assert store.apply([(STREAM, batch)])["rejected"] == 1
    counts = _counts(store_at)
    assert (counts["drops"], counts["drop_ranges"], counts["rejected"]) == (0, 0, 1)


def test_a_crash_between_apply_and_ack_does_not_duplicate(store_at: StoreUnderTest) -> None:
    batch = _full_batch()
    first = store_at.open()
    first.apply([(STREAM, batch)], now=1.0)
    first.close()  # the process dies before publishing the ack; the fog re-sends everything
    before = _counts(store_at)

    second = store_at.open()
    try:
        again = second.apply([(STREAM, batch)], now=2.0)
        assert again["rejected"] == 0
        assert again["readings"] == 0
        assert _counts(store_at) == before
        assert second.inbox.ack(STREAM).hwm == 4
    finally:
        second.close()


def test_the_schema_and_the_data_survive_reopening(store_at: StoreUnderTest) -> None:
    s = store_at.open()
    s.apply([(STREAM, _full_batch())], now=1.0)
    s.close()
    for _ in range(2):
        s = store_at.open()
        s.close()
    versions = dict(store_at.rows("SELECT component, version FROM schema_migrations"))
    assert versions["cloud"] == len(store_module.MIGRATIONS)
    assert {"summaries", "events", "drops", "drop_ranges", "rollups", "rejected", "inbox"} <= (
        store_at.tables()
    )
    assert _counts(store_at)["summaries"] == 2

    s = store_at.open()
    try:
        more = _batch(("summary", _summary("d0", 25, 34)), start=5)
        assert s.apply([(STREAM, more)])["summary"] == 1
        assert _counts(store_at)["summaries"] == 3
    finally:
        s.close()


def test_large_numbers_and_nul_characters_are_rejected_on_both_stores(
    store: CloudStore, store_at: StoreUnderTest
) -> None:
    # Neither store can hold an integer of 2**63 or more; PostgreSQL text cannot hold NUL.
    batch = _batch(
        ("drop", _drop([["d0", 0, 2**63]])),
        ("summary", _summary("d\x000")),
        ("drop", _drop([["d\x00", 0, 1]])),
        ("model", {"fog": "f0", "name": "anomaly", "version": 2, "event": "x", "detail": "\x00"}),
        ("no\x00such", {}),
        ("summary", _summary("d0", 0, 9)),
    )
    counts = store.apply([(STREAM, batch)], now=1.0)
    assert (counts["rejected"], counts["summary"]) == (5, 1)
    kinds = sorted(r[0] for r in store_at.rows("SELECT kind FROM rejected"))
    assert kinds == ["drop", "drop", "model", "no\\x00such", "summary"]


def test_model_events_with_evidence_are_stored_on_both_stores(
    store: CloudStore, store_at: StoreUnderTest
) -> None:
    evidence = bytes(range(256))
    model = _event(
        kind="model", status="warning", score=0.9, threshold=0.5, fault="bearing_wear",
        confidence=0.93, hours_to_failure=12.5, recommendation="replace the bearing",
        escalated=True, verdict_by="fog", unconfirmed=False, model="anomaly@1",
        evidence=evidence, repeats=3,
    )  # fmt: skip
    rollout = {"fog": "f0", "name": "anomaly", "version": 2, "event": "canary", "ts": 5.0}
    counts = store.apply([(STREAM, _batch(("event", model), ("model", rollout)))], now=1.0)
    assert (counts["event"], counts["model"], counts["rejected"]) == (1, 1, 0)
    ((ev, esc, unc, fault, hours, repeats),) = store_at.rows(
        "SELECT evidence, escalated, unconfirmed, fault, hours_to_failure, repeats FROM events"
    )
    assert (bytes(ev), esc, unc, fault, hours, repeats) == (evidence, 1, 0, "bearing_wear", 12.5, 3)
    assert store_at.rows("SELECT name, version, event, ts FROM model_events") == [
        ("anomaly", 2, "canary", 5.0)
    ]


@pytest.mark.postgres
def test_both_stores_have_the_same_tables_and_columns(tmp_path: Path, pg_url: str) -> None:
    # One schema, written once in SQLite's dialect and translated: nothing may drift.
    lite = StoreUnderTest("sqlite", tmp_path / "cloud.db")
    pg = StoreUnderTest("postgres", pg_url)
    for at in (lite, pg):
        at.open().close()
    assert lite.tables() == pg.tables()
    types = {"TEXT": "text", "INTEGER": "bigint", "REAL": "double precision", "BLOB": "bytea"}
    for table in sorted(lite.tables()):
        want = [(r[1], types[r[2]], bool(r[3])) for r in lite.rows(f"PRAGMA table_info({table})")]
        got = pg.rows(
            "SELECT column_name, data_type, is_nullable = 'NO' FROM information_schema.columns"
            f" WHERE table_schema = current_schema() AND table_name = '{table}'"
            " ORDER BY ordinal_position"
        )
        # SQLite reports NOT NULL only where declared; PostgreSQL also for key columns.
        keys = {r[1] for r in lite.rows(f"PRAGMA table_info({table})") if r[5]}
        assert [(c, t, n or c in keys) for c, t, n in want] == got, table


# ----------------------------------------------------------------------------- several workers


def _stream_batches(stream_seqs: int, size: int, rng: random.Random) -> list[Batch]:
    """Batches of one stream as a fog might send them: in order, some re-sent, some re-cut."""
    batches = [
        _batch(
            *(("summary", _summary("d0", 10 * s, 10 * s + 9)) for s in range(i, i + size)),
            start=i,
            low=0,
        )
        for i in range(0, stream_seqs, size)
    ]
    resent = rng.sample(batches, len(batches) // 3)
    recut = [
        Batch(low=0, records=b.records[len(b.records) // 2 :] + c.records[:3])
        for b, c in itertools.pairwise(batches)
        if rng.random() < 0.3
    ]
    return batches + resent + recut


def _slowed(insert: Callable[[str, list[dict[str, Any]]], None]) -> Any:
    def slow(table: str, rows: list[dict[str, Any]]) -> None:
        time.sleep(0.002)
        insert(table, rows)

    return slow


def test_two_workers_applying_one_stream_out_of_order_and_at_once_store_each_record_once(
    store_at: StoreUnderTest,
) -> None:
    """Custody with parallel sinks: any worker may get any batch of any stream, in any order,
    at the same time as another; each record is stored once and every ack a worker reads after
    its commit covers what it committed."""
    rng = random.Random(7)
    per_stream = 600
    work = [(s, b) for s in ("f0", "f1", "f2") for b in _stream_batches(per_stream, 20, rng)]
    rng.shuffle(work)
    stores = [store_at.open(), store_at.open()]
    for s in stores:  # a slower insert widens the window in which the two could interleave
        s._insert = _slowed(s._insert)  # type: ignore[method-assign]
    acks: list[list[tuple[set[int], set[int]]]] = [[], []]
    errors: list[BaseException] = []

    def seen(ack: Ack) -> set[int]:
        return set(range(ack.hwm + 1)).union(*(range(lo, hi + 1) for lo, hi in ack.ranges))

    def worker(k: int) -> None:
        try:
            mine = work[k::2]
            for i in range(0, len(mine), 3):  # a few batches, maybe of several streams, at once
                group = mine[i : i + 3]
                stores[k].apply(group, now=1.0)
                for stream, batch in group:
                    acks[k].append(
                        ({r.seq for r in batch.records}, seen(stores[k].inbox.ack(stream)))
                    )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for s in stores:
        s.close()
    assert not errors, errors
    assert all(applied <= acked for k in (0, 1) for applied, acked in acks[k])
    assert len(acks[0]) + len(acks[1]) == len(work)
    rows = store_at.rows("SELECT src, seq FROM summaries")
    assert len(rows) == len(set(rows)) == 3 * per_stream
    final = store_at.open()
    try:
        for stream in ("f0", "f1", "f2"):
            ack = final.inbox.ack(stream)
            assert (ack.hwm, ack.ranges) == (per_stream - 1, ())
    finally:
        final.close()


@pytest.mark.postgres
def test_a_postgresql_store_reconnects_when_its_connection_is_cut(pg_url: str) -> None:
    import psycopg

    at = StoreUnderTest("postgres", pg_url)
    store = at.open()
    try:
        store.apply([(STREAM, _batch(("summary", _summary("d0", 0, 9))))], now=1.0)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'fogline-cloud-sink'"
            )
        more = _batch(("summary", _summary("d0", 0, 9)), ("summary", _summary("d0", 10, 19)))
        assert store.apply([(STREAM, more)], now=2.0)["summary"] == 1
        assert store.inbox.ack(STREAM).hwm == 1
    finally:
        store.close()
    assert _counts(at)["summaries"] == 2


def test_the_publish_times_of_committed_events_are_kept_for_the_commit_latency(
    store: CloudStore,
) -> None:
    batch = _batch(
        ("event", _event("d0", 0, 9, published=1000.5)),
        ("event", _event("d1", 0, 9)),  # an older edge: no publish time
        ("summary", _summary("d0", 0, 9)),
    )
    store.apply([("f0", batch)])
    assert store.published == [1000.5]
    store.apply([("f0", batch)])  # redelivered: nothing committed, nothing to time
    assert store.published == []
