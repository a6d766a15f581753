"""Judge a run against the simulator's ground truth: detection quality, bandwidth, custody.

Definitions (all times in simulated hours; reading `k` of a device is at `k * dt` seconds):

- a fault is *active* on its device from its onset reading to the last reading produced;
- an event is a *true positive* when its window reaches into the active fault of its device
  (`last >= onset_seq`), otherwise a *false alarm*;
- per fault kind: recall = faulty devices with at least one true-positive event / faulty devices
  whose onset was produced; detection delay = time from onset to the end of the first
  true-positive window, averaged over detected devices;
- precision per predicted kind: events that name a fault kind are correct when that kind is the
  active one; events that name none (the z-score rule) are judged as `any`;
- false alarms per device-hour: false alarms / healthy device-hours (readings before onset, or
  all readings of healthy devices);
- failure-prediction MAE: over events that carry `hours_to_failure` on devices with a wearing
  fault, the mean absolute error against the truth at the end of the window.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUTH_FILE = "truth.json"
WEARING = frozenset(("bearing_wear", "overheating", "imbalance"))


@dataclass(frozen=True, slots=True)
class Truth:
    """Ground truth of one device's fault."""

    device: str
    kind: str
    onset_seq: int
    failure_seq: int | None


@dataclass(frozen=True, slots=True)
class Event:
    """What the pipeline said about one window."""

    device: str
    first: int
    last: int
    fault: str | None = None
    hours_to_failure: float | None = None
    escalated: bool = False


def load_truth(data_dir: Path) -> tuple[dict[str, Truth], float]:
    """Every simulator's truth file: device -> Truth, and the simulated seconds per reading."""
    truths: dict[str, Truth] = {}
    dts = set()
    for path in sorted(data_dir.glob(f"device-sim-*/{TRUTH_FILE}")):
        doc = json.loads(path.read_text())
        dts.add(float(doc["dt"]))
        for f in doc["faults"]:
            truths[f["device"]] = Truth(f["device"], f["kind"], f["onset_seq"], f["failure_seq"])
    if len(dts) > 1:
        raise ValueError(f"simulators disagree on the reading interval: {sorted(dts)}")
    return truths, (dts.pop() if dts else 0.0)


def load_events(data_dir: Path) -> list[Event]:
    """Every event in the cloud stores (optional columns are read when the store has them)."""
    out: list[Event] = []
    for path in sorted(data_dir.glob("cloud-*/cloud.db")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cols = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
            extra = [c for c in ("fault", "hours_to_failure", "escalated") if c in cols]
            query = "SELECT device, first, last" + "".join(f", {c}" for c in extra) + " FROM events"
            for row in conn.execute(query):
                named = dict(zip(extra, row[3:], strict=True))
                out.append(Event(row[0], row[1], row[2], **named))
        finally:
            conn.close()
    return out


def evaluate(
    truths: dict[str, Truth],
    events: list[Event],
    produced: dict[str, int],
    dt: float,
) -> dict[str, Any]:
    """The detection metrics defined in this module's docstring."""
    hour = 3600.0 / dt if dt else math.inf  # readings per simulated hour
    by_device: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_device[e.device].append(e)

    healthy_readings = 0
    false_alarms = 0
    predicted: dict[str, list[bool]] = defaultdict(list)
    errors: list[float] = []
    for device, made in produced.items():
        t = truths.get(device)
        onset = t.onset_seq if t is not None and t.onset_seq < made else made
        healthy_readings += onset
        for e in by_device.get(device, []):
            hit = t is not None and e.last >= t.onset_seq and t.onset_seq < made
            if not hit:
                false_alarms += 1
            key = e.fault or "any"
            predicted[key].append(
                hit and (e.fault is None or (t is not None and e.fault == t.kind))
            )
            if (
                hit
                and t is not None
                and t.failure_seq is not None
                and e.hours_to_failure is not None
            ):
                errors.append(abs(e.hours_to_failure - (t.failure_seq - e.last) / hour))

    per_kind: dict[str, dict[str, Any]] = {}
    faulty: dict[str, list[Truth]] = defaultdict(list)
    for t in truths.values():
        if t.onset_seq < produced.get(t.device, 0):
            faulty[t.kind].append(t)
    for kind, items in sorted(faulty.items()):
        delays = []
        for t in items:
            hits = [e.last for e in by_device.get(t.device, []) if e.last >= t.onset_seq]
            if hits:
                delays.append((min(hits) - t.onset_seq + 1) / hour)
        per_kind[kind] = {
            "devices": len(items),
            "detected": len(delays),
            "recall": len(delays) / len(items),
            "mean_delay_h": sum(delays) / len(delays) if delays else None,
        }
    precision = {
        k: {"events": len(v), "precision": sum(v) / len(v) if v else None}
        for k, v in sorted(predicted.items())
    }
    healthy_hours = healthy_readings / hour if dt else 0.0
    escalated = sum(1 for e in events if e.escalated)
    return {
        "faults": per_kind,
        "precision": precision,
        "events": len(events),
        "false_alarms": false_alarms,
        "false_alarms_per_device_hour": false_alarms / healthy_hours if healthy_hours else None,
        "failure_prediction_mae_h": sum(errors) / len(errors) if errors else None,
        "failure_predictions": len(errors),
        "escalation_rate": escalated / len(events) if events else None,
        "simulated_hours": max(produced.values(), default=0) / hour if dt else 0.0,
    }


def bandwidth(report: dict[str, Any]) -> dict[str, Any]:
    """Bytes per hop and the reduction factors from the report's `bytes`."""
    b = report["bytes"]
    dev, ef, fc = b["device_edge"], b["edge_fog"], b["fog_cloud"]
    return {
        **b,
        "edge_reduction": dev / ef if ef else None,
        "end_to_end_reduction": dev / fc if fc else None,
    }


def format_evaluation(ev: dict[str, Any]) -> str:
    """The evaluation as text tables."""

    def num(x: Any, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    lines = [f"scenario {ev['scenario']}: {ev['simulated_hours']:.1f} simulated hours", ""]
    lines.append(f"{'fault kind':<16}{'devices':>8}{'detected':>10}{'recall':>8}{'delay h':>9}")
    for kind, r in ev["faults"].items():
        lines.append(
            f"{kind:<16}{r['devices']:>8}{r['detected']:>10}{num(r['recall']):>8}"
            f"{num(r['mean_delay_h']):>9}"
        )
    lines.append("")
    for kind, p in ev["precision"].items():
        lines.append(f"precision ({kind}): {num(p['precision'])} over {p['events']} events")
    lines += [
        f"false alarms: {ev['false_alarms']} ({num(ev['false_alarms_per_device_hour'], '{:.3f}')}"
        " per device-hour)",
        f"failure prediction MAE: {num(ev['failure_prediction_mae_h'])} h "
        f"over {ev['failure_predictions']} predictions",
        f"escalation rate: {num(ev['escalation_rate'])}",
    ]
    bw = ev["bandwidth"]
    lines.append(
        f"bytes: device->edge {bw['device_edge']:,}, edge->fog {bw['edge_fog']:,} "
        f"({num(bw['edge_reduction'], '{:.1f}')}x less), fog->cloud {bw['fog_cloud']:,} "
        f"({num(bw['end_to_end_reduction'], '{:.1f}')}x less than device->edge)"
    )
    c = ev["custody"]
    lines.append(
        f"custody: produced {c['produced']:,}, covered {c['covered']:,}, dropped "
        f"{sum(c['dropped'].values()):,}, unaccounted {c['unaccounted']}, "
        f"duplicates {c['duplicates']}"
    )
    return "\n".join(lines)
