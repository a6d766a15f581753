"""The cloud store: every valid record is stored once, every invalid one is kept as rejected."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cloud_sink import store as store_module
from cloud_sink.store import Store
from fogline.codec import Batch, Record

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


def _counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("summaries", "events", "drops", "drop_ranges", "rollups", "rejected")
        }
    finally:
        conn.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cloud-c0" / "cloud.db"


@pytest.fixture
def store(path: Path) -> Any:
    s = Store(path)
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


def test_apply_stores_every_kind_of_record(store: Store, path: Path) -> None:
    counts = store.apply([(STREAM, _full_batch())], now=100.0)
    assert counts["summary"] == 2
    assert counts["event"] == 1
    assert counts["drop"] == 1
    assert counts["rollup"] == 1
    assert counts["readings"] == 20
    assert counts["rejected"] == 0
    assert _counts(path) == {
        "summaries": 2,
        "events": 1,
        "drops": 1,
        "drop_ranges": 2,
        "rollups": 1,
        "rejected": 0,
    }

    conn = sqlite3.connect(path)
    rows = conn.execute(
        "SELECT src, seq, device, first, last, count, mean, stored FROM summaries ORDER BY first"
    ).fetchall()
    assert rows == [
        (STREAM, 0, "d0", 0, 9, 10, "[1.0, 50.0]", 100.0),
        (STREAM, 4, "d0", 15, 24, 10, "[1.0, 50.0]", 100.0),
    ]
    assert conn.execute("SELECT device, first, last, field, z FROM events").fetchall() == [
        ("d0", 0, 9, "temp", 12.5)
    ]
    assert conn.execute("SELECT seq, origin, reason FROM drops").fetchall() == [(2, "e0", "gap")]
    assert conn.execute(
        "SELECT device, first, last, reason FROM drop_ranges ORDER BY device"
    ).fetchall() == [("d0", 10, 14, "gap"), ("d1", 0, 2, "gap")]
    assert conn.execute("SELECT fog, edge, readings, dropped FROM rollups").fetchall() == [
        ("f0", "e0", 10, 5)
    ]
    conn.close()
    assert store.inbox.ack(STREAM).hwm == 4


def test_applying_the_same_batch_twice_stores_nothing_new(store: Store, path: Path) -> None:
    batch = _full_batch()
    store.apply([(STREAM, batch)], now=1.0)
    before = _counts(path)
    again = store.apply([(STREAM, batch)], now=2.0)
    assert again["summary"] == again["event"] == again["drop"] == again["rollup"] == 0
    assert again["readings"] == 0
    assert _counts(path) == before
    ack = store.inbox.ack(STREAM)
    assert (ack.hwm, ack.ranges) == (4, ())

    # The same batch twice within one apply, and a batch that only partly repeats.
    tail = Batch(low=4, records=(batch.records[4],))
    more = _batch(("summary", _summary("d0", 25, 29)), ("event", _event("d0", 25, 29)), start=5)
    counts = store.apply([(STREAM, tail), (STREAM, more), (STREAM, more)], now=3.0)
    assert (counts["summary"], counts["event"]) == (1, 1)
    after = _counts(path)
    assert (after["summaries"], after["events"]) == (before["summaries"] + 1, before["events"] + 1)
    assert store.inbox.ack(STREAM).hwm == 6


def test_streams_are_independent(store: Store, path: Path) -> None:
    store.apply([("fog-f0", _batch(("summary", _summary("d0", 0, 9))))], now=1.0)
    store.apply([("fog-f1", _batch(("summary", _summary("d5", 0, 9))))], now=1.0)
    assert _counts(path)["summaries"] == 2
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
    store: Store, path: Path, case: str
) -> None:
    kind, body = INVALID[case]
    batch = _batch(("summary", _summary("d0", 0, 9)), (kind, body), ("event", _event("d0", 0, 9)))
    counts = store.apply([(STREAM, batch)], now=5.0)
    assert counts["rejected"] == 1
    assert _counts(path) | {"drops": 0, "drop_ranges": 0, "rollups": 0} == {
        "summaries": 1,
        "events": 1,
        "drops": 0,
        "drop_ranges": 0,
        "rollups": 0,
        "rejected": 1,
    }
    conn = sqlite3.connect(path)
    ((src, seq, rkind, reason, stored),) = conn.execute(
        "SELECT src, seq, kind, reason, stored FROM rejected"
    ).fetchall()
    conn.close()
    assert (src, seq, rkind, stored) == (STREAM, 1, kind, 5.0)
    assert reason
    assert store.inbox.ack(STREAM).hwm == 2

    # A re-send does not make it valid and does not store it twice.
    store.apply([(STREAM, batch)], now=6.0)
    assert _counts(path)["rejected"] == 1
    assert _counts(path)["summaries"] == 1


def test_a_drop_with_an_invalid_range_stores_none_of_its_ranges(store: Store, path: Path) -> None:
    batch = _batch(("drop", _drop([["d0", 0, 4], ["d1", 9, 0]])))
    assert store.apply([(STREAM, batch)])["rejected"] == 1
    counts = _counts(path)
    assert (counts["drops"], counts["drop_ranges"], counts["rejected"]) == (0, 0, 1)


def test_a_crash_between_apply_and_ack_does_not_duplicate(path: Path) -> None:
    batch = _full_batch()
    first = Store(path)
    first.apply([(STREAM, batch)], now=1.0)
    first.close()  # the process dies before publishing the ack; the fog re-sends everything
    before = _counts(path)

    second = Store(path)
    try:
        again = second.apply([(STREAM, batch)], now=2.0)
        assert again["rejected"] == 0
        assert again["readings"] == 0
        assert _counts(path) == before
        assert second.inbox.ack(STREAM).hwm == 4
    finally:
        second.close()


def test_the_schema_and_the_data_survive_reopening(path: Path) -> None:
    s = Store(path)
    s.apply([(STREAM, _full_batch())], now=1.0)
    s.close()
    for _ in range(2):
        s = Store(path)
        s.close()
    conn = sqlite3.connect(path)
    try:
        versions = dict(conn.execute("SELECT component, version FROM schema_migrations"))
        assert versions["cloud"] == len(store_module._MIGRATIONS)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"summaries", "events", "drops", "drop_ranges", "rollups", "rejected"} <= tables
    finally:
        conn.close()
    assert _counts(path)["summaries"] == 2

    s = Store(path)
    try:
        more = _batch(("summary", _summary("d0", 25, 34)), start=5)
        assert s.apply([(STREAM, more)])["summary"] == 1
        assert _counts(path)["summaries"] == 3
    finally:
        s.close()
