"""`fogline serve`: the real command serving a hand-built cloud store, asked over HTTP."""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sink.store import Store
from device_sim.ledger import Ledger
from fogline.codec import Batch, Record

CHROMIUM = Path("/usr/bin/chromium")
DB = "cloud-c0"
QUERIES = ("at_risk", "last_hour_warnings", "coverage_per_device", "rollups_per_site")
START_TIMEOUT = 30.0


def _summary(device: str, edge: str, first: int, last: int) -> tuple[str, dict[str, Any]]:
    return "summary", {
        "edge": edge, "device": device, "first": first, "last": last,
        "count": last - first + 1, "t0": 1000.0 + first, "t1": 1000.0 + last,
        "fields": ["vib_rms"], "min": [0.0], "mean": [1.0], "max": [2.0], "std": [0.5],
        "events": 0,
    }  # fmt: skip


def _warning(
    device: str, last: int, *, hours: float | None, fault: str | None = "bearing_wear"
) -> tuple[str, dict[str, Any]]:
    return "event", {
        "edge": "e0", "device": device, "first": last - 9, "last": last, "count": 10,
        "ts": 1000.0 + last, "kind": "model", "status": "warning", "score": 2.5,
        "threshold": 0.84, "fault": fault, "confidence": 0.9, "hours_to_failure": hours,
        "recommendation": "Inspect machine", "escalated": False, "verdict_by": "edge",
        "unconfirmed": False, "model": "classifier@1", "repeats": 1,
    }  # fmt: skip


def _rollup(edge: str, t0: float, readings: int) -> tuple[str, dict[str, Any]]:
    return "rollup", {
        "fog": "f0", "edge": edge, "t0": t0, "t1": t0 + 10.0, "readings": readings,
        "summaries": 2, "events": 1, "dropped": 0, "devices": 2,
    }  # fmt: skip


def _apply(store: Store, first_seq: int, recs: list[tuple[str, dict[str, Any]]], now: float) -> int:
    records = tuple(Record(seq=first_seq + i, kind=k, body=b) for i, (k, b) in enumerate(recs))
    store.apply([("f0", Batch(low=0, records=records))], now=now)
    return first_seq + len(recs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with a ledger and a cloud store: four devices on two edges, model warnings
    stored two hours ago and ten minutes ago, a gap drop and rollups."""
    root = tmp_path_factory.mktemp("serve")
    ledger = Ledger(root / "device-sim-s0" / "ledger.db")
    try:
        ledger.record([("d00000", "e0", 100), ("d00001", "e1", 100), ("d00002", "e0", 100),
                       ("d00003", "e1", 100)], nbytes=40_000)  # fmt: skip
    finally:
        ledger.close()
    now = time.time()
    store = Store(root / DB / "cloud.db")
    try:
        seq = _apply(
            store, 0,
            [
                _summary("d00000", "e0", 0, 49), _summary("d00001", "e1", 0, 49),
                _summary("d00002", "e0", 0, 49), _summary("d00003", "e1", 0, 49),
                _warning("d00000", 29, hours=9.0),
                _warning("d00001", 39, hours=None, fault="sensor_stuck"),
                _rollup("e0", 1000.0, 100), _rollup("e1", 1000.0, 100),
            ],
            now - 7200,
        )  # fmt: skip
        _apply(
            store, seq,
            [
                _summary("d00000", "e0", 50, 99), _summary("d00001", "e1", 50, 99),
                _summary("d00002", "e0", 50, 99),
                ("drop", {"reason": "gap", "origin": "e1", "records": 0, "kinds": {},
                          "ranges": [["d00003", 50, 79]], "ts": 1080.0}),
                _warning("d00000", 89, hours=2.0),  # d00000's latest: 2 h to failure
                _warning("d00002", 69, hours=5.0, fault=None),
                _rollup("e0", 1010.0, 200), _rollup("e1", 1010.0, 50),
            ],
            now - 600,
        )  # fmt: skip
    finally:
        store.close()
    return root


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[str]:
    """`fogline serve` on a free port; its base URL. Stopped with SIGINT at the end, which must
    end it cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fogline.cli", "serve", "--data-dir", str(data_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = _lines(proc)
    try:
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"fogline serve did not start: {proc.communicate()[1][-2000:]}")
        assert "read-only" in line and DB in line, line
        url = line.split("Datasette at ", 1)[1].split()[0]
        yield url.rstrip("/")
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=15) == 0, "Ctrl-C must stop fogline serve cleanly"
        except subprocess.TimeoutExpired:
            pytest.fail("fogline serve did not stop within 15 s of SIGINT")
        assert proc.stderr is not None
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=20) as resp:
        return resp.status, resp.read().decode()


