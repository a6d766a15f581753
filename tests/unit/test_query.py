"""`fogline query`: each query over a hand-made data dir, its filters, order and output formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from cloud_sink.store import open_store
from device_sim.ledger import Ledger
from fogline import query
from fogline.cli import main
from fogline.codec import Batch, Record
from fogline.report import build_report

T0 = 1_717_243_200.0  # 2024-06-01T12:00:00Z


def _ledger(data: Path, rows: list[tuple[str, str, int]]) -> None:
    ledger = Ledger(data / "device-sim-s0" / "ledger.db")
    try:
        ledger.record(rows, nbytes=100 * len(rows))
    finally:
        ledger.close()


def _summary(device: str, first: int, last: int, edge: str = "e0") -> tuple[str, dict[str, Any]]:
    body = {
        "edge": edge, "device": device, "first": first, "last": last, "count": last - first + 1,
        "t0": T0 + first, "t1": T0 + last, "fields": ["a", "b"], "min": [0.0, 1.0],
        "mean": [1.0, 2.0], "max": [2.0, 3.0], "std": [0.5, 0.5], "events": 0,
    }  # fmt: skip
    return ("summary", body)


def _zscore(device: str, first: int, last: int, ts: float) -> tuple[str, dict[str, Any]]:
    body = {
        "edge": "e0", "device": device, "first": first, "last": last, "count": last - first + 1,
        "ts": ts, "kind": "zscore", "field": "a", "value": 9.0, "baseline": 1.0, "z": 8.0,
    }  # fmt: skip
    return ("event", body)


def _warning(
    device: str,
    first: int,
    ts: float,
    *,
    fault: str | None,
    hours: float | None,
    confidence: float = 0.9,
    repeats: int = 0,
) -> tuple[str, dict[str, Any]]:
    rec = "Inspect sensor" if hours is None else f"Schedule maintenance within {hours:.0f} h"
    body = {
        "edge": "e1", "device": device, "first": first, "last": first + 9, "count": 10,
        "ts": ts, "kind": "model", "status": "warning", "score": 2.5, "threshold": 1.0,
        "fault": fault, "confidence": confidence, "hours_to_failure": hours,
        "recommendation": rec, "escalated": False, "verdict_by": "edge", "unconfirmed": False,
        "model": "classifier@1", "repeats": repeats, "evidence": b"\x00" * 8,
    }  # fmt: skip
    return ("event", body)


def _drop(device: str, first: int, last: int, reason: str) -> tuple[str, dict[str, Any]]:
    body = {
        "reason": reason, "origin": "e0", "records": 0, "kinds": {},
        "ranges": [[device, first, last]], "ts": T0,
    }  # fmt: skip
    return ("drop", body)


def _rollup(edge: str, t1: float, readings: int) -> tuple[str, dict[str, Any]]:
    body = {
        "fog": "f0", "edge": edge, "t0": t1 - 10, "t1": t1, "readings": readings,
        "summaries": 2, "events": 1, "dropped": 0, "devices": 2,
    }  # fmt: skip
    return ("rollup", body)


def _cloud(data: Path | str, recs: list[tuple[str, dict[str, Any]]], cloud: str = "c0") -> None:
    """Store `recs` in the SQLite store of `cloud` under a data dir, or at a PostgreSQL URL."""
    where = data if isinstance(data, str) else data / f"cloud-{cloud}" / "cloud.db"
    store = open_store(where)
    try:
        records = tuple(Record(seq=i, kind=k, body=b) for i, (k, b) in enumerate(recs))
        store.apply([("f0", Batch(low=0, records=records))], now=T0 + 1000)
    finally:
        store.close()


def _records() -> list[tuple[str, dict[str, Any]]]:
    """Four devices: d0 and d3 with warnings, d1 with a gap, d2 with a z-score event only."""
    return [
        _summary("d0", 0, 19),
        _summary("d0", 20, 39),
        _summary("d1", 0, 9),
        _drop("d1", 10, 29, "gap"),
        _drop("d1", 25, 34, "expired"),  # 25..29 also in the gap: counts once, as expired
        _summary("d2", 0, 19, edge="e1"),
        _summary("d3", 0, 14, edge="e1"),  # 15..19 unaccounted
        _zscore("d2", 5, 14, ts=T0 + 14),
        _warning("d0", 0, T0 + 9, fault="bearing_wear", hours=8.0),
        _warning("d0", 20, T0 + 29, fault="bearing_wear", hours=5.0, repeats=2),
        _warning("d3", 0, T0 + 9, fault="overheating", hours=1.5, confidence=0.7),
        _warning("d1", 0, T0 + 9, fault="sensor_stuck", hours=None),
        _rollup("e0", T0 + 10, 60),
        _rollup("e1", T0 + 10, 40),
        _rollup("e0", T0 + 20, 20),
    ]


LEDGER = [("d0", "e0", 40), ("d1", "e0", 40), ("d2", "e1", 20), ("d3", "e1", 20)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Four devices: d0 and d3 with warnings, d1 with a gap, d2 with a z-score event only."""
    _ledger(tmp_path, LEDGER)
    _cloud(tmp_path, _records())
    return tmp_path


