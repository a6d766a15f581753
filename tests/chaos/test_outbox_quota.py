"""Chaos 4: an edge's outbox quota is reached while the fog is down.

The edge (outbox bound 0.02 MiB) sheds by priority and reports every eviction in `drop` records;
once the fog is back those reach the cloud, and the reported loss equals the real loss exactly.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.chaos.conftest import (
    Hand,
    assert_every_device_accounted,
    cloud_rows,
    drop_kinds,
    report_from,
    say,
    wait_for,
)

pytestmark = pytest.mark.timeout(150)

DEVICES, DURATION = 20, 20
OUTBOX_MB = 0.02
# Summaries due every 0.5 s (one per telemetry message) fill 20 KiB within seconds; a fleet where
# every machine develops a fault soon gives events, which must outlive the summaries.
EDGE_ARGS = ("--outbox-max-mb", str(OUTBOX_MB), "--summary-interval", "0.5")
SIM_ARGS = (
    "--faults", "bearing_wear=0.5,overheating=0.3,imbalance=0.2",
    "--fault-horizon-h", "0.02", "--wear-hours", "0.05,0.1",
)  # fmt: skip


def _max_counter(hand: Hand, name: str) -> float:
    return max((s.counters.get(name, 0) for s in hand.watcher.samples("edge", "e0")), default=0)


def test_outbox_quota_sheds_lowest_priority_and_reports_it(hand: Hand, tmp_path: Path) -> None:
    data = tmp_path / "data"
    hand.start_layers(["e0"], edge_args=EDGE_ARGS)
    hand.start_sim(DEVICES, 1, DURATION, *SIM_ARGS)
    wait_for(lambda: hand.watcher.counter("device-sim", "s0", "readings"), 20, "telemetry")
    time.sleep(3)
    hand.term("fog-f0")
    t_down = time.monotonic()
    wait_for(lambda: _max_counter(hand, "evicted.outbox_full"), 20, "the edge to evict")
    t_evict = time.monotonic()
    time.sleep(1.5)
    hand.restart("fog-f0")
    hand.watcher.wait_online([("fog", "f0")])
    say(
        f"fog down {time.monotonic() - t_down:.1f}s; the edge started evicting after "
        f"{t_evict - t_down:.1f}s; outbox peak "
        f"{max(s.gauges.get('outbox_bytes', 0) for s in hand.watcher.samples('edge', 'e0'))}"
        f" bytes (bound {int(OUTBOX_MB * 1024 * 1024)})"
    )
    hand.finish(["e0"])
    for name, proc in hand.procs.items():
        assert proc.returncode == 0, hand.log(name)

    rep = report_from(data)
    say("report", json.dumps({k: rep[k] for k in ("produced", "covered", "dropped", "events")}))
    evicted = _max_counter(hand, "evicted.outbox_full")
    events_made = _max_counter(hand, "records.event")
    kinds = drop_kinds(data, "outbox_full")
    (reported,) = cloud_rows(
        data, "SELECT coalesce(sum(records), 0) FROM drops WHERE reason = 'outbox_full'"
    )[0]
    say(f"edge evicted {evicted:.0f} records, drop records report {reported} by kind {kinds}")
    say(f"events: edge made {events_made:.0f}, cloud stored {rep['events']}")

    # The drop records reached the cloud and name the reason; every eviction is reported.
    assert rep["dropped"].get("outbox_full", 0) > 0, rep["dropped"]
    assert set(rep["dropped"]) == {"outbox_full"}, rep["dropped"]
    assert reported == evicted > 0
    assert sum(kinds.values()) == reported
    # Lowest priority first: summaries (and training samples) went, events stayed.
    assert kinds.get("summary", 0) > 0, kinds
    assert set(kinds) <= {"train", "summary"}, kinds
    assert events_made > 0, "the fleet produced no events: the priority check would be empty"
    assert rep["events"] == events_made
    # The reported drop counts are the real loss exactly, per device.
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["unaccounted_devices"] == []
    assert rep["duplicates"] == 0
    assert rep["rejected_records"] == 0
    assert_every_device_accounted(data)
    # No reading reported dropped was in fact stored in a summary (nothing over-reported).
    summaries: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for device, first, last in cloud_rows(data, "SELECT device, first, last FROM summaries"):
        summaries[device].append((first, last))
    both = [
        (device, first, last)
        for device, first, last in cloud_rows(
            data, "SELECT device, first, last FROM drop_ranges WHERE reason = 'outbox_full'"
        )
        if any(a <= last and first <= b for a, b in summaries[device])
    ]
    assert not both, f"drop ranges overlapping stored summaries: {both[:10]}"
