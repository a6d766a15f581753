"""Model benchmark: inference cost per window (ai-edge-litert vs the numpy executor) and what
float16 / int8 cost in size and accuracy against float32, on the factory test split.

`run(quick)` returns the figures, `render(res, command)` the Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fogline.models import build
from fogline.models.executor import execute
from fogline.models.reader import validate
from fogline.models.runtime import Model
from fogline.models.writer import FLAVOURS
from fogline.scenario import load

BATCHES = (1, 32, 256)
SEED = build.DEFAULT_SEED
LEGACY_PYTHON = Path(__file__).resolve().parents[1] / ".venv-legacy" / "bin" / "python"
# Runs in the tflite-runtime 2.14 environment (numpy < 2): only numpy and tflite_runtime.
_LEGACY_TIMER = """
import json, statistics, sys, time
import numpy as np
from tflite_runtime.interpreter import Interpreter
model, inputs, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
x_all = np.load(inputs)
it = Interpreter(model_path=model, num_threads=1)
inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
result = {}
for batch in (1, 32, 256):
    x = np.ascontiguousarray(x_all[:batch], dtype=np.float32)
    it.resize_tensor_input(inp, list(x.shape))
    it.allocate_tensors()
    def run():
        it.set_tensor(inp, x)
        it.invoke()
        return it.get_tensor(out)
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    result[batch] = statistics.median(times) / len(x) * 1e6
print(json.dumps(result))
"""


def _legacy_us_per_window(data: bytes, x: np.ndarray, repeats: int) -> dict[int, float] | None:
    """Time the same file under tflite-runtime 2.14 (None when .venv-legacy is not set up)."""
    if not LEGACY_PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model, inputs = Path(tmp) / "m.tflite", Path(tmp) / "x.npy"
        model.write_bytes(data)
        np.save(inputs, np.asarray(x, dtype=np.float32))
        proc = subprocess.run(
            [str(LEGACY_PYTHON), "-I", "-c", _LEGACY_TIMER, str(model), str(inputs), str(repeats)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    if proc.returncode != 0:
        return None
    return {int(k): float(v) for k, v in json.loads(proc.stdout).items()}


def _median_us_per_window(fn: Any, x: np.ndarray, repeats: int) -> float:
    fn(x)  # warm up (allocation, resize)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(x) * 1e6


def _key_figures(b: build.Built) -> dict[str, float]:
    m = b.metrics
    if b.name == "anomaly":
        return {
            "auc": m["auc"],
            "detection_rate": m["detection_rate"],
            "false_alarm_rate": m["false_alarm_rate"],
        }
    if b.name == "failure":
        return {"mae_hours": m["mae_hours"]}
    return {"accuracy": m["accuracy"], "macro_recall": m["macro_recall"]}


def run(quick: bool) -> dict[str, Any]:
    """Train once on the factory fleet, write every flavour, time and score each."""
    devices = 1000 if quick else 5000
    repeats = 20 if quick else 100
    sc = dataclasses.replace(load("factory"), devices=devices)
    quiet = build.log_print
    build.log_print = lambda *a, **k: None
    try:
        t0 = time.monotonic()
        ds = build.load_windows(sc)
        splits = build.split_devices(ds, seed=SEED)
        trained = build.train_models(ds, splits, seed=SEED)
        train_s = time.monotonic() - t0
        models: list[dict[str, Any]] = []
        for name in build.MODEL_NAMES:
            t = trained[name]
            x_all = t.result.normalisation.apply(ds.x[splits["test"]])
            base: dict[str, float] = {}
            for flavour in FLAVOURS:
                b = build.export_model(t, ds, splits, flavour=flavour, seed=SEED)
                figures = _key_figures(b)
                if flavour == "float32":
                    base = figures
                parsed = validate(b.data)
                runtime = Model(b.data)
                timing: dict[str, dict[int, float]] = {"litert": {}, "numpy": {}}
                for batch in BATCHES:
                    x = x_all[:batch]
                    timing["litert"][batch] = _median_us_per_window(runtime.predict, x, repeats)
                    timing["numpy"][batch] = _median_us_per_window(
                        lambda v, p=parsed: execute(p, v), x, repeats
                    )
                legacy = _legacy_us_per_window(b.data, x_all[: max(BATCHES)], repeats)
                if legacy is not None:
                    timing["tflite-runtime 2.14"] = legacy
                models.append(
                    {
                        "model": name,
                        "flavour": flavour,
                        "bytes": len(b.data),
                        "figures": figures,
                        "delta": {k: figures[k] - base[k] for k in figures},
                        "us_per_window": timing,
                    }
                )
    finally:
        build.log_print = quiet
    return {
        "scenario": sc.name,
        "devices": devices,
        "seed": SEED,
        "test_windows": int(splits["test"].sum()),
        "train_seconds": train_s,
        "repeats": repeats,
        "models": models,
    }


def _fmt(v: float) -> str:
    return f"{v:+.4f}" if v else "0"


def render(res: dict[str, Any], command: str) -> str:
    """The Markdown section for BENCHMARKS.md."""
    lines = [
        f"## models: inference cost and quantisation loss ({res['scenario']}, "
        f"{res['devices']:,} devices, seed {res['seed']})",
        "",
        f"Command: `{command}`. Training all four models took {res['train_seconds']:.1f} s; "
        f"figures on the test split ({res['test_windows']:,} windows); times are the median of "
        f"{res['repeats']} runs, one thread, in microseconds per window.",
        "",
        "| model | flavour | bytes | litert b1 | litert b32 | litert b256 | tflite-runtime b1 "
        "| tflite-runtime b32 | tflite-runtime b256 | numpy b1 | numpy b32 | numpy b256 "
        "| test figures | delta vs float32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for m in res["models"]:
        t = m["us_per_window"]
        figures = ", ".join(f"{k} {v:.4f}" for k, v in m["figures"].items())
        delta = ", ".join(f"{k} {_fmt(v)}" for k, v in m["delta"].items())
        cells = [
            m["model"],
            m["flavour"],
            f"{m['bytes']:,}",
            *(f"{t['litert'][b]:.2f}" for b in BATCHES),
            *(
                f"{t['tflite-runtime 2.14'][b]:.2f}" if "tflite-runtime 2.14" in t else "-"
                for b in BATCHES
            ),
            *(f"{t['numpy'][b]:.2f}" for b in BATCHES),
            figures,
            "-" if m["flavour"] == "float32" else delta,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    quick = "--quick" in sys.argv
    print(render(run(quick), "python -m bench.models" + (" --quick" if quick else "")))