# --------------------------------------------------------------------------- the queries


def test_at_risk_lists_warned_devices_soonest_failure_first(data: Path) -> None:
    rows = query.at_risk(data)
    assert [r["device"] for r in rows] == ["d3", "d0", "d1"]  # 1.5 h, 5 h, no prediction last
    d0 = rows[1]
    assert d0["fault"] == "bearing_wear"
    assert d0["hours_to_failure"] == 5.0  # from the latest warning, not the earlier 8 h
    assert d0["recommendation"] == "Schedule maintenance within 5 h"
    assert d0["warnings"] == 2 and d0["repeats"] == 2
    assert d0["first_warning"] == T0 + 9 and d0["last_warning"] == T0 + 29
    assert d0["last_seen"] == T0 + 39  # its latest summary
    assert rows[0]["confidence"] == pytest.approx(0.7)
    assert rows[2]["hours_to_failure"] is None
    assert "d2" not in {r["device"] for r in rows}  # a z-score event is not a model warning


def test_events_are_newest_first_and_filter_by_device_time_and_limit(data: Path) -> None:
    rows = query.events(data, limit=None)
    assert len(rows) == 5
    assert [r["ts"] for r in rows] == sorted((r["ts"] for r in rows), reverse=True)
    assert {r["kind"] for r in rows} == {"zscore", "model"}
    assert "evidence" not in rows[0]

    d0 = query.events(data, device="d0")
    assert [(r["device"], r["first"]) for r in d0] == [("d0", 20), ("d0", 0)]
    assert d0[0]["escalated"] is False and d0[0]["model"] == "classifier@1"

    window = query.events(data, since=T0 + 10, until=T0 + 20)
    assert [(r["device"], r["kind"], r["z"]) for r in window] == [("d2", "zscore", 8.0)]
    assert query.events(data, limit=2) == rows[:2]
    with pytest.raises(query.QueryError, match="after"):
        query.events(data, since=T0 + 20, until=T0 + 10)


def test_summaries_filter_by_device_newest_first_with_lists(data: Path) -> None:
    rows = query.summaries(data, device="d0")
    assert [(r["first"], r["last"]) for r in rows] == [(20, 39), (0, 19)]
    assert rows[0]["fields"] == ["a", "b"] and rows[0]["mean"] == [1.0, 2.0]
    assert len(query.summaries(data, limit=None)) == 5
    assert len(query.summaries(data, limit=3)) == 3


def test_coverage_per_device_adds_up_to_the_report(data: Path) -> None:
    rows = {r["device"]: r for r in query.coverage(data)}
    assert rows["d1"] == {
        "device": "d1",
        "edge": "e0",
        "produced": 40,
        "covered": 10,
        "dropped": 25,
        "dropped.expired": 10,
        "dropped.gap": 15,
        "unaccounted": 5,
        "duplicates": 0,
    }  # reasons are taken in alphabetical order, as in the report
    assert rows["d3"]["unaccounted"] == 5
    assert rows["d0"]["unaccounted"] == rows["d2"]["unaccounted"] == 0
    rep = build_report(data)
    for key in ("produced", "covered", "unaccounted"):
        assert sum(r[key] for r in rows.values()) == rep[key]
    for reason, n in rep["dropped"].items():
        assert sum(r[f"dropped.{reason}"] for r in rows.values()) == n
    only = query.coverage(data, device="d1")
    assert only == [rows["d1"]]


def test_rollups_filter_by_edge_newest_first(data: Path) -> None:
    rows = query.rollups(data, edge="e0")
    assert [(r["edge"], r["t1"], r["readings"]) for r in rows] == [
        ("e0", T0 + 20, 20),
        ("e0", T0 + 10, 60),
    ]
    assert len(query.rollups(data)) == 3


