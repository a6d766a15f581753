"""`fogline models build`: train the shipped models from a scenario's simulated fleet.

The pipeline, every step seeded so two builds with the same arguments write the same bytes:

1. export labelled windows from the scenario's fleet (`fogline.simulate.export_windows`);
2. split the devices 70/15/15 into train / validation / test, stratified by each device's fault
   kind so the rare kinds land in every split;
3. train, with `fogline.models.train`: `anomaly` (autoencoder on normal windows, threshold from
   held-out normal windows), `classifier` and the larger `fog_classifier` (fault class), and
   `failure` (hours to failure of wearing faults);
4. write each as `.tflite`, check the numpy executor against the runtime on the test split,
   measure its metrics on the test split through the runtime, store them in the metadata, and
   validate the bytes written.

Windows after a wearing fault's failure (a tripped machine) are left out of the classifiers and
the failure predictor: a stopped machine looks the same whatever tripped it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fogline.errors import FoglineError
from fogline.models.errors import ModelRejected
from fogline.models.executor import execute
from fogline.models.reader import validate
from fogline.models.runtime import Model
from fogline.models.train import (
    TrainConfig,
    TrainResult,
    anomaly_score,
    classify,
    hours_from_output,
    train_autoencoder,
    train_classifier,
    train_failure_predictor,
)
from fogline.models.writer import FLAVOURS, Flavour, write_model
from fogline.progress import bar
from fogline.scenario import Scenario, load

MODEL_NAMES: tuple[str, ...] = ("anomaly", "classifier", "failure", "fog_classifier")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLITS = ("train", "validation", "test")
DEFAULT_SEED = 0
DEFAULT_WINDOW = 20
# The anomaly threshold: this quantile of the score on held-out normal windows, so about 0.5 %
# of normal windows raise a false alarm.
ANOMALY_QUANTILE = 0.995
CONFIDENCE_THRESHOLD = 0.85
# Executor vs runtime, as the toolkit's own tests: float flavours to 1e-5, int8 bit for bit.
FLOAT_RTOL = FLOAT_ATOL = 1e-5
REPRESENTATIVE_ROWS = 2000
# `created` in the metadata must not differ between two builds: SOURCE_DATE_EPOCH (the
# reproducible-builds convention) when set, else this fixed instant.
DEFAULT_CREATED = 0

log_print = print  # progress lines; replaced by tests that want silence


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """Hidden layer widths and optimiser settings of one model."""

    hidden: tuple[int, ...]
    epochs: int
    learning_rate: float = 3e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    normal_per_fault: int = 2


# Chosen on the factory scenario (5,000 devices, seed 0) by test-split accuracy and macro
# recall; weight decay matters most: without it the classifiers learn the training machines.
ARCHITECTURES: dict[str, Architecture] = {
    "anomaly": Architecture(hidden=(16, 6, 16), epochs=40),
    "classifier": Architecture(hidden=(32, 16), epochs=60, weight_decay=1e-4, normal_per_fault=4),
    "failure": Architecture(hidden=(32, 16), epochs=150, batch_size=64, weight_decay=1e-4),
    "fog_classifier": Architecture(
        hidden=(64, 32), epochs=60, weight_decay=5e-4, normal_per_fault=6
    ),
}


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """Labelled windows of a scenario's fleet (one row per device and window)."""

    x: np.ndarray
    kind: np.ndarray
    hours: np.ndarray
    device: np.ndarray
    feature_names: list[str]
    kind_names: list[str]
    scenario: Scenario
    window: int
    dt: float

    @property
    def failed(self) -> np.ndarray:
        """Windows ending after their machine's wearing fault failed (it is tripped)."""
        return np.nan_to_num(self.hours, nan=1.0) <= 0


@dataclass(frozen=True, kw_only=True)
class Built:
    """One written model: its bytes, metadata and test-split metrics."""

    name: str
    flavour: Flavour
    data: bytes
    metadata: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        """The test-split metrics stored in the metadata."""
        metrics: dict[str, Any] = self.metadata["metrics"]
        return metrics


@dataclass(frozen=True, kw_only=True)
class Trained:
    """A trained network before it is written: the train result and what its metadata adds."""

    name: str
    result: TrainResult
    architecture: Architecture
    extra: dict[str, Any] = field(default_factory=dict)


