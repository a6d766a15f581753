"""`fogline up --topology sites`: one Mosquitto per site bridged to a cloud Mosquitto, end to end,
and a site's bridge cut under load and restored without losing a reading."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fogline.broker import Broker
from fogline.fleet import split_sites
from fogline.sites import site_broker
from fogline.supervisor import pid_alive, read_pid
from fogline.topics import Topics
from tests.chaos.conftest import outbox_records
from tests.integration.conftest import report_from, wait_for

SITES, EDGES, DEVICES = 2, 4, 40
UP = [sys.executable, "-m", "fogline.cli", "up", "--json", "--topology", "sites",
      "--sites", str(SITES), "--edges", str(EDGES), "--devices", str(DEVICES)]  # fmt: skip


def _stored_by_fog(data: Path) -> dict[str, int]:
    """Summaries in the cloud store per fog (the custody stream they came up in)."""
    path = data / "cloud-c0" / "cloud.db"
    if not path.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            return dict(conn.execute("SELECT src, count(*) FROM summaries GROUP BY src"))
        finally:
            conn.close()
    except sqlite3.Error:  # the sink has not made its tables yet
        return {}


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop_up(proc: subprocess.Popen[Any], data: Path, gone: set[int]) -> None:
    """Stop `fogline up` and everything it started, also when the test failed half-way (`gone`:
    pids that already ended, whose pid files may still be there)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # in order
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # a second signal: at once
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # Its children and brokers run in sessions of their own: end those it could not.
    run = data / "run"
    for pid_file in run.glob("*.pid") if run.exists() else []:
        pid = read_pid(run, pid_file.stem)
        if pid is not None and pid not in gone and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(90)
def test_sites_account_for_every_reading(tmp_path: Path) -> None:
    data = tmp_path / "data"
    t0 = time.monotonic()
    proc = subprocess.run(
        [*UP, "--data-dir", str(data), "--duration", "15"],
        capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 sites bridged to it" in proc.stderr
    rep = report_from(data)
    assert rep["devices"] == DEVICES
    assert rep["produced"] >= DEVICES * 10 * 8
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert rep["dropped"] == {}
    # Both fogs' records crossed their bridge into the one cloud store.
    by_fog = _stored_by_fog(data)
    assert set(by_fog) == {"f0", "f1"} and min(by_fog.values()) > 0, by_fog
    # One simulator per site, sharing the fleet: each device in exactly one ledger.
    assert sorted(p.name for p in data.glob("device-sim-*")) == ["device-sim-s0", "device-sim-s1"]
    assert (data / "broker-site0" / "mosquitto.conf").is_file()
    assert (data / "broker-site1" / "mosquitto.conf").is_file()
    # The progress monitor on the cloud broker saw the edges' positions through the bridges:
    # the stop did not have to wait out EDGE_CATCH_UP for an edge it could not see.
    written = json.loads((data / "report.json").read_text())
    assert written["timing"]["edges_caught_up_after"] < 10, written["timing"]
    assert not list((data / "run").glob("*"))
    print(f"[sites] fogline up --duration 15 took {took:.1f}s; stored per fog {by_fog}")


@pytest.mark.timeout(90)
def test_cutting_a_bridge_and_restoring_it_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run = data / "run"
    site = split_sites(DEVICES, EDGES, SITES)[1]
    outbox = data / f"fog-{site.fog}" / "fog.db"
    log_path = tmp_path / "fogline-up.log"
    owned: list[Broker] = []  # the site brokers this test starts in place of fogline up's
    gone: set[int] = set()
    # Summaries every 0.5 s instead of 5 s, so that a cut of a few seconds builds a backlog.
    env = {**os.environ, "FOGLINE_SUMMARY_INTERVAL": "0.5"}
    with log_path.open("w") as log_file:
        up = subprocess.Popen(
            [*UP, "--data-dir", str(data), "--duration", "30"],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
        )  # fmt: skip
    try:
        wait_for(lambda: read_pid(run, f"device-sim-{site.sim}"), 40, "the simulators to start")
        wait_for(lambda: _stored_by_fog(data).get(site.fog), 20, f"records from {site.fog}")
        port = int((run / f"broker-{site.name}.port").read_text())
        cloud_port = int((run / "broker.port").read_text())
        pid = read_pid(run, f"broker-{site.name}")
        assert pid is not None
        time.sleep(2)  # steady state first
        steady = outbox_records(outbox) or 0

        # The cut: the site broker again on its port and data (sessions and queued telemetry
        # kept), but from dev.conf.tmpl, i.e. without the bridge. Its fog, edges and simulator
        # reconnect and go on; nothing reaches the cloud and no ack comes back.
        os.kill(pid, signal.SIGTERM)
        gone.add(pid)
        wait_for(lambda: not _port_open(port), 10, "the site broker to stop")
        cut = Broker(data_dir=data / f"broker-{site.name}", port=port, template="dev")
        owned.append(cut)
        cut.start()
        t_cut = time.monotonic()
        time.sleep(1.0)  # what had crossed before the cut is stored by now
        stored_at_cut = _stored_by_fog(data)
        peak = 0
        while time.monotonic() - t_cut < 8.0:
            peak = max(peak, outbox_records(outbox) or 0)
            time.sleep(0.1)
        stored_cut_end = _stored_by_fog(data)
        print(f"[sites] outbox of {site.fog}: {steady} records before the cut, {peak} at most "
              f"during it; stored {stored_at_cut} -> {stored_cut_end}")  # fmt: skip
        assert stored_cut_end.get(site.fog) == stored_at_cut.get(site.fog), "the cut leaked"
        assert stored_cut_end["f0"] > stored_at_cut["f0"], "the other site stopped too"
        assert peak > steady + 50, f"the outbox of {site.fog} did not grow: {steady} -> {peak}"

        # Restored: the same site broker with its bridge, on the same port and data.
        cut.stop()
        restored = site_broker(
            data_dir=data, site=site, cloud_host="127.0.0.1", cloud_port=cloud_port,
            topics=Topics(), port=port,
        )  # fmt: skip
        owned.append(restored)
        restored.start()
        t_back = time.monotonic()
        wait_for(
            lambda: (outbox_records(outbox) or 0) < peak // 4, 30, f"{site.fog}'s backlog to drain"
        )
        print(f"[sites] backlog below {peak // 4} records {time.monotonic() - t_back:.1f}s "
              "after the bridge was back")  # fmt: skip
        out, _ = up.communicate(timeout=60)
    finally:
        _stop_up(up, data, gone)
        for broker in owned:
            broker.stop()
    assert up.returncode == 0, log_path.read_text()[-3000:]
    rep = json.loads(out)
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert rep["dropped"] == {}
    assert rep["produced"] >= DEVICES * 10 * 20
    assert report_from(data)["unaccounted"] == 0
    assert _stored_by_fog(data)[site.fog] > stored_cut_end[site.fog]
    assert not list(run.glob("*.pid"))