@pytest.mark.postgres
def test_every_query_reads_a_postgresql_store_as_it_reads_sqlite(
    data: Path, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _cloud(pg_url, _records())
    ledger_only = tmp_path / "pg"
    _ledger(ledger_only, LEDGER)
    pg = [pg_url]
    assert query.at_risk(ledger_only, stores=pg) == query.at_risk(data)
    assert query.events(ledger_only, limit=None, stores=pg) == query.events(data, limit=None)
    assert query.events(ledger_only, device="d0", since=T0 + 10, stores=pg) == query.events(
        data, device="d0", since=T0 + 10
    )
    assert query.summaries(ledger_only, limit=2, stores=pg) == query.summaries(data, limit=2)
    assert query.coverage(ledger_only, stores=pg) == query.coverage(data)
    assert query.rollups(ledger_only, edge="e0", stores=pg) == query.rollups(data, edge="e0")
    assert query.rollouts(ledger_only, stores=pg) == query.rollouts(data) == []
    # Both at once: the SQLite stores of the data dir and the PostgreSQL one.
    assert len(query.events(data, limit=None, stores=pg)) == 2 * len(query.events(data, limit=None))

    assert main(["query", "at-risk", "--data-dir", str(ledger_only), "--store", pg_url]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "d3"
    bad = pg_url.replace("/fogline?", "/nosuchdb?")
    assert main(["query", "at-risk", "--data-dir", str(ledger_only), "--store", bad]) == 2
    assert "cannot open" in capsys.readouterr().err


def test_several_cloud_stores_are_read_together(data: Path) -> None:
    _cloud(data, [_warning("d2", 10, T0 + 19, fault="imbalance", hours=0.5)], cloud="c1")
    assert query.at_risk(data)[0]["device"] == "d2"
    assert len(query.events(data, limit=None)) == 6


# --------------------------------------------------------------------------- output formats


def test_table_json_and_csv_carry_the_same_rows(data: Path) -> None:
    rows = query.at_risk(data)
    table = query.format_rows("at-risk", rows, "table").splitlines()
    assert table[0].split()[:3] == ["device", "edge", "fault"]
    assert [line.split()[0] for line in table[1:]] == ["d3", "d0", "d1"]
    starts = {line.index("Schedule") for line in table[1:] if "Schedule" in line}
    assert len(starts) == 1  # the column is aligned
    assert "2024-06-01" in table[1]  # times as dates

    assert json.loads(query.format_rows("at-risk", rows, "json")) == rows

    got = list(csv.DictReader(io.StringIO(query.format_rows("at-risk", rows, "csv"))))
    assert [r["device"] for r in got] == ["d3", "d0", "d1"]
    assert list(got[0]) == list(query.COLUMNS["at-risk"])
    assert float(got[0]["hours_to_failure"]) == 1.5
    assert got[2]["hours_to_failure"] == ""  # None


def test_coverage_csv_has_a_column_per_drop_reason(data: Path) -> None:
    text = query.format_rows("coverage", query.coverage(data), "csv")
    header = text.splitlines()[0].split(",")
    assert header == [
        "device", "edge", "produced", "covered", "dropped", "dropped.expired", "dropped.gap",
        "unaccounted", "duplicates",
    ]  # fmt: skip


def test_events_table_merges_both_kinds(data: Path) -> None:
    lines = query.format_rows("events", query.events(data), "table").splitlines()
    assert lines[0].split()[:7] == ["ts", "device", "edge", "kind", "first", "last", "what"]
    z = next(line for line in lines if " zscore " in line)
    assert " a " in z and "8.00" in z  # the field and the z-score


# --------------------------------------------------------------------------- the command


def test_cli_prints_each_format(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["query", "events", "--data-dir", str(data), "--device", "d0"]
    assert main(base) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("ts")
    assert main([*base, "--json", "--since", str(T0 + 10)]) == 0
    assert [r["first"] for r in json.loads(capsys.readouterr().out)] == [20]
    assert main(["query", "rollups", "--data-dir", str(data), "--csv", "--edge", "e1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("f0,e1,")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["query", "at-risk", "--data-dir", "{missing}"], "no data dir"),
        (["query", "coverage", "--data-dir", "{empty}"], "no cloud store"),
        (["query", "events", "--data-dir", "{data}", "--since", "yesterday"], "bad timestamp"),
        (["query", "summaries", "--data-dir", "{data}", "--limit", "-1"], "--limit"),
    ],
)
def test_cli_errors_exit_2_with_a_message(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "data": data}
    assert main([a.format(**paths) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_parse_time_accepts_unix_iso_and_ago() -> None:
    assert query.parse_time("1717243200", now=0) == T0
    assert query.parse_time("2024-06-01T12:00:00+00:00", now=0) == T0
    assert query.parse_time("2024-06-01T12:00:00Z", now=0) == T0
    assert query.parse_time("15m", now=T0) == T0 - 900
    assert query.parse_time("2h", now=T0) == T0 - 7200
    with pytest.raises(query.QueryError, match="bad timestamp"):
        query.parse_time("soon", now=T0)