def load_windows(sc: Scenario, *, window: int = DEFAULT_WINDOW) -> Dataset:
    """Export the scenario fleet's labelled windows (as `fogline simulate --export-windows`)."""
    from fogline.simulate import export_windows

    with tempfile.TemporaryDirectory(prefix="fogline-models-") as tmp:
        path = Path(tmp) / "windows.npz"
        # export_windows reports on stderr; the build prints its own progress.
        with contextlib.redirect_stderr(io.StringIO()):
            export_windows(sc, path, window=window)
        with np.load(path) as npz:
            meta = npz["meta"].item()
            return Dataset(
                x=npz["X"].astype(np.float32),
                kind=npz["kind"].astype(np.int64),
                hours=npz["hours_to_failure"].astype(np.float64),
                device=npz["device"].astype(np.int64),
                feature_names=[str(s) for s in npz["feature_names"]],
                kind_names=[str(s) for s in npz["kind_names"]],
                scenario=sc,
                window=window,
                dt=float(json.loads(meta)["dt"]),
            )


def split_devices(ds: Dataset, *, seed: int) -> dict[str, np.ndarray]:
    """Split name -> boolean row mask; devices go 70/15/15, stratified by their fault kind."""
    devices = np.unique(ds.device)
    device_kind = np.zeros(devices.max() + 1, dtype=np.int64)
    np.maximum.at(device_kind, ds.device, ds.kind)
    rng = np.random.default_rng([seed, 0x5B17])
    assigned = np.zeros(devices.max() + 1, dtype=np.int64)
    for k in np.unique(device_kind[devices]):
        group = rng.permutation(devices[device_kind[devices] == k])
        n = len(group)
        n_val = round(n * SPLIT_FRACTIONS[1])
        n_test = round(n * SPLIT_FRACTIONS[2])
        if n >= 3:  # every split gets at least one device of a kind that has three
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        assigned[group[:n_test]] = 2
        assigned[group[n_test : n_test + n_val]] = 1
    return {name: assigned[ds.device] == i for i, name in enumerate(SPLITS)}


def _config(arch: Architecture, seed: int, salt: int) -> TrainConfig:
    return TrainConfig(
        epochs=arch.epochs,
        learning_rate=arch.learning_rate,
        batch_size=arch.batch_size,
        seed=int(np.random.SeedSequence([seed, salt]).generate_state(1)[0]),
        weight_decay=arch.weight_decay,
    )


def _classifier_rows(ds: Dataset, mask: np.ndarray, seed: int, normal_per_fault: int) -> np.ndarray:
    """Training rows: every fault window and at most `normal_per_fault` normal ones per fault.

    Normal windows outnumber each fault kind ~50:1; capping them keeps faults from being
    drowned out.
    """
    usable = mask & ~ds.failed
    faults = np.flatnonzero(usable & (ds.kind > 0))
    normal = np.flatnonzero(usable & (ds.kind == 0))
    rng = np.random.default_rng([seed, 0xC1A5])
    keep = min(len(normal), max(normal_per_fault * len(faults), 1))
    normal = np.sort(rng.choice(normal, size=keep, replace=False))
    return np.sort(np.concatenate([faults, normal]))


def failure_rows(ds: Dataset, mask: np.ndarray) -> np.ndarray:
    """Windows of an active wearing fault before its failure (hours to failure > 0)."""
    return mask & (ds.kind > 0) & np.isfinite(ds.hours) & (ds.hours > 0)


def train_models(
    ds: Dataset,
    splits: dict[str, np.ndarray],
    *,
    seed: int,
    names: Sequence[str] = MODEL_NAMES,
    architectures: dict[str, Architecture] | None = None,
) -> dict[str, Trained]:
    """Train the named models on the train split; float layers, not yet written."""
    archs = {**ARCHITECTURES, **(architectures or {})}
    train = splits["train"]
    out: dict[str, Trained] = {}
    for salt, name in enumerate(MODEL_NAMES):
        if name not in names:
            continue
        arch = archs[name]
        t0 = time.monotonic()
        cfg = _config(arch, seed, salt)
        if name == "anomaly":
            rows = train & (ds.kind == 0)
            result = train_autoencoder(ds.x[rows], hidden=arch.hidden, config=cfg)
            extra: dict[str, Any] = {}
        elif name in ("classifier", "fog_classifier"):
            rows_i = _classifier_rows(ds, train, seed, arch.normal_per_fault)
            result = train_classifier(
                ds.x[rows_i],
                ds.kind[rows_i],
                n_classes=len(ds.kind_names),
                hidden=arch.hidden,
                config=cfg,
                confidence_threshold=CONFIDENCE_THRESHOLD,
            )
            extra = {"class_names": list(ds.kind_names)}
        else:
            rows = failure_rows(ds, train)
            result = train_failure_predictor(
                ds.x[rows], ds.hours[rows], hidden=arch.hidden, config=cfg
            )
            extra = {}
        step = [n for n in MODEL_NAMES if n in names].index(name) + 1
        log_print(
            f"fogline models: {bar(step, len(names), 12)} trained {name} {list(arch.hidden)} in "
            f"{time.monotonic() - t0:.1f}s (loss {result.losses[0]:.4g} -> "
            f"{result.losses[-1]:.4g})",
            file=sys.stderr,
        )
        out[name] = Trained(name=name, result=result, architecture=arch, extra=extra)
    return out


