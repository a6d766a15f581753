"""Chaos 2: `kill -9` of Mosquitto under load, restarted on the same port; nothing unaccounted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.chaos.conftest import Hand, assert_every_device_accounted, report_from, say, wait_for

pytestmark = pytest.mark.timeout(150)

DEVICES, EDGES, DURATION = 30, 2, 18
OUTAGE = 2.0
KILLS_AT = (5.0, 11.0)  # seconds after the simulator started


def test_broker_kill9_and_restart(hand: Hand, tmp_path: Path) -> None:
    edges = [f"e{i}" for i in range(EDGES)]
    hand.start_layers(edges)
    hand.start_sim(DEVICES, EDGES, DURATION)
    wait_for(lambda: hand.watcher.counter("device-sim", "s0", "readings"), 20, "telemetry")
    t0 = time.monotonic()
    back_after = []
    for at in KILLS_AT:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        hand.broker.kill()
        time.sleep(OUTAGE)
        hand.broker.start()
        t_up, since = time.monotonic(), time.time()
        # Every process reconnects by itself (jittered backoff) and publishes metrics again.
        for role, ident in [("cloud", "c0"), ("fog", "f0"), *[("edge", e) for e in edges]]:

            def back(r: str = role, i: str = ident, t: float = since) -> bool:
                return bool(hand.watcher.samples(r, i, since=t))

            wait_for(back, 30, f"{role}-{ident} to publish metrics again after the restart")
        back_after.append(round(time.monotonic() - t_up, 2))
    say(f"broker killed at {KILLS_AT}s for {OUTAGE}s; processes back after {back_after}s")
    hand.finish(edges)

    data = tmp_path / "data"
    rep = report_from(data)
    say("report", json.dumps({k: rep[k] for k in ("produced", "covered", "dropped")}))
    for name in ("cloud-c0", "fog-f0", *[f"edge-{e}" for e in edges], "device-sim-s0"):
        assert hand.procs[name].returncode == 0, hand.log(name)
    assert rep["produced"] >= DEVICES * 10 * (DURATION - 2 * OUTAGE - 4)
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert rep["rejected_records"] == 0
    assert_every_device_accounted(data)
