"""The report: produced = covered + dropped, per device, from the ledgers and the cloud stores."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from cloud_sink.store import Store, open_store
from device_sim.ledger import Ledger
from fogline.cli import main
from fogline.codec import Batch, Record
from fogline.report import build_report, format_report, read_ledgers, size, subtract, union

# --------------------------------------------------------------------------- span arithmetic


@pytest.mark.parametrize(
    ("spans", "merged"),
    [
        ([], []),
        ([(3, 3)], [(3, 3)]),
        ([(5, 9), (0, 2)], [(0, 2), (5, 9)]),
        ([(0, 4), (5, 9)], [(0, 9)]),  # adjacent spans merge
        ([(0, 4), (6, 9)], [(0, 4), (6, 9)]),
        ([(0, 10), (2, 3), (4, 12)], [(0, 12)]),
        ([(7, 8), (0, 100), (200, 200)], [(0, 100), (200, 200)]),
    ],
)
def test_union_merges_overlapping_and_adjacent_spans(
    spans: list[tuple[int, int]], merged: list[tuple[int, int]]
) -> None:
    assert union(spans) == merged
    assert size(merged) == len({i for a, b in spans for i in range(a, b + 1)})


@pytest.mark.parametrize(
    ("spans", "minus", "left"),
    [
        ([], [(0, 5)], []),
        ([(0, 9)], [], [(0, 9)]),
        ([(0, 9)], [(0, 9)], []),
        ([(0, 9)], [(3, 5)], [(0, 2), (6, 9)]),
        ([(0, 9)], [(-5, 0), (9, 20)], [(1, 8)]),
        ([(0, 4), (10, 14)], [(3, 11)], [(0, 2), (12, 14)]),
        ([(0, 4), (10, 14)], [(5, 9)], [(0, 4), (10, 14)]),
        ([(0, 20)], [(1, 1), (3, 3), (5, 19)], [(0, 0), (2, 2), (4, 4), (20, 20)]),
        ([(0, 2), (4, 6), (8, 10)], [(1, 9)], [(0, 0), (10, 10)]),
    ],
)
def test_subtract_on_hand_made_cases(
    spans: list[tuple[int, int]], minus: list[tuple[int, int]], left: list[tuple[int, int]]
) -> None:
    assert subtract(spans, minus) == left


def _as_set(spans: list[tuple[int, int]]) -> set[int]:
    return {i for a, b in spans for i in range(a, b + 1)}


def _from_set(items: set[int]) -> list[tuple[int, int]]:
    return union((i, i) for i in items)


def _random_spans(rnd: random.Random) -> list[tuple[int, int]]:
    out = []
    for _ in range(rnd.randint(0, 8)):
        a = rnd.randint(0, 60)
        out.append((a, a + rnd.randint(0, 12)))
    return out


def test_span_arithmetic_agrees_with_python_sets() -> None:
    rnd = random.Random(20240607)
    for _ in range(500):
        a, b = _random_spans(rnd), _random_spans(rnd)
        ua, ub = union(a), union(b)
        assert ua == _from_set(_as_set(a))
        assert size(ua) == len(_as_set(a))
        assert all(x[1] + 1 < y[0] for x, y in itertools.pairwise(ua))
        left = subtract(ua, ub)
        assert left == _from_set(_as_set(a) - _as_set(b))
        assert size(left) == len(_as_set(a) - _as_set(b))


# --------------------------------------------------------------------------- build_report


def _ledger(data: Path, rows: list[tuple[str, str, int, int]], sim: str = "s0") -> None:
    ledger = Ledger(data / f"device-sim-{sim}" / "ledger.db")
    try:
        ledger.record([(d, e, n) for d, e, n, _ in rows], nbytes=sum(r[3] for r in rows))
    finally:
        ledger.close()


def _summary(device: str, first: int, last: int) -> tuple[str, dict[str, Any]]:
    return (
        "summary",
        {
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


def _event(device: str, first: int, last: int) -> tuple[str, dict[str, Any]]:
    return (
        "event",
        {
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
        },
    )


def _drop(device: str, first: int, last: int, reason: str) -> tuple[str, dict[str, Any]]:
    body = {
        "reason": reason,
        "origin": "e0",
        "records": 0,
        "kinds": {},
        "ranges": [[device, first, last]],
        "ts": 1.0,
    }
    return ("drop", body)


def _records(recs: list[tuple[str, dict[str, Any]]]) -> tuple[Record, ...]:
    return tuple(Record(seq=i, kind=k, body=b) for i, (k, b) in enumerate(recs))


def _cloud(
    data: Path, recs: list[tuple[str, dict[str, Any]]], cloud: str = "c0", stream: str = "f0"
) -> None:
    store = Store(data / f"cloud-{cloud}" / "cloud.db")
    try:
        store.apply([(stream, Batch(low=0, records=_records(recs)))], now=1.0)
    finally:
        store.close()


KEYS = {
    "produced",
    "covered",
    "dropped",
    "unaccounted",
    "duplicates",
    "devices",
    "events",
    "rejected_records",
    "bytes",
    "stores",
    "unaccounted_devices",
}


def test_full_coverage_has_nothing_unaccounted(tmp_path: Path) -> None:
    _ledger(tmp_path, [("d0", "e0", 30, 1200), ("d1", "e0", 10, 400)])
    _ledger(tmp_path, [("d0", "e0", 20, 800)])  # a second round of messages
    _cloud(
        tmp_path,
        [
            _summary("d0", 0, 24),
            _summary("d0", 25, 49),
            _event("d0", 20, 29),
            _summary("d1", 0, 9),
        ],
    )
    rep = build_report(tmp_path)
    assert set(rep) == KEYS
    assert rep["produced"] == 60
    assert rep["covered"] == 60
    assert rep["dropped"] == {}
    assert rep["unaccounted"] == 0
    assert rep["duplicates"] == 0
    assert rep["devices"] == 2
    assert rep["events"] == 1
    assert rep["rejected_records"] == 0
    assert rep["unaccounted_devices"] == []
    assert rep["stores"] == [str(tmp_path / "cloud-c0" / "cloud.db")]
    text = format_report(rep)
    assert "LOSS" not in text
    assert "accounted for" in text


def test_a_missing_summary_is_unaccounted_and_names_the_device(tmp_path: Path) -> None:
    _ledger(tmp_path, [("d0", "e0", 30, 0), ("d1", "e0", 30, 0)])
    _cloud(
        tmp_path,
        [_summary("d0", 0, 9), _summary("d0", 20, 29), _summary("d1", 0, 29)],
    )
    rep = build_report(tmp_path)
    assert rep["produced"] == 60
    assert rep["covered"] == 50
    assert rep["unaccounted"] == 10
    assert [d["device"] for d in rep["unaccounted_devices"]] == ["d0"]
    (loss,) = rep["unaccounted_devices"]
    assert (loss["produced"], loss["covered"], loss["dropped"]) == (30, 20, 0)
    text = format_report(rep)
    assert "LOSS" in text
    assert "d0" in text


def test_a_gap_drop_accounts_for_the_missing_readings(tmp_path: Path) -> None:
    _ledger(tmp_path, [("d0", "e0", 30, 0)])
    _cloud(
        tmp_path,
        [_summary("d0", 0, 9), _drop("d0", 10, 16, "gap"), _summary("d0", 17, 29)],
    )
    rep = build_report(tmp_path)
    assert rep["dropped"] == {"gap": 7}
    assert rep["covered"] == 23
    assert rep["unaccounted"] == 0
    assert rep["unaccounted_devices"] == []
    assert "gap 7" in format_report(rep)


def test_a_drop_overlapping_a_stored_summary_counts_only_the_uncovered_part(
    tmp_path: Path,
) -> None:
    _ledger(tmp_path, [("d0", "e0", 30, 0)])
    _cloud(tmp_path, [_summary("d0", 0, 19), _drop("d0", 15, 29, "outbox_full")])
    rep = build_report(tmp_path)
    assert rep["covered"] == 20
    assert rep["dropped"] == {"outbox_full": 10}
    assert rep["unaccounted"] == 0


def test_overlapping_drops_count_each_reading_once(tmp_path: Path) -> None:
    _ledger(tmp_path, [("d0", "e0", 30, 0)])
    _cloud(
        tmp_path,
        [
            _summary("d0", 0, 19),
            _drop("d0", 15, 24, "outbox_full"),
            _drop("d0", 22, 29, "non_finite"),
            _drop("d0", 20, 21, "outbox_full"),
        ],
    )
    rep = build_report(tmp_path)
    assert sum(rep["dropped"].values()) == 10
    assert set(rep["dropped"]) == {"non_finite", "outbox_full"}
    assert rep["unaccounted"] == 0


def test_overlapping_summaries_are_counted_as_duplicates(tmp_path: Path) -> None:
    _ledger(tmp_path, [("d0", "e0", 30, 0)])
    _cloud(tmp_path, [_summary("d0", 0, 19), _summary("d0", 15, 29)])
    rep = build_report(tmp_path)
    assert rep["duplicates"] == 5
    assert rep["covered"] == 30
    assert rep["unaccounted"] == 0


def test_duplicate_events_are_counted(tmp_path: Path) -> None:
    _ledger(tmp_path, [("d0", "e0", 20, 0)])
    _cloud(
        tmp_path,
        [
            _summary("d0", 0, 19),
            _event("d0", 0, 9),
            _event("d0", 0, 9),
            _event("d0", 0, 9),
            _event("d0", 10, 19),
        ],
    )
    rep = build_report(tmp_path)
    assert rep["events"] == 4
    assert rep["duplicates"] == 2
    assert rep["unaccounted"] == 0


def test_device_edge_bytes_are_the_ledger_bytes(tmp_path: Path) -> None:
    _ledger(tmp_path, [("d0", "e0", 10, 1000), ("d1", "e0", 10, 234)])
    _ledger(tmp_path, [("d0", "e0", 10, 500)])
    _ledger(tmp_path, [("d7", "e1", 5, 66)], sim="s1")
    assert read_ledgers(tmp_path) == (
        {"d0": ("e0", 20), "d1": ("e0", 10), "d7": ("e1", 5)},
        1800,
    )
    rep = build_report(tmp_path)
    assert rep["bytes"]["device_edge"] == 1800
    assert rep["produced"] == 35
    assert rep["devices"] == 3
    assert rep["unaccounted"] == 35


def test_rejected_records_of_every_store_are_counted(tmp_path: Path) -> None:
    _ledger(tmp_path, [("d0", "e0", 20, 0)])
    bad = ("summary", {"device": "d0"})
    _cloud(tmp_path, [_summary("d0", 0, 9), bad], cloud="c0")
    _cloud(tmp_path, [_summary("d0", 10, 19), bad, bad], cloud="c1")
    rep = build_report(tmp_path)
    assert rep["unaccounted"] == 0
    assert len(rep["stores"]) == 2
    assert rep["rejected_records"] == 3


@pytest.mark.postgres
def test_a_postgresql_store_is_reported_like_an_sqlite_one(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    recs = [
        _summary("d0", 0, 9), _drop("d0", 10, 16, "gap"), _summary("d0", 17, 29),
        _event("d0", 20, 29), _event("d0", 20, 29), ("summary", {"device": "d0"}),
    ]  # fmt: skip
    lite, pg = tmp_path / "lite", tmp_path / "pg"
    for data in (lite, pg):
        _ledger(data, [("d0", "e0", 30, 0), ("d1", "e0", 5, 0)])
    _cloud(lite, recs)
    store = open_store(pg_url)
    try:
        store.apply([("f0", Batch(low=0, records=_records(recs)))], now=1.0)
    finally:
        store.close()
    want = build_report(lite)
    got = build_report(pg, [pg_url])
    assert got["stores"] == [pg_url]  # no password in it to hide
    assert {k: v for k, v in got.items() if k != "stores"} == {
        k: v for k, v in want.items() if k != "stores"
    }
    assert (got["unaccounted"], got["duplicates"], got["rejected_records"]) == (5, 1, 1)

    assert main(["report", "--data-dir", str(pg), "--store", pg_url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["unaccounted"] == 5
    assert main(["report", "--data-dir", str(pg), "--store", "/tmp/cloud.db"]) == 2
    assert "not a postgresql:// URL" in capsys.readouterr().err


def test_an_empty_data_dir_reports_nothing_produced(tmp_path: Path) -> None:
    rep = build_report(tmp_path)
    assert set(rep) == KEYS
    assert rep["produced"] == 0
    assert rep["covered"] == 0
    assert rep["dropped"] == {}
    assert rep["unaccounted"] == 0
    assert rep["duplicates"] == 0
    assert rep["devices"] == 0
    assert rep["bytes"] == {"device_edge": 0, "edge_fog": 0, "fog_cloud": 0}
    assert rep["stores"] == []
    assert rep["unaccounted_devices"] == []
    text = format_report(rep)
    assert "LOSS" not in text
    assert "produced     0" in text


def test_a_round_counts_only_the_registered_devices(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "device-sim-s0" / "ledger.db")
    try:
        ledger.register([("d0", "e0"), ("d1", "e1")])
        ledger.record_round(10, nbytes=700)
        ledger.register([("d1", "e1"), ("d2", "e0")])  # the fleet changed between runs
        ledger.record_round(5, nbytes=300)
    finally:
        ledger.close()
    produced, nbytes = read_ledgers(tmp_path)
    assert produced == {"d0": ("e0", 10), "d1": ("e1", 15), "d2": ("e0", 5)}
    assert nbytes == 1000