# --------------------------------------------------------------------------- metrics


def auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half."""
    if len(negative) == 0 or len(positive) == 0:
        return float("nan")
    scores = np.concatenate([negative, positive])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[len(negative) :].sum()
    n_pos, n_neg = len(positive), len(negative)
    return float((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classifier_metrics(
    labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro recall, escalation share and per-class precision/recall."""
    predicted, confidence = classify(probabilities)
    per_class: dict[str, dict[str, float | int]] = {}
    for k, name in enumerate(class_names):
        tp = int(((predicted == k) & (labels == k)).sum())
        n_pred = int((predicted == k).sum())
        n_true = int((labels == k).sum())
        per_class[name] = {
            "precision": _r(tp / n_pred) if n_pred else 0.0,
            "recall": _r(tp / n_true) if n_true else 0.0,
            "support": n_true,
        }
    confident = confidence >= CONFIDENCE_THRESHOLD
    recalls = [v["recall"] for v in per_class.values() if v["support"]]
    return {
        "accuracy": _r(float((predicted == labels).mean())) if len(labels) else 0.0,
        "macro_recall": _r(float(np.mean(recalls))) if recalls else 0.0,
        "escalated_share": _r(float((~confident).mean())) if len(labels) else 0.0,
        "confident_accuracy": _r(float((predicted == labels)[confident].mean()))
        if confident.any()
        else 0.0,
        "windows": len(labels),
        "per_class": per_class,
    }


def _r(v: float) -> float:
    return round(float(v), 6)


@dataclass(frozen=True, kw_only=True)
class _Eval:
    """What a model's outputs on the validation and test splits give."""

    thresholds: dict[str, float]
    metrics: dict[str, Any]


def _evaluate(
    trained: Trained,
    predict: Callable[[np.ndarray], np.ndarray],
    ds: Dataset,
    splits: dict[str, np.ndarray],
) -> _Eval:
    norm = trained.result.normalisation
    test = splits["test"]
    if trained.name == "anomaly":

        def score(rows: np.ndarray) -> np.ndarray:
            xn = norm.apply(ds.x[rows])
            return anomaly_score(xn, predict(xn))

        val_normal = score(splits["validation"] & (ds.kind == 0))
        threshold = float(np.quantile(val_normal, ANOMALY_QUANTILE))
        normal = score(test & (ds.kind == 0))
        faults = score(test & (ds.kind > 0) & ~ds.failed)
        failed = score(test & ds.failed)
        return _Eval(
            thresholds={"anomaly_score": _r(threshold)},
            metrics={
                "threshold_quantile": ANOMALY_QUANTILE,
                "false_alarm_rate": _r(float((normal > threshold).mean())),
                "detection_rate": _r(float((faults > threshold).mean())) if len(faults) else 0.0,
                "failed_detection_rate": _r(float((failed > threshold).mean()))
                if len(failed)
                else 0.0,
                "auc": _r(auc(normal, faults)),
                "normal_windows": len(normal),
                "fault_windows": len(faults),
            },
        )
    if trained.name == "failure":
        rows = failure_rows(ds, test)
        got = hours_from_output(predict(norm.apply(ds.x[rows])))
        err = np.abs(got - ds.hours[rows])
        return _Eval(
            thresholds={},
            metrics={
                "mae_hours": _r(float(err.mean())) if len(err) else 0.0,
                "median_abs_error_hours": _r(float(np.median(err))) if len(err) else 0.0,
                "windows": len(err),
            },
        )
    rows = test & ~ds.failed
    probs = predict(norm.apply(ds.x[rows]))
    return _Eval(
        thresholds={"confidence": CONFIDENCE_THRESHOLD},
        metrics=classifier_metrics(ds.kind[rows], probs, ds.kind_names),
    )


