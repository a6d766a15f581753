"""The edge deciding with the built-in models and escalating to the fog, through the pipeline."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fogline.supervisor import read_pid
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(240)

SCENARIO = """
name = "escalations"
devices = 30
edges = 2
duration = 18
rate = 10
samples_per_message = 10
time_scale = 720
seed = 5

[faults]
horizon_h = 1.5
wear_hours = [0.5, 1.5]

[faults.rates]
bearing_wear = 0.2
overheating = 0.2
imbalance = 0.1
sensor_spikes = 0.1

[edge]
# Ask the fog about nearly every suspect window, and do not wait long for it.
confidence_threshold = 0.999
escalation_timeout = 1.0
"""


def test_models_warn_escalate_and_decide_alone_when_the_fog_is_stopped(tmp_path: Path) -> None:
    scenario = tmp_path / "escalations.toml"
    scenario.write_text(SCENARIO)
    data = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fogline.cli", "simulate", str(scenario), "--json",
         "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: read_pid(data / "run", "device-sim-s0"), 60, "the simulator to start")
        time.sleep(7)
        fog = read_pid(data / "run", "fog-f0")
        assert fog is not None
        # The fog stops answering (frozen, still connected): escalations must time out.
        os.kill(fog, signal.SIGSTOP)
        time.sleep(4)
        os.kill(fog, signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    ev = json.loads(out)
    assert ev["custody"]["unaccounted"] == 0 and ev["custody"]["duplicates"] == 0

    conn = sqlite3.connect(data / "cloud-c0" / "cloud.db")
    rows = conn.execute(
        "SELECT verdict_by, unconfirmed, escalated, fault, confidence, recommendation, model"
        " FROM events WHERE kind = 'model'"
    ).fetchall()
    conn.close()
    assert rows, "the models raised no warning"
    by_fog = [r for r in rows if r[0] == "fog"]
    alone = [r for r in rows if r[1] == 1]
    assert by_fog, "no escalation was answered by the fog"
    assert alone, "no escalation came back unconfirmed while the fog was stopped"
    assert all(r[2] == 1 for r in by_fog) and all(
        r[6].startswith("fog_classifier@") for r in by_fog
    )
    assert any(r[5] and r[5].startswith("Schedule maintenance within") for r in rows)
    # Warnings were raised for the injected wear-out faults.
    for kind in ("bearing_wear", "overheating"):
        assert ev["faults"][kind]["detected"] >= 1, kind
    assert ev["escalation_rate"] and ev["escalation_rate"] > 0
