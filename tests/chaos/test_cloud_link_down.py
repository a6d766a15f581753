"""Chaos 3: the fog -> cloud link down for 8 s under load, two ways: the cloud sink SIGSTOPped
under `fogline up` (it stays connected, the broker queues the fog's batches), and the sink stopped
with SIGTERM then started again (it says `stopped`, the fog holds everything and re-sends it).

Edges and the fog keep deciding and buffering on disk, the fog's memory stays bounded, and the
backlog drains once the sink is back; the drain rate is printed to be recorded.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.conftest import (
    Hand,
    Sampler,
    UpRun,
    Watcher,
    assert_every_device_accounted,
    cloud_rows,
    outbox_records,
    report_from,
    rss_mb,
    say,
    wait_for,
)

pytestmark = pytest.mark.timeout(150)

DEVICES, EDGES, DURATION = 50, 2, 22
EDGE_IDS = [f"e{i}" for i in range(EDGES)]
OUTAGE = 8.0
RSS_BOUND_MB = 300.0
# Summaries due every 0.5 s instead of 5 s (one per telemetry message, i.e. per second and
# device), so an 8 s outage builds a real backlog.
ENV = {"FOGLINE_SUMMARY_INTERVAL": "0.5"}


def _outage(
    data: Path,
    watcher: Watcher,
    fog_pid: int,
    down: Callable[[], object],
    back: Callable[[], object],
) -> dict[str, float]:
    """Take the link down for OUTAGE seconds; measure the fog's backlog, memory and drain."""
    backlog = Sampler(lambda: outbox_records(data / "fog-f0" / "fog.db"), 0.02)
    rss = Sampler(lambda: rss_mb(fog_pid), 0.2)
    try:
        time.sleep(4)  # steady state first
        t_stop = time.time()
        steady = max((v for _, v in backlog.values), default=0.0)
        edge_in0 = sum(watcher.counter("edge", e, "readings_in") for e in EDGE_IDS)
        fog_in0 = watcher.counter("fog", "f0", "records_forwarded")
        down()
        try:
            time.sleep(OUTAGE)
        finally:
            t_back = time.time()
            back()
        edge_in1 = sum(watcher.counter("edge", e, "readings_in") for e in EDGE_IDS)
        fog_in1 = watcher.counter("fog", "f0", "records_forwarded")
        wait_for(
            lambda: any(t > t_back and v <= steady for t, v in backlog.values),
            30,
            f"the fog's outbox to drain back to its steady {steady:.0f} records",
        )
        time.sleep(0.5)
    finally:
        samples = backlog.stop()
        rss_samples = rss.stop()

    during = [(t, v) for t, v in samples if t_stop <= t <= t_back + 0.1]
    peak = max(v for _, v in during)
    t_peak = max(t for t, v in during if v == peak)  # the backlog plateaus between summaries
    t_empty, left = next((t, v) for t, v in samples if t > t_back and v <= steady)
    drain_s = max(t_empty - t_peak, 0.02)
    # The sampler's resolution is coarse for a fast drain: the cloud's own `stored` times say
    # when the backlog records were written there.
    stored = [
        t
        for table in ("summaries", "events", "drops", "rollups")
        for (t,) in cloud_rows(
            data, f"SELECT stored FROM {table} WHERE stored BETWEEN ? AND ?", t_back, t_empty
        )
    ]
    cloud_s = max(max(stored, default=t_back) - t_back, 1e-3)
    fig = {
        "steady": steady,
        "peak": peak,
        "left": left,
        "drain_s": drain_s,
        "drain_rate": (peak - left) / drain_s,
        "cloud_stored": len(stored),
        "cloud_s": cloud_s,
        "peak_rss_mb": max(v for _, v in rss_samples),
        "edge_readings": edge_in1 - edge_in0,
        "fog_records": fog_in1 - fog_in0,
        "metrics_peak": max(
            (s.gauges.get("outbox_records", 0) for s in watcher.samples("fog", "f0", t_stop)),
            default=0,
        ),
    }
    say(
        f"fog outbox steady {steady:.0f}, peak {peak:.0f} records (metrics gauge peak "
        f"{fig['metrics_peak']:.0f}); back to {left:.0f} {drain_s:.2f}s after the peak "
        f"({t_empty - t_back:.2f}s after the link came back) -> drain rate "
        f"{fig['drain_rate']:.0f} records/s; the cloud stored {len(stored)} records in the "
        f"{cloud_s:.3f}s after the link came back"
    )
    say(
        f"fog peak RSS {fig['peak_rss_mb']:.1f} MiB (bound {RSS_BOUND_MB:.0f}); during the "
        f"outage the edges took {fig['edge_readings']:.0f} readings and the fog kept "
        f"{fig['fog_records']:.0f} records"
    )
    return fig


def _check(fig: dict[str, float], data: Path) -> None:
    # Edges kept taking telemetry and the fog kept taking their records during the outage ...
    assert fig["edge_readings"] >= DEVICES * 10 * OUTAGE * 0.7, fig
    assert fig["fog_records"] >= DEVICES * OUTAGE * 0.5, fig
    # ... buffering them in its outbox on disk (~50 summaries/s), with bounded memory.
    assert fig["peak"] >= fig["steady"] + DEVICES * OUTAGE * 0.5, fig
    assert fig["peak_rss_mb"] < RSS_BOUND_MB, fig
    rep = report_from(data)
    say("report", json.dumps({k: rep[k] for k in ("produced", "covered", "dropped")}))
    assert rep["produced"] >= DEVICES * 10 * (DURATION - 4)
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert rep["dropped"] == {}
    assert_every_device_accounted(data)


def test_cloud_sigstop_backlog_buffers_and_drains(
    fogline_up: Callable[..., UpRun], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    up = fogline_up(
        "--devices", str(DEVICES), "--edges", str(EDGES), "--duration", str(DURATION),
        "--shutdown-timeout", "8", env=ENV,
    )  # fmt: skip
    up.wait_started()
    assert up.watcher is not None
    fog_pid, cloud_pid = up.pid("fog-f0"), up.pid("cloud-c0")
    assert fog_pid and cloud_pid
    fig = _outage(
        data,
        up.watcher,
        fog_pid,
        lambda: os.kill(cloud_pid, signal.SIGSTOP),
        lambda: os.kill(cloud_pid, signal.SIGCONT),
    )
    code, log = up.finish()
    assert code == 0, log[-3000:]
    assert json.loads((data / "report.json").read_text())["restarts"] == {}
    _check(fig, data)


def test_cloud_sigterm_backlog_buffers_and_drains(hand: Hand, tmp_path: Path) -> None:
    data = tmp_path / "data"
    hand.start_layers(EDGE_IDS, env={f"edge-{e}": ENV for e in EDGE_IDS})
    hand.start_sim(DEVICES, EDGES, DURATION)
    wait_for(lambda: hand.watcher.counter("device-sim", "s0", "readings"), 20, "telemetry")

    def back() -> None:
        hand.restart("cloud-c0")
        hand.watcher.wait_online([("cloud", "c0")])

    fig = _outage(data, hand.watcher, hand.pid("fog-f0"), lambda: hand.term("cloud-c0"), back)
    hand.finish(EDGE_IDS)
    for name, proc in hand.procs.items():
        assert proc.returncode == 0, hand.log(name)
    _check(fig, data)
