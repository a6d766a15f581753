"""Model updates over the air, end to end: real broker, real processes, real signatures.

A valid model reaches every edge (one of them offline during the push); a deliberately worse
model is rolled back after its canary period without reaching the other edges; the accounting
of the telemetry is untouched by all of it, and every step is in the cloud store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fogline.cli import main as fogline_main
from fogline.models.catalog import default_model_path
from fogline.models.layers import Dense
from fogline.models.loaded import load_model
from fogline.models.writer import write_model
from tests.chaos.conftest import (
    Hand,
    assert_every_device_accounted,
    cloud_rows,
    report_from,
    say,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

EDGES = ["e0", "e1", "e2"]
DEVICES, DURATION, CANARY = 30, 45, 8.0


def always_overheating() -> bytes:
    """A classifier like the shipped one that calls every window `overheating`, sure of it."""
    base = load_model(default_model_path("classifier"))
    classes = base.meta["class_names"]
    bias = np.zeros(len(classes))
    bias[classes.index("overheating")] = 20.0
    layer = Dense(
        weights=np.zeros((len(classes), len(base.features))), bias=bias, activation="softmax"
    )
    meta = {**base.meta, "version": 99, "description": "deliberately bad"}
    return write_model([layer], metadata=meta, input_name="features", output_name="probabilities")


def push(data_dir: Path, name: str, data: bytes) -> None:
    """What an operator does: `fogline models push FILE`."""
    path = data_dir.parent / f"{name}.tflite"
    path.write_bytes(data)
    assert fogline_main(["models", "push", str(path), "--data-dir", str(data_dir)]) == 0


def installed(hand: Hand, edge: str) -> float:
    """Models installed by `edge` since it started (re-acknowledged ones not counted)."""
    return hand.watcher.gauge("edge", edge, "ota.installed") or 0.0


def test_signed_rollout_canary_rollback_and_an_offline_edge(
    hand: Hand,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = hand.data
    keys = tmp_path / "keys"
    assert fogline_main(["keys", "init", "--dir", str(keys)]) == 0
    assert fogline_main(["keys", "delegate", "f0", "--dir", str(keys), "--days", "1"]) == 0
    hand.start_layers(
        EDGES,
        edge_args=("--ota-root-key", str(keys / "signing.pub")),
        fog_args=(
            "--signing-dir", str(keys), "--canary-period", str(CANARY),
            "--canary-share", "0.3", "--model-chunk-bytes", "4096",
        ),
    )  # fmt: skip
    hand.term("edge-e2")  # offline during the first push; its telemetry waits in the broker
    hand.start_sim(DEVICES, len(EDGES), DURATION, "--faults", "none")
    wait_for(lambda: hand.watcher.gauge("edge", "e1", "position"), 20, "telemetry at e1")

    # 1. A valid model (the shipped classifier, as version 2): canary, then every edge.
    push(data, "classifier-v2", default_model_path("classifier").read_bytes())
    wait_for(
        lambda: all(installed(hand, e) >= 1 for e in ("e0", "e1")),
        CANARY + 20,
        "e0 and e1 to install classifier v2",
    )
    hand.restart("edge-e2")
    wait_for(lambda: installed(hand, "e2") >= 1, 20, "e2, back online, to install v2")
    # The dashboard shows the rollout and what every edge runs.
    status = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "status", "--once", "--json",
         "--broker-port", str(hand.broker.port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    procs = {f"{p['role']}-{p['id']}": p for p in json.loads(status.stdout)["processes"]}
    rollout = procs["fog-f0"]["rollouts"]["classifier"]
    assert (rollout["version"], rollout["state"]) == (2, "promoted"), rollout
    assert {e: a["status"] for e, a in rollout["edges"].items()} == dict.fromkeys(
        EDGES, "installed"
    )
    for e in EDGES:
        assert procs[f"edge-{e}"]["models"]["classifier"] == "classifier@2"
    table = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "status", "--once",
         "--broker-port", str(hand.broker.port)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert "model rollouts" in table.stdout and "promoted" in table.stdout, table.stdout

    # 2. A worse model: only the canary gets it, and it is rolled back after the period.
    push(data, "classifier-bad", always_overheating())
    wait_for(
        lambda: sum(installed(hand, e) for e in EDGES) >= 5,
        CANARY + 30,
        "the canary to install v3 and then the rollback v4",
    )
    # Latencies travel in the metrics: every decided window at the edges, every stored warning.
    assert all((hand.watcher.gauge("edge", e, "latency.decision.count") or 0) > 0 for e in EDGES)
    assert (hand.watcher.gauge("cloud", "c0", "latency.commit.count") or 0) > 0
    assert 0 < (hand.watcher.gauge("edge", "e0", "latency.decision.p50_ms") or 0) < 1000
    hand.finish(EDGES, sim_timeout=DURATION + 30)

    rep = report_from(data)
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert_every_device_accounted(data)

    events = cloud_rows(data, "SELECT version, event, edge, detail FROM model_events ORDER BY seq")
    say("model events", *events)
    by = {(v, ev, edge) for v, ev, edge, _ in events}
    assert (2, "promoted", None) in by
    assert {e for v, ev, e in by if v == 2 and ev == "installed"} == set(EDGES)
    canaries = {e for v, ev, e in by if v == 3 and ev == "installed"}
    assert len(canaries) == 1, events
    assert (3, "rolled_back", None) in by
    (why,) = [d for v, ev, _, d in events if v == 3 and ev == "rolled_back"]
    assert "warning rate" in why
    # The canary got the previous model back as v4; the others never saw v3.
    assert {e for v, ev, e in by if v == 4 and ev == "installed"} == canaries
    assert not {e for v, ev, e in by if v >= 3 and ev == "installed"} - canaries
    # Nothing was refused: the bad model was healthy by its golden inputs, just wrong.
    assert not [row for row in events if row[1] == "rejected"]
    # The operator's view of the same history.
    capsys.readouterr()
    assert (
        fogline_main(["query", "rollouts", "--data-dir", str(data), "--json", "--limit", "0"]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert len(shown) == len(events) and shown[0]["ts"] >= shown[-1]["ts"]
    shutil.rmtree(keys)
