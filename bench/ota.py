"""`ota`: the model lifecycle, measured.

- **retraining**: the fog's numpy retraining of the classifier on the drifted `hot_site`
  windows (ground truth, whole machines held out), per number format: time, model size, accuracy
  and calibration error of the shipped model and of the candidate on the held-out machines;
- **pipeline**: `fogline simulate hot_site` with regional retraining on (the classifier, and
  the classifier with the anomaly model), against the same scenario with retraining off
  (baseline, same seed): false alarms per healthy device-hour over the last 40 % of the
  simulated day (when the retrained models serve every edge) and overall;
- **fleet**: a model published to 100 edges (each one the real installer: signature checks,
  chunks over a real Mosquitto, flatbuffer validation, a TFLite interpreter and the golden-input
  health check): time from the publish to the last edge running it;
- **swap**: how long an edge's worker thread is busy installing (assembling, validating,
  writing, loading, health-checking and switching) — the gap between two inference batches —
  against the edge's 0.1 s tick.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import heading
from edge_agent.ota import MIGRATIONS, Installer
from fog_aggregator.retrain import retrain
from fog_aggregator.rollout import MIGRATIONS as FOG_MIGRATIONS
from fog_aggregator.rollout import RolloutPolicy, Rollouts
from fogline import scenario
from fogline.broker import Broker
from fogline.codec import ModelChunk, decode
from fogline.db import connect, migrate
from fogline.evaluate import load_truth
from fogline.models.build import load_windows
from fogline.models.catalog import default_model_path
from fogline.models.loaded import LoadedModel
from fogline.models.reader import read_model
from fogline.progress import bar
from fogline.report import read_ledgers
from fogline.service import Service
from fogline.signing import SignedManifest, delegate
from fogline.topics import Topics

FLAVOURS = ("float32", "float16", "int8")
LATE_SHARE = 0.4
EDGE_TICK_S = Service.tick_interval


def retraining(devices: int) -> list[dict[str, Any]]:
    """Retrain the shipped classifier on `devices` hot-site machines, per number format."""
    current = default_model_path("classifier").read_bytes()
    meta = read_model(current).metadata_json("fogline")
    ds = load_windows(dataclasses.replace(scenario.load("hot_site"), devices=devices))
    cols = [ds.feature_names.index(f) for f in meta["feature_names"]]
    y = np.array([meta["class_names"].index(ds.kind_names[k]) for k in ds.kind])
    x = ds.x[:, cols].astype(np.float64)
    out = []
    for flavour in FLAVOURS:
        d = retrain(current, x, y, groups=ds.device, version=2, flavour=flavour)
        assert d.candidate is not None and d.current is not None
        out.append(
            {
                "flavour": flavour, "samples": d.samples, "held_out": d.held_out,
                "seconds": d.seconds, "size": d.candidate.size, "current_size": d.current.size,
                "accuracy_before": d.current.accuracy, "accuracy_after": d.candidate.accuracy,
                "ece_before": d.current.ece, "ece_after": d.candidate.ece, "publish": d.publish,
            }
        )  # fmt: skip
    return out


def _late_false_alarms(data: Path, share: float) -> dict[str, float]:
    """False alarms per healthy device-hour from `1 - share` of the run on, and overall."""
    truths, dt = load_truth(data)
    produced = {d: v[1] for d, v in read_ledgers(data)[0].items()}
    start = int(max(produced.values()) * (1 - share))
    (db,) = data.glob("cloud-*/cloud.db")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    events = conn.execute("SELECT device, last FROM events").fetchall()
    conn.close()
    hour = 3600.0 / dt
    out = {}
    for name, lo in (("late", start), ("all", 0)):
        healthy = alarms = 0
        for device, made in produced.items():
            t = truths.get(device)
            onset = t.onset_seq if t is not None and t.onset_seq < made else made
            healthy += max(0, onset - lo)
            alarms += sum(
                1
                for d, last in events
                if d == device and last >= lo and (t is None or last < t.onset_seq)
            )
        out[name] = alarms / (healthy / hour) if healthy else float("nan")
        out[f"{name}_alarms"] = alarms
    return out


def pipeline(quick: bool) -> dict[str, Any]:
    """hot_site with retraining on and off (same seed, same fleet)."""
    base = scenario.load("hot_site")
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, fog in (
            ("retraining off", {"retrain_interval": 0, "retrain_drift": 0}),
            ("retraining on", dict(base.fog)),
            ("retraining on, anomaly too", {**base.fog, "retrain_models": '"classifier,anomaly"'}),
        ):
            lines = [
                f'name = "hot_site_{len(runs)}"',
                f"devices = {150 if quick else base.devices}",
                f"duration = {40 if quick else base.duration}",
                f"edges = {base.edges}", f"rate = {base.rate}",
                f"samples_per_message = {base.samples_per_message}",
                f"time_scale = {base.time_scale}", f"seed = {base.seed}",
                f"ambient_offset = {base.ambient_offset}",
                "[faults]", f"horizon_h = {base.fault_horizon_h}",
                f"wear_hours = {list(base.wear_hours)}",
                "[faults.rates]", *[f"{k} = {v}" for k, v in base.fault_rates.items()],
                "[edge]", *[f"{k} = {v}" for k, v in base.edge.items()],
                "[fog]", *[f"{k} = {v}" for k, v in fog.items()],
            ]  # fmt: skip
            path = Path(tmp) / f"run{len(runs)}.toml"
            path.write_text("\n".join(lines) + "\n")
            data = Path(tmp) / f"run{len(runs)}"
            proc = subprocess.run(
                [sys.executable, "-m", "fogline.cli", "simulate", str(path), "--json",
                 "--data-dir", str(data)],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"simulate failed: {proc.stderr[-2000:]}")
            ev = json.loads(proc.stdout)
            late = _late_false_alarms(data, LATE_SHARE)
            steps = [r for r in _model_events(data) if r["event"] not in ("installed", "rejected")]
            runs[label] = {
                "false_alarms_per_device_hour": ev["false_alarms_per_device_hour"],
                "late": late,
                "escalation_rate": ev["escalation_rate"],
                "unaccounted": ev["custody"]["unaccounted"],
                "model_events": steps,
            }
            print(f"  {label}: {json.dumps(late)}", flush=True)
    return runs


def _model_events(data: Path) -> list[dict[str, Any]]:
    (db,) = data.glob("cloud-*/cloud.db")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    rows = [
        dict(r)
        for r in conn.execute("SELECT name, version, event, detail FROM model_events ORDER BY ts")
    ]
    conn.close()
    return rows


class _Edge:
    """One edge of the fleet: a paho client feeding the real installer."""

    def __init__(self, i: int, port: int, root: Ed25519PrivateKey, folder: Path) -> None:
        self.id = f"e{i:03d}"
        self.topics = Topics()
        self.db = connect(folder / f"{self.id}.db", synchronous="NORMAL")
        migrate(self.db, "edge", MIGRATIONS)
        self.installed_at: float | None = None
        self.busy: list[float] = []
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{self.id}")
        self.installer = Installer(
            self.db, folder / self.id, root.public_key(), self.id,
            names=("classifier",), running=lambda _n: 1, switch=self._switch,
            fetch=self._fetch,
        )  # fmt: skip
        self.client.on_message = lambda _c, _u, m: self.inbox.put(m)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(self.topics.model_sub("f0"), qos=1)
        self.client.loop_start()

    def _fetch(self, name: str, on: bool) -> None:
        topic = self.topics.model_chunks_sub("f0", name)
        (self.client.subscribe(topic, qos=1) if on else self.client.unsubscribe(topic))

    def _switch(self, _name: str, _model: LoadedModel) -> None:
        self.installed_at = time.time()

    def work(self, until: float) -> None:
        """Handle model messages like the edge's worker thread, until installed or `until`."""
        while self.installed_at is None and time.time() < until:
            try:
                m = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if not m.payload:
                continue
            env = decode(bytes(m.payload))
            started = time.perf_counter()
            if isinstance(env.body, ModelChunk):
                self.installer.on_chunk(env.body)
            else:
                self.installer.on_manifest(SignedManifest.from_dict(env.body), time.time())
            if self.installed_at is not None:
                self.busy.append(time.perf_counter() - started)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.db.close()


