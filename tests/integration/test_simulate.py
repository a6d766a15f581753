"""`fogline simulate`: the quick scenario through the real pipeline, judged against the truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(180)

KINDS = {"bearing_wear", "overheating", "imbalance"}


def test_quick_scenario_is_evaluated_and_accounted_for(tmp_path: Path) -> None:
    data = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "simulate", "quick", "--json",
         "--data-dir", str(data)],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads(proc.stdout)
    assert ev == json.loads((data / "evaluation.json").read_text())
    assert ev["custody"]["unaccounted"] == 0 and ev["custody"]["duplicates"] == 0
    assert ev["custody"]["produced"] == 50 * 10 * 20
    # The truth left by the side door: the simulator's own file, never the telemetry.
    truth = json.loads((data / "device-sim-s0" / "truth.json").read_text())
    assert {f["kind"] for f in truth["faults"]} >= KINDS
    # Every kind whose onset was produced is judged, with all the metrics.
    produced_kinds = {f["kind"] for f in truth["faults"] if f["onset_seq"] < 200}
    assert set(ev["faults"]) == produced_kinds
    for row in ev["faults"].values():
        assert set(row) == {"devices", "detected", "recall", "mean_delay_h"}
        assert 0 <= row["recall"] <= 1
    # Wear-out faults end in a trip within the run: the z-score rule sees every one of them.
    for kind in KINDS & set(ev["faults"]):
        assert ev["faults"][kind]["detected"] >= 1
    assert ev["events"] > 0 and 0 <= ev["precision"]["any"]["precision"] <= 1
    assert ev["false_alarms_per_device_hour"] is not None
    assert ev["bandwidth"]["edge_reduction"] > 1
    assert ev["simulated_hours"] == pytest.approx(2.0, rel=0.01)

    # The operator's views of the same store: every query answers, coverage agrees with custody.
    def query(*args: str) -> list[dict[str, object]]:
        out = subprocess.run(
            [sys.executable, "-m", "fogline.cli", "query", *args,
             "--data-dir", str(data), "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return list(json.loads(out.stdout))

    coverage = query("coverage")
    assert len(coverage) == 50 and all(row["unaccounted"] == 0 for row in coverage)
    assert sum(int(str(row["produced"])) for row in coverage) == ev["custody"]["produced"]
    at_risk = query("at-risk")
    assert at_risk, "the models warned about no device"
    hours = [r["hours_to_failure"] for r in at_risk if r["hours_to_failure"] is not None]
    assert hours == sorted(hours)  # soonest first
    assert query("events", "--device", str(at_risk[0]["device"]))
    assert query("summaries", "--limit", "5") and query("rollups")
    assert query("rollouts") == []  # no model was rolled out in this run
    page = tmp_path / "report.html"
    subprocess.run(
        [sys.executable, "-m", "fogline.cli", "report", "--data-dir", str(data),
         "--html", str(page)],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    html = page.read_text()
    assert html.count("data:image/png;base64,") >= 3 and "http://" not in html


def test_exported_windows_are_labelled_and_reproducible(tmp_path: Path) -> None:
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for path in paths:
        proc = subprocess.run(
            [sys.executable, "-m", "fogline.cli", "simulate", "quick",
             "--export-windows", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()
    d = np.load(paths[0])
    n = 50 * (20 * 10 // 20)
    assert d["X"].shape == (n, 28) and np.isfinite(d["X"]).all()
    names = list(d["kind_names"])
    kinds = {names[k] for k in d["kind"]}
    assert "normal" in kinds and kinds >= KINDS
    wearing = np.isin(d["kind"], [names.index(k) for k in KINDS])
    assert np.isfinite(d["hours_to_failure"][wearing]).all()
    assert np.isnan(d["hours_to_failure"][d["kind"] == names.index("normal")]).mean() > 0.5
