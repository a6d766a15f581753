"""`fogline status --once --json` against a real broker and real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

from fogline.broker import Broker
from tests.integration.conftest import Processes, wait_for


def _status(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fogline.cli", "status", "--once", "--json",
         "--broker-port", str(port), *extra],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def _snapshot(port: int, *extra: str) -> dict[str, Any]:
    proc = _status(port, *extra)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def _by_name(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{p['role']}-{p['id']}": p for p in snap["processes"]}


def _online(port: int, names: list[str]) -> dict[str, Any] | None:
    snap = _snapshot(port, "--wait", "1")
    procs = _by_name(snap)
    ok = all(n in procs and procs[n]["state"] == "online" for n in names)
    return snap if ok else None


def test_status_shows_states_rates_and_a_stopped_process(
    broker: Broker, processes: Processes
) -> None:
    processes.start("cloud_sink")
    processes.start("fog_aggregator")
    edge = processes.start("edge_agent", "--detector", "zscore", "--summary-interval", "1")
    receivers = ["cloud-c0", "fog-f0", "edge-e0"]
    wait_for(lambda: _online(broker.port, receivers), 15, "cloud, fog and edge online")

    started = time.monotonic()
    processes.start("device_sim", "--devices", "10", "--duration", "4")
    snap = wait_for(
        lambda: _online(broker.port, ["device-sim-s0", *receivers]), 10, "the simulator online"
    )
    assert time.monotonic() - started < 4, "the simulator stopped before it could be seen"
    procs = _by_name(snap)
    for name in ["device-sim-s0", *receivers]:
        p = procs[name]
        assert p["pid"] and p["metrics_age"] is not None and p["metrics_age"] < 2, p
    sim, edge_p = procs["device-sim-s0"], procs["edge-e0"]
    assert sim["counters"]["readings"] > 0 and sim["readings_per_s"] > 0
    assert edge_p["counters"]["readings_in"] > 0 and edge_p["readings_per_s"] > 0
    assert "outbox_records" in edge_p["gauges"]
    assert snap["layers"]["device-sim"]["readings_per_s"] > 0
    assert snap["layers"]["edge"]["readings"] > 0
    assert snap["layers"]["edge"]["online"] == 1

    edge.terminate()
    edge.wait(timeout=15)
    procs = _by_name(_snapshot(broker.port, "--wait", "1"))
    assert procs["edge-e0"]["state"] == "stopped"
    assert procs["edge-e0"]["readings_per_s"] is None
    assert procs["cloud-c0"]["state"] == "online"


def test_status_without_a_broker_exits_2_naming_the_address() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _status(port, "--wait", "1")
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}" in proc.stderr
    assert proc.stdout == ""