def _rows(server: str, query: str, **params: str) -> list[dict[str, Any]]:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    status, body = _get(f"{server}/{DB}/{query}.json?_shape=array{extra}")
    assert status == 200
    rows: list[dict[str, Any]] = json.loads(body)
    return rows


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_index_lists_the_store_and_its_canned_queries(server: str) -> None:
    status, page = _get(f"{server}/")
    assert status == 200
    assert "fogline cloud store" in page
    assert DB in page
    status, page = _get(f"{server}/{DB}")
    assert status == 200
    for title in ("Devices at risk", "Warnings of the last hour", "Coverage per device",
                  "Rollups per site"):  # fmt: skip
        assert title in page


def test_every_table_and_column_is_described(server: str, data_dir: Path) -> None:
    _, body = _get(f"{server}/-/metadata.json")
    tables = json.loads(body)["databases"][DB]["tables"]
    conn = sqlite3.connect(f"file:{data_dir / DB / 'cloud.db'}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for name in names:
            assert tables[name]["title"] and tables[name]["description"], name
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({name})")]
            missing = [c for c in columns if not tables[name]["columns"].get(c)]
            assert not missing, f"{name}: columns without a description: {missing}"
    finally:
        conn.close()


def test_devices_at_risk_soonest_failure_first(server: str) -> None:
    rows = _rows(server, "at_risk")
    assert [r["device"] for r in rows] == ["d00000", "d00002", "d00001"]
    first = rows[0]
    assert first["hours_to_failure"] == 2.0  # from its latest warning, not the older 9 h
    assert (first["warnings"], first["repeats"], first["fault"]) == (2, 2, "bearing_wear")
    assert rows[1]["fault"] == "anomaly"  # no fault class: the anomaly score alone
    assert rows[2]["hours_to_failure"] is None


def test_last_hour_of_warnings_goes_by_the_stored_time(server: str) -> None:
    rows = _rows(server, "last_hour_warnings")
    assert sorted((r["device"], r["last"]) for r in rows) == [("d00000", 89), ("d00002", 69)]
    rows = _rows(server, "last_hour_warnings", hours="3")
    assert len(rows) == 4


def test_coverage_per_device_from_summaries_and_drops(server: str) -> None:
    rows = {r["device"]: r for r in _rows(server, "coverage_per_device")}
    assert set(rows) == {"d00000", "d00001", "d00002", "d00003"}
    full = rows["d00000"]
    assert (full["readings_seen"], full["summarised"], full["coverage_pct"]) == (100, 100, 100.0)
    gap = rows["d00003"]
    assert (gap["readings_seen"], gap["summarised"], gap["dropped_gap"]) == (80, 50, 30)
    assert gap["not_accounted"] == 0
    assert next(iter(rows)) == "d00003", "lowest coverage first"


def test_rollups_per_site(server: str) -> None:
    rows = _rows(server, "rollups_per_site")
    assert [(r["site"], r["rollups"], r["readings"]) for r in rows] == [
        ("e0", 2, 300),
        ("e1", 2, 150),
    ]
    assert rows[0]["readings_per_s"] == 15.0  # 300 readings over 1000..1020 s


def test_the_store_is_not_modified(server: str, data_dir: Path) -> None:
    store = data_dir / DB / "cloud.db"
    before = _digest(store)
    for q in QUERIES:
        _rows(server, q)
    _get(f"{server}/{DB}/events")
    assert _digest(store) == before
    wal = store.with_name("cloud.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_screenshot_of_the_at_risk_page(server: str, tmp_path: Path) -> None:
    png = tmp_path / "at_risk.png"
    proc = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
            f"--screenshot={png}", "--window-size=1200,800", f"{server}/{DB}/at_risk",
        ],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert png.is_file() and png.stat().st_size > 10_000, proc.stderr[-2000:]
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (1200, 800)


def test_a_non_loopback_host_needs_public(data_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "serve", "--data-dir", str(data_dir),
         "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--public" in proc.stderr and "0.0.0.0" in proc.stderr
    assert proc.stdout == ""


def test_no_cloud_store_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "serve", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no cloud store" in proc.stderr


def test_a_port_in_use_exits_2(server: str, data_dir: Path) -> None:
    port = server.rsplit(":", 1)[1]
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "serve", "--data-dir", str(data_dir),
         "--port", port],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
