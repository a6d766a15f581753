"""The quick scenario through `fogline up --broker nats`: the pipeline, unchanged, on NATS."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fogline.broker import BrokerError
from fogline.nats import NatsBroker, find_nats_server, read_monitor
from fogline.supervisor import pid_alive
from tests.integration.conftest import report_from

pytestmark = pytest.mark.timeout(120)

try:
    find_nats_server()
    _MISSING = ""
except BrokerError as exc:
    _MISSING = str(exc)

# `fogline simulate quick` with the broker switched to NATS: the scenario's fleet, faults and edge
# settings, through `fogline up`'s own entry (simulate itself always starts Mosquitto).
_RUN_QUICK = """
import sys
from fogline import cli, up
from fogline.scenario import load
sc = load("quick")
args = cli.parser().parse_args([
    "up", "--broker", "nats", "--data-dir", sys.argv[1], "--clean", "--json",
    "--devices", str(sc.devices), "--edges", str(sc.edges), "--duration", str(sc.duration),
    "--rate", str(sc.rate), "--samples-per-message", str(sc.samples_per_message),
    "--time-scale", str(sc.time_scale), "--seed", str(sc.seed),
])
args.sim_extra, args.edge_extra = sc.sim_args(), sc.edge_args()
sys.exit(up.run(args, quiet=True))
"""
CLIENTS = {
    "fogline-cloud-c0",
    "fogline-fog-f0",
    "fogline-edge-e0",
    "fogline-edge-e1",
    "fogline-device-sim-s0",
}


def _http_port(data: Path) -> int | None:
    conf = data / "broker" / "nats.conf"
    m = re.search(r'^http: "[^"]*:(\d+)"', conf.read_text(), re.M) if conf.exists() else None
    return int(m.group(1)) if m else None


def _mqtt_clients(data: Path) -> set[str]:
    """MQTT client ids the running NATS server lists (open and closed connections)."""
    port = _http_port(data)
    if port is None:
        return set()
    try:
        conns = read_monitor(f"http://127.0.0.1:{port}", "connz?state=any&limit=1024",
                             timeout=1.0)["connections"]  # fmt: skip
    except BrokerError:
        return set()
    return {c["mqtt_client"] for c in conns if c.get("mqtt_client")}


def _stop(proc: subprocess.Popen[Any], data: Path) -> None:
    """Stop `fogline up` and everything it started, even when the test failed half-way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # stops in order, like Ctrl-C
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid_file in (data / "run").glob("*.pid") if (data / "run").exists() else []:
        try:
            pid = int(pid_file.read_text())
        except ValueError:
            continue
        if pid_alive(pid):
            subprocess.run(["kill", "-9", str(pid)], check=False)


@pytest.mark.skipif(bool(_MISSING), reason=f"nats-server is not installed: {_MISSING}")
def test_quick_scenario_on_nats_accounts_for_every_reading(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out_path = tmp_path / "up.out"
    with out_path.open("w") as out_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUN_QUICK, str(data)], stdout=out_file,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    seen: set[str] = set()
    try:
        # While it runs, ask the NATS server itself who is talking MQTT to it.
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _mqtt_clients(data)
            time.sleep(1.0)
        assert proc.poll() is not None, "fogline up --broker nats did not end within 90 s"
    finally:
        _stop(proc, data)
    out = out_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "NATS broker mqtt://127.0.0.1:" in out

    rep = report_from(data)
    assert rep["devices"] == 50
    assert rep["produced"] > 0
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    # A broker that loses or reorders telemetry shows up as gaps at the edges.
    assert rep["dropped"].get("gap", 0) == 0
    assert rep["rejected_records"] == 0

    assert seen >= CLIENTS, f"NATS listed the MQTT clients {sorted(seen)}"
    # Every QoS 1 message to a subscriber went through JetStream: read the stream's sequence
    # from the store the run left behind, with a fresh server on the same folder.
    conn = sqlite3.connect(f"file:{data / 'device-sim-s0' / 'ledger.db'}?mode=ro", uri=True)
    try:
        (messages,) = conn.execute("SELECT sum(messages) FROM ledger").fetchone()
    finally:
        conn.close()
    with NatsBroker(data_dir=data / "broker") as again:
        streams = {
            s["name"]: s["state"]
            for acct in again.monitor("jsz?streams=true")["account_details"]
            for s in acct["stream_detail"]
        }
    assert streams["$MQTT_msgs"]["last_seq"] >= messages > 0, streams