def fleet(n: int) -> dict[str, Any]:
    """Publish a model to `n` edges; time until the last one runs it."""
    root = Ed25519PrivateKey.generate()
    data = default_model_path("classifier").read_bytes()
    with tempfile.TemporaryDirectory() as tmp, Broker(data_dir=Path(tmp) / "broker") as broker:
        folder = Path(tmp)
        edges = [_Edge(i, broker.port, root, folder) for i in range(n)]
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-fog")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        db = connect(folder / "fog.db")
        migrate(db, "fog", FOG_MIGRATIONS)
        seq = iter(range(1, 10**9))
        signer = delegate(root, "f0", sites=["*"], models=["*"], expires=time.time() + 3600)

        def publish(topic: str, payload: bytes) -> None:
            pub.publish(topic, payload, qos=1, retain=True)

        rollouts = Rollouts(
            db, fog="f0", site="site0", topics=Topics(), signer=signer, publish=publish,
            record=lambda _r: None, next_seq=lambda: next(seq),
            policy=RolloutPolicy(chunk_size=4096),
        )  # fmt: skip
        rollouts.register_baseline("classifier", 1, data)
        time.sleep(1.0)  # every edge subscribed
        published = time.time()
        rollouts.propose("classifier", data, [], origin="bench")  # no canary: every edge
        until = published + 120
        workers = [threading.Thread(target=e.work, args=(until,)) for e in edges]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        done = [e.installed_at - published for e in edges if e.installed_at is not None]
        busy = [b for e in edges for b in e.busy]
        for e in edges:
            e.close()
        pub.loop_stop()
        pub.disconnect()
    return {
        "edges": n,
        "installed": len(done),
        "all_s": max(done) if len(done) == n else None,
        "median_s": statistics.median(done) if done else None,
        "chunks": -(-len(data) // 4096),
        "size": len(data),
        "swap_ms_median": statistics.median(busy) * 1000 if busy else None,
        "swap_ms_max": max(busy) * 1000 if busy else None,
    }


def run(quick: bool) -> dict[str, Any]:
    """All four measurements."""
    steps = 3
    print(bar(0, steps), "retraining per number format", flush=True)
    retrain = retraining(150 if quick else 300)
    print(bar(1, steps), "hot_site with retraining off and on", flush=True)
    pipe = pipeline(quick)
    print(bar(2, steps), "a model to a fleet of 100 edges, and to one edge alone", flush=True)
    fl = fleet(100)
    alone = fleet(1)
    print(bar(3, steps), "done", flush=True)
    return {"retraining": retrain, "pipeline": pipe, "fleet": fl, "alone": alone}


def render(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section of the model lifecycle."""
    lines = [
        *heading("ota: retraining, detection before and after, rollout to a fleet", command),
        "Retraining the classifier at the fog on the drifted `hot_site` fleet (ambient +30 C; "
        "ground truth, whole machines held out; the shipped model is the baseline, judged on "
        "the same held-out machines):",
        "",
        "| format | samples (held out) | retraining s | size B (shipped) | accuracy shipped -> "
        "retrained | calibration error shipped -> retrained | gate |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["retraining"]:
        lines.append(
            f"| {r['flavour']} | {r['samples']:,} ({r['held_out']:,}) | {r['seconds']:.2f} | "
            f"{r['size']:,} ({r['current_size']:,}) | {r['accuracy_before']:.3f} -> "
            f"{r['accuracy_after']:.3f} | {r['ece_before']:.3f} -> {r['ece_after']:.3f} | "
            f"{'publish' if r['publish'] else 'refuse'} |"
        )
    lines += [
        "",
        "The pipeline on `hot_site` (same seed), retraining off (baseline) against on: false "
        f"alarms per healthy device-hour over the last {LATE_SHARE:.0%} of the simulated day "
        "(when the retrained model serves every edge) and over the whole run:",
        "",
        "| run | false alarms / device-h, late (count) | overall | escalation rate | "
        "unaccounted | model steps |",
        "|---|---:|---:|---:|---:|---|",
    ]
    pipe = res["pipeline"]
    for label, r in pipe.items():
        steps = (
            "; ".join(
                f"{e['name']} v{e['version']} {e['event']}"
                + (f" ({(e['detail'] or '').split(';')[0]})" if e["event"] == "rolled_back" else "")
                for e in r["model_events"]
            )
            or "-"
        )
        lines.append(
            f"| {label} | {r['late']['late']:.4f} ({r['late']['late_alarms']}) | "
            f"{r['false_alarms_per_device_hour']:.4f} | {r['escalation_rate']:.2f} | "
            f"{r['unaccounted']} | {steps} |"
        )
    off = pipe["retraining off"]["late"]["late"]
    if off:
        ratios = ", ".join(
            f"{label}: {r['late']['late'] / off:.2f}x" for label, r in pipe.items() if r["late"]
        )
        lines += ["", f"Late false alarms against the baseline's: {ratios}."]
    f, one = res["fleet"], res["alone"]
    lines += [
        "",
        f"A {f['size']:,}-byte model ({f['chunks']} retained chunks) published to {f['edges']} "
        f"edges (the real installer each, all in one process, one Mosquitto): {f['installed']} "
        f"installed, the last after {f['all_s']:.2f} s (median {f['median_s']:.2f} s); to one "
        f"edge alone: {one['all_s']:.2f} s. The inference gap of a swap (the edge's worker "
        f"thread busy assembling, validating, writing, loading, health-checking and switching): "
        f"{one['swap_ms_median']:.1f} ms for an edge alone, {f['swap_ms_median']:.1f} ms median "
        f"and {f['swap_ms_max']:.1f} ms at most with 100 edges sharing one process; the edge's "
        f"tick is {EDGE_TICK_S * 1000:.0f} ms.",
        "",
    ]
    return "\n".join(lines)
