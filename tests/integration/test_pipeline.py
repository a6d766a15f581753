"""The four processes end to end through `fogline up`, with and without crashes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fogline.supervisor import pid_alive, read_pid
from tests.integration.conftest import kill9, report_from, run_up, wait_for

pytestmark = pytest.mark.timeout(180)


def test_pipeline_accounts_for_every_reading(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rep = run_up(data, "--devices", "20", "--edges", "2", "--duration", "10")
    assert rep["devices"] == 20
    # 20 devices x 10 readings/s x ~10 s, minus start-up: well over half of that must exist.
    assert rep["produced"] >= 20 * 10 * 5
    assert rep["covered"] == rep["produced"]
    assert rep["unaccounted"] == 0
    assert rep["duplicates"] == 0
    assert rep["dropped"] == {}
    assert rep["rejected_records"] == 0
    b = rep["bytes"]
    # Edges send summaries, not raw readings: the upstream hops carry less than the device hop.
    assert 0 < b["edge_fog"] < b["device_edge"]
    assert b["fog_cloud"] > 0
    # The report written by `fogline up` itself agrees with `fogline report`.
    written = json.loads((data / "report.json").read_text())
    assert {k: written[k] for k in rep} == rep
    # Every process was stopped: no pid files are left behind.
    assert not list((data / "run").glob("*.pid"))


def _restart_of(run: Path, name: str, old: int, timeout: float) -> int:
    def new_pid() -> int | None:
        pid = read_pid(run, name)
        return pid if pid is not None and pid != old and pid_alive(pid) else None

    return int(wait_for(new_pid, timeout, f"the supervisor to restart {name}"))


def test_kill9_cloud_sink_then_fog_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run = data / "run"
    up = subprocess.Popen(
        [sys.executable, "-m", "fogline.cli", "up", "--data-dir", str(data), "--json",
         "--devices", "20", "--edges", "2", "--duration", "18"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # Let records flow (summaries leave the edges every 5 s), then crash the sink.
        sim = wait_for(lambda: read_pid(run, "device-sim-s0"), 30, "the simulator to start")
        assert sim
        time.sleep(6)
        cloud = read_pid(run, "cloud-c0")
        assert cloud is not None
        kill9(cloud)
        _restart_of(run, "cloud-c0", cloud, 10)
        time.sleep(4)
        fog = read_pid(run, "fog-f0")
        assert fog is not None
        kill9(fog)
        _restart_of(run, "fog-f0", fog, 10)
        out, _ = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 0, out[-3000:]
    assert "cloud-c0 exited (signal 9)" in out
    assert "fog-f0 exited (signal 9)" in out
    rep = report_from(data)
    assert rep["produced"] >= 20 * 10 * 10
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert rep["dropped"] == {}