def check_executor(data: bytes, x: np.ndarray, *, flavour: Flavour) -> float:
    """Largest |executor - runtime| on `x`; ModelRejected beyond the toolkit's tolerances."""
    parsed = validate(data)
    ours = execute(parsed, x)
    theirs = Model(data).predict(x)
    if ours.shape != theirs.shape:
        raise ModelRejected(f"executor shape {ours.shape} != runtime shape {theirs.shape}")
    diff = float(np.abs(ours.astype(np.float64) - theirs).max()) if ours.size else 0.0
    if flavour == "int8":
        ok = np.array_equal(ours, theirs)
    else:
        # float32 rounding in a dot product grows with its inputs: rows far outside the
        # training distribution (a fault seen by the autoencoder can sit 300 sd out) get the
        # absolute tolerance scaled by their largest input.
        scale = np.maximum(1.0, np.abs(x).max(axis=1, keepdims=True)) if len(x) else 1.0
        bound = FLOAT_ATOL * scale + FLOAT_RTOL * np.abs(theirs)
        ok = bool((np.abs(ours.astype(np.float64) - theirs) <= bound).all())
    if not ok:
        raise ModelRejected(
            f"numpy executor and runtime disagree (max |diff| {diff:.3g}) beyond the tolerance"
        )
    return diff


def created_timestamp() -> str:
    """The metadata's `created`: SOURCE_DATE_EPOCH if set, else a fixed instant."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_CREATED))
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def scenario_metadata(sc: Scenario) -> dict[str, Any]:
    """The scenario facts a model's metadata records (enough to rebuild it)."""
    return {
        "name": sc.name,
        "seed": sc.seed,
        "devices": sc.devices,
        "duration": sc.duration,
        "rate": sc.rate,
        "time_scale": sc.time_scale,
        "fault_rates": dict(sorted(sc.fault_rates.items())),
        "fault_horizon_h": sc.fault_horizon_h,
        "wear_hours": list(sc.wear_hours),
    }


def export_model(
    trained: Trained,
    ds: Dataset,
    splits: dict[str, np.ndarray],
    *,
    flavour: Flavour,
    seed: int,
    version: int = 1,
) -> Built:
    """Write one model as `flavour`, gate it (validate, executor vs runtime) and measure it."""
    result = trained.result
    norm = result.normalisation
    rep_rows = np.flatnonzero(splits["train"])
    rng = np.random.default_rng([seed, 0x1E9])
    if len(rep_rows) > REPRESENTATIVE_ROWS:
        rep_rows = np.sort(rng.choice(rep_rows, REPRESENTATIVE_ROWS, replace=False))
    representative = norm.apply(ds.x[rep_rows])
    description = f"fogline {trained.name} model v{version}"

    def write(metadata: dict[str, Any]) -> bytes:
        return write_model(
            result.layers,
            flavour=flavour,
            metadata=metadata,
            representative=representative if flavour == "int8" else None,
            input_name="features",
            output_name=_OUTPUT_NAME[result.kind],
            description=description,
        )

    test_x = norm.apply(ds.x[splits["test"]])
    # The metadata does not change the graph: measure a draft, then write the real one.
    draft = write({})
    check_executor(draft, test_x, flavour=flavour)
    runtime = Model(draft)
    ev = _evaluate(trained, runtime.predict, ds, splits)
    n_devices = {k: len(np.unique(ds.device[v])) for k, v in splits.items()}
    metadata = result.metadata(
        name=trained.name,
        version=version,
        feature_names=ds.feature_names,
        training_window={"readings": ds.window, "dt_s": ds.dt},
        scenario=scenario_metadata(ds.scenario),
        seed=seed,
        flavour=flavour,
        created=created_timestamp(),
        architecture={"hidden": list(trained.architecture.hidden)},
        split={"fractions": list(SPLIT_FRACTIONS), "devices": n_devices, "by": "device"},
        metrics=ev.metrics,
        **trained.extra,
    )
    metadata["thresholds"] = {**metadata["thresholds"], **ev.thresholds}
    data = write(metadata)
    check_executor(data, test_x, flavour=flavour)
    validate(data)
    return Built(name=trained.name, flavour=flavour, data=data, metadata=metadata)


_OUTPUT_NAME = {
    "autoencoder": "reconstruction",
    "classifier": "probabilities",
    "failure_predictor": "log1p_hours",
}


class BuildFailed(FoglineError):
    """A model failed its accuracy gate; nothing was written."""


