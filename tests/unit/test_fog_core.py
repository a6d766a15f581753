"""The fog core: which records go up, and the per-site rollup the cloud stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud_sink.store import Store
from fog_aggregator.core import rollup_body, split, tally
from fogline.codec import Batch, Record


def _summary(seq: int, device: str, first: int, last: int) -> Record:
    return Record(
        seq=seq,
        kind="summary",
        body={
            "edge": "e0",
            "device": device,
            "first": first,
            "last": last,
            "count": last - first + 1,
            "t0": 0.0,
            "t1": 1.0,
            "fields": ["a"],
            "min": [0.0],
            "mean": [1.0],
            "max": [2.0],
            "std": [0.5],
            "events": 0,
        },
    )


def _event(seq: int, device: str, first: int, last: int) -> Record:
    body = {
        "edge": "e0",
        "device": device,
        "first": first,
        "last": last,
        "count": last - first + 1,
        "ts": 1.0,
        "kind": "zscore",
        "field": "a",
        "value": 9.0,
        "baseline": 1.0,
        "z": 8.0,
    }
    return Record(seq=seq, kind="event", body=body)


def _drop(seq: int, ranges: list[list[Any]], reason: str = "gap") -> Record:
    body = {"reason": reason, "origin": "e0", "records": 0, "kinds": {}, "ranges": ranges, "ts": 1}
    return Record(seq=seq, kind="drop", body=body)


def test_split_keeps_forwardable_records_in_order_and_separates_unknown_kinds() -> None:
    recs = [
        _summary(0, "d0", 0, 9),
        Record(seq=1, kind="tele", body={}),
        _event(2, "d0", 0, 9),
        _drop(3, [["d0", 10, 19]]),
        Record(seq=4, kind="rollup", body={}),
        Record(seq=5, kind="", body={}),
        Record(seq=6, kind="train", body={}),
    ]
    ok, kept, bad = split(recs)
    assert [r.seq for r in ok] == [0, 2, 3]
    assert [r.seq for r in kept] == [6]
    assert [r.seq for r in bad] == [1, 4, 5]
    assert split([]) == ([], [], [])


def test_tally_counts_readings_summaries_events_dropped_readings_and_devices() -> None:
    by_site = {
        "e0": [
            _summary(0, "d0", 0, 9),
            _summary(1, "d1", 0, 19),
            _event(2, "d0", 0, 9),
            _drop(3, [["d0", 10, 14], ["d1", 20, 20]]),
            _drop(4, [["d2", 0, 99]], reason="non_finite"),
            _summary(5, "d0", 15, 24),
        ],
        "e1": [_event(0, "d9", 5, 24)],
        "e2": [],
    }
    t = tally(by_site)
    e0 = t["e0"]
    assert (e0.readings, e0.summaries, e0.events, e0.dropped) == (40, 3, 1, 106)
    assert e0.devices == {"d0", "d1"}
    e1 = t["e1"]
    assert (e1.readings, e1.summaries, e1.events, e1.dropped) == (0, 0, 1, 0)
    assert e1.devices == {"d9"}
    assert "e2" not in t or (t["e2"].readings, t["e2"].summaries) == (0, 0)


def test_rollup_body_carries_the_site_the_interval_and_the_tally() -> None:
    row = {"readings": 40, "summaries": 3, "events": 1, "dropped": 106, "devices": 2}
    body = rollup_body("f0", "e0", 10.0, 70.0, row)
    assert body == {"fog": "f0", "edge": "e0", "t0": 10.0, "t1": 70.0, **row}


def test_a_rollup_built_from_a_tally_is_stored_by_the_cloud(tmp_path: Path) -> None:
    t = tally({"e0": [_summary(0, "d0", 0, 9), _event(1, "d0", 0, 9), _drop(2, [["d1", 0, 4]])]})[
        "e0"
    ]
    row = {
        "readings": t.readings,
        "summaries": t.summaries,
        "events": t.events,
        "dropped": t.dropped,
        "devices": len(t.devices),
    }
    store = Store(tmp_path / "cloud.db")
    try:
        rec = Record(seq=0, kind="rollup", body=rollup_body("f0", "e0", 0.0, 60.0, row))
        counts = store.apply([("f0", Batch(low=0, records=(rec,)))], now=1.0)
        assert counts["rollup"] == 1
        stored = list(store.db["rollups"].rows)
        assert len(stored) == 1
        got = stored[0]
        assert (got["fog"], got["edge"], got["t0"], got["t1"]) == ("f0", "e0", 0.0, 60.0)
        assert (got["readings"], got["summaries"], got["events"], got["dropped"]) == (10, 1, 1, 5)
        assert got["devices"] == 1
        assert list(store.db["rejected"].rows) == []
    finally:
        store.close()
