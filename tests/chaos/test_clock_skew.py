"""Chaos 5: one process runs with a skewed wall clock (libfaketime): the edge 2 h ahead, or the
cloud sink 1 h behind. Ordering, windows and the accounting must not care."""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.chaos.conftest import (
    Hand,
    assert_every_device_accounted,
    cloud_rows,
    find_faketime,
    report_from,
    say,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

DEVICES, EDGES, DURATION = 30, 2, 15
EDGE_IDS = [f"e{i}" for i in range(EDGES)]
WINDOW = 20  # readings per window of the built-in models
FAKETIME = find_faketime()


@pytest.mark.skipif(
    FAKETIME is None, reason="libfaketime is not installed (apt-get install -y faketime)"
)
@pytest.mark.parametrize(
    ("name", "role", "ident", "offset", "skew"),
    [("edge-e0", "edge", "e0", "+2h", 7200.0), ("cloud-c0", "cloud", "c0", "-1h", -3600.0)],
    ids=["edge+2h", "cloud-1h"],
)
def test_clock_skew(
    hand: Hand, tmp_path: Path, name: str, role: str, ident: str, offset: str, skew: float
) -> None:
    assert FAKETIME is not None
    data = tmp_path / "data"
    env = {
        "LD_PRELOAD": FAKETIME,
        "FAKETIME": offset,
        # Only the wall clock is skewed (as with a wrong NTP setting); timers keep working.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    hand.start_layers(EDGE_IDS, env={name: env})
    # The skew took: the process stamps its messages with its own (wrong) clock.
    sample = wait_for(lambda: hand.watcher.last(role, ident), 10, f"metrics of {name}")
    measured = sample.ts - sample.at
    say(f"{name} clock is {measured:+.0f}s off")
    assert abs(measured - skew) < 60, measured
    hand.start_sim(DEVICES, EDGES, DURATION)
    hand.finish(EDGE_IDS)
    for proc_name, proc in hand.procs.items():
        assert proc.returncode == 0, hand.log(proc_name)

    rep = report_from(data)
    say("report", json.dumps({k: rep[k] for k in ("produced", "covered", "dropped", "events")}))
    assert rep["produced"] >= DEVICES * 10 * (DURATION - 3)
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert rep["dropped"] == {}
    assert rep["rejected_records"] == 0
    assert_every_device_accounted(data)

    # Ordering: per device, the summaries the fog forwarded follow each other in reading order
    # and in the devices' own (simulated) time, without gaps or overlaps.
    by_device: dict[str, list[tuple[int, int, float, float]]] = defaultdict(list)
    for device, first, last, t0, t1 in cloud_rows(
        data, "SELECT device, first, last, t0, t1 FROM summaries ORDER BY src, seq"
    ):
        by_device[device].append((first, last, t0, t1))
    for device, rows in by_device.items():
        assert rows[0][0] == 0, (device, rows[0])
        for (_, last, _, t1), (first, _, t0, _) in itertools.pairwise(rows):
            assert first == last + 1, (device, rows)
            assert t0 > t1, (device, rows)
    # Windows: with no gap anywhere, every event judges exactly one window of the device's
    # reading stream, cut at multiples of the window size from reading 0.
    for device, first, last in cloud_rows(data, "SELECT device, first, last FROM events"):
        assert last - first + 1 == WINDOW, (device, first, last)
        assert first % WINDOW == 0, (device, first, last)
    if role == "cloud":
        # The sink stored with its own clock: the skew reached the store, and changed nothing.
        (stored,) = cloud_rows(data, "SELECT max(stored) FROM summaries")[0]
        off = stored - time.time()
        say(f"the last summary was stored at {off:+.0f}s from now (the sink's clock)")
        assert off < skew / 2
