"""Chaos 1: `kill -9` of the cloud sink, the fog and an edge, each three times, under load."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.conftest import UpRun, assert_every_device_accounted, report_from, say

pytestmark = pytest.mark.timeout(150)

DEVICES, EDGES, DURATION = 40, 2, 24
# Seconds after the simulator started: each layer is killed three times, spread over the run.
SCHEDULE = [
    (3, "cloud-c0"), (5, "fog-f0"), (7, "edge-e0"),
    (10, "cloud-c0"), (12, "fog-f0"), (14, "edge-e0"),
    (17, "cloud-c0"), (19, "fog-f0"), (21, "edge-e0"),
]  # fmt: skip


def test_kill9_cloud_fog_edge_three_times_each(
    fogline_up: Callable[..., UpRun], tmp_path: Path
) -> None:
    t_start = time.monotonic()
    up = fogline_up(
        "--devices", str(DEVICES), "--edges", str(EDGES), "--duration", str(DURATION),
        "--shutdown-timeout", "8",
    )  # fmt: skip
    up.wait_started()
    t0 = time.monotonic()
    downtime: dict[str, list[float]] = {}
    for at, name in SCHEDULE:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        downtime.setdefault(name, []).append(round(up.kill9_and_wait_restart(name), 2))
    code, log = up.finish()
    say(f"kill -9 schedule done; restart delays {downtime}; run {time.monotonic() - t_start:.1f}s")

    data = tmp_path / "data"
    rep = report_from(data)
    written = json.loads((data / "report.json").read_text())
    say("report", json.dumps({k: rep[k] for k in ("produced", "covered", "dropped")}))
    say("restarts", written["restarts"], "timing", written["timing"])
    assert code == 0, log[-3000:]
    for name in ("cloud-c0", "fog-f0", "edge-e0"):
        assert log.count(f"{name} exited (signal 9)") == 3, log[-3000:]
    assert written["restarts"] == {"cloud-c0": 3, "fog-f0": 3, "edge-e0": 3}
    assert rep["produced"] >= DEVICES * 10 * (DURATION - 4)
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert rep["rejected_records"] == 0
    # Killing an edge may turn the readings of its open summaries into counted `gap` drops;
    # nothing else may be dropped.
    assert set(rep["dropped"]) <= {"gap"}, rep["dropped"]
    say(f"gap drops from 3 edge kills: {rep['dropped'].get('gap', 0)} readings")
    acc = assert_every_device_accounted(data)
    e0 = {d: a for d, a in acc.items() if int(d[1:]) % EDGES == 0}
    e1 = {d: a for d, a in acc.items() if int(d[1:]) % EDGES == 1}
    # Only the killed edge's devices can have gaps.
    assert all(a.dropped == 0 for a in e1.values()), e1
    say(f"gap readings per e0 device: {sorted(a.dropped for a in e0.values())}")