def build(
    sc: Scenario,
    *,
    seed: int = DEFAULT_SEED,
    window: int = DEFAULT_WINDOW,
    flavour: Flavour = "float32",
    version: int = 1,
    architectures: dict[str, Architecture] | None = None,
    gate: bool = True,
) -> list[Built]:
    """Export, split, train, write and gate all four models; nothing touches the disk.

    `gate=False` skips the fog-at-least-as-accurate-as-edge check (for tiny test fleets); the
    executor-vs-runtime check and validation always run.
    """
    t0 = time.monotonic()
    ds = load_windows(sc, window=window)
    splits = split_devices(ds, seed=seed)
    counts = ", ".join(
        f"{k} {len(np.unique(ds.device[v]))} devices / {int(v.sum()):,} windows"
        for k, v in splits.items()
    )
    log_print(
        f"fogline models: {len(ds.x):,} windows of {window} readings from scenario {sc.name} "
        f"(seed {sc.seed}) in {time.monotonic() - t0:.1f}s; {counts}",
        file=sys.stderr,
    )
    trained = train_models(ds, splits, seed=seed, architectures=architectures)
    built = []
    for name in MODEL_NAMES:
        b = export_model(trained[name], ds, splits, flavour=flavour, seed=seed, version=version)
        log_print(
            f"fogline models: wrote {name} ({flavour}, {len(b.data):,} bytes): {key_metrics(b)}",
            file=sys.stderr,
        )
        built.append(b)
    by_name = {b.name: b for b in built}
    edge_acc = by_name["classifier"].metrics["accuracy"]
    fog_acc = by_name["fog_classifier"].metrics["accuracy"]
    if gate and fog_acc < edge_acc:
        raise BuildFailed(
            f"fog_classifier accuracy {fog_acc:.4f} is below the edge classifier's "
            f"{edge_acc:.4f} on the test split"
        )
    return built


def key_metrics(b: Built) -> str:
    """One line of the metrics that matter for a model."""
    m = b.metrics
    if b.name == "anomaly":
        return (
            f"threshold {b.metadata['thresholds']['anomaly_score']:.4g}, false alarms "
            f"{m['false_alarm_rate']:.2%}, detection {m['detection_rate']:.1%}, AUC {m['auc']:.3f}"
        )
    if b.name == "failure":
        return f"MAE {m['mae_hours']:.2f} h over {m['windows']} windows"
    return (
        f"accuracy {m['accuracy']:.1%}, macro recall {m['macro_recall']:.1%}, "
        f"escalated {m['escalated_share']:.1%}"
    )


def write_all(built: Sequence[Built], out: Path) -> list[Path]:
    """Write each model to `out/<name>.tflite` (temporary file and rename)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for b in built:
        validate(b.data)
        target = out / f"{b.name}.tflite"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(b.data)
        tmp.replace(target)
        paths.append(target)
    return paths


def format_table(built: Sequence[Built]) -> str:
    """The final table: model, flavour, size, key metrics."""
    rows = [("model", "flavour", "bytes", "test split")]
    rows += [(b.name, b.flavour, f"{len(b.data):,}", key_metrics(b)) for b in built]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    for b in built:
        if b.name == "classifier" or b.name == "fog_classifier":
            lines.append("")
            lines.append(f"{b.name} per class (test split): precision / recall / windows")
            for cls, v in b.metrics["per_class"].items():
                lines.append(
                    f"  {cls:<15} {v['precision']:>6.1%}  {v['recall']:>6.1%}  {v['support']:>6}"
                )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `fogline models build`."""
    p.add_argument(
        "--scenario", default="factory",
        help="built-in scenario name or TOML file whose fleet is simulated (default: factory)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=Path(".fogline/models"),
        help="folder for <name>.tflite (default: .fogline/models)",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SEED,
        help=f"seed of the device split and training (default: {DEFAULT_SEED})",
    )  # fmt: skip
    p.add_argument(
        "--window", type=int, default=DEFAULT_WINDOW,
        help=f"readings per window (default: {DEFAULT_WINDOW})",
    )  # fmt: skip
    p.add_argument(
        "--flavour", choices=FLAVOURS, default="float32",
        help="weights as float32 (default), float16 or int8",
    )  # fmt: skip
    p.add_argument("--devices", type=int, help="override the scenario's number of devices")
    p.add_argument(
        "--model-version", type=int, default=1,
        help="the version recorded in the metadata (default: 1)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Entry of `fogline models build`."""
    sc = load(args.scenario)
    if args.devices is not None:
        if args.devices < 10:
            print("fogline models build: --devices must be at least 10", file=sys.stderr)
            return 2
        sc = replace(sc, devices=args.devices)
    if args.window < 2:
        print("fogline models build: --window must be at least 2", file=sys.stderr)
        return 2
    try:
        built = build(
            sc, seed=args.seed, window=args.window, flavour=args.flavour,
            version=args.model_version,
        )  # fmt: skip
    except (BuildFailed, ModelRejected) as exc:
        print(f"fogline models build: refused, nothing written: {exc}", file=sys.stderr)
        return 1
    paths = write_all(built, args.out)
    print(format_table(built))
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0
