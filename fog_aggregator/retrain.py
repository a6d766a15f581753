"""Regional retraining at the fog: train a candidate, write it, check it, publish only if better.

The samples are the windows the edges sent up (`train` records: a share of normal windows) and
the escalated windows with the fog's verdict. Raw samples stay at the fog. A candidate is
trained with numpy on the samples of most machines, written as `.tflite` (float32, float16 or
int8), parsed back, and the numpy reference executor runs the exact bytes on the held-out
machines' samples, as it does the current model. The candidate is published only when it is at
least as good: accuracy not lower, calibration (expected calibration error) not worse by more
than `ECE_SLACK`, latency and size within `GROWTH` of the current model's.

- the **classifier** is judged by accuracy and calibration against the labels;
- the **anomaly** autoencoder is trained on the normal samples only, its threshold is the 99th
  percentile of their scores, and it is judged by balanced accuracy (the mean of the share of
  normal samples under the threshold and of other samples over it; calibration does not apply).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fogline.features import feature_names
from fogline.models.executor import execute
from fogline.models.reader import read_model, validate
from fogline.models.train import (
    TrainConfig,
    TrainResult,
    anomaly_score,
    train_autoencoder,
    train_classifier,
)
from fogline.models.writer import FLAVOURS, write_model

#: The edge models the fog retrains (the failure predictor needs hours-to-failure labels, which
#: regional samples do not carry).
RETRAINED = ("classifier", "anomaly")
#: The candidate's expected calibration error may exceed the current model's by this much.
ECE_SLACK = 0.02
#: The candidate may be this many times slower or larger than the current model.
GROWTH = 2.0
ECE_BINS = 10


@dataclass(frozen=True, slots=True)
class Quality:
    """How a model does on the held-out samples (measured on its exact bytes)."""

    accuracy: float
    ece: float
    latency_ms: float
    size: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one retraining run: publish or not, and why; `data` is the candidate's
    bytes (None when none was trained)."""

    name: str
    publish: bool
    reason: str
    samples: int
    held_out: int
    seconds: float
    flavour: str
    candidate: Quality | None
    current: Quality | None
    data: bytes | None = None

    def summary(self) -> dict[str, Any]:
        """The decision without the model bytes (recorded and sent upstream)."""
        out = asdict(self)
        out.pop("data")
        return out


def calibration_error(probs: np.ndarray, labels: np.ndarray) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over confidence bins."""
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    err = 0.0
    for b in range(ECE_BINS):
        mask = bins == b
        if mask.any():
            err += mask.mean() * abs(right[mask].mean() - conf[mask].mean())
    return float(err)


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def quality(data: bytes, x: np.ndarray, labels: np.ndarray) -> Quality:
    """How the model `data` does on raw features `x` (a classifier: accuracy and calibration
    against `labels`; an autoencoder: balanced accuracy of its threshold against `labels == 0`,
    normal), and its latency on up to 256 rows (the best of five runs)."""
    parsed = validate(data)
    meta = parsed.metadata_json("fogline")
    norm = meta.get("normalisation") or {}
    mean = np.asarray(norm.get("mean", 0.0), dtype=np.float64)
    std = np.asarray(norm.get("std", 1.0), dtype=np.float64)
    xn = ((x - mean) / std).astype(np.float32)
    out = np.asarray(execute(parsed, xn), dtype=np.float64)
    ms = min(_timed(lambda: execute(parsed, xn[:256])) for _ in range(5)) * 1000.0
    if meta.get("kind") == "autoencoder":
        flagged = anomaly_score(xn, out) >= float(meta["thresholds"]["anomaly_score"])
        normal = labels == 0
        rates = [float((~flagged[normal]).mean())] if normal.any() else []
        rates += [float(flagged[~normal].mean())] if (~normal).any() else []
        return Quality(float(np.mean(rates)) if rates else 0.0, 0.0, ms, len(data))
    accuracy = float((out.argmax(axis=1) == labels).mean()) if len(labels) else 0.0
    return Quality(accuracy, calibration_error(out, labels), ms, len(data))


def samples_for(
    rows: list[tuple[bytes, str, str, str]], features: tuple[str, ...], classes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature rows (in the model's feature order), class indexes and devices of stored samples
    `(features blob, fields json, label, device)`; samples that do not fit are skipped."""
    xs, ys, ds = [], [], []
    columns: dict[str, np.ndarray | None] = {}
    for blob, fields_json, label, device in rows:
        if label not in classes or not fields_json:
            continue
        if fields_json not in columns:
            names = feature_names(json.loads(fields_json))
            ok = all(f in names for f in features)
            columns[fields_json] = np.array([names.index(f) for f in features]) if ok else None
        cols = columns[fields_json]
        values = np.frombuffer(blob, dtype="<f4")
        if cols is None or len(values) <= int(cols.max()):
            continue
        xs.append(values[cols])
        ys.append(classes.index(label))
        ds.append(device)
    if not xs:
        return np.zeros((0, len(features))), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=str)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.int64), np.asarray(ds)


def split(
    n: int, groups: np.ndarray | None, held_out: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(held-out rows, training rows): a `held_out` share of the rows, by whole groups if given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(n)
        k = max(1, int(n * held_out))
        return order[:k], order[k:]
    names, index = np.unique(groups, return_inverse=True)
    test_groups: list[int] = []
    rows = 0
    for g in rng.permutation(len(names)):
        if rows >= held_out * n:
            break
        test_groups.append(int(g))
        rows += int((index == g).sum())
    test = np.isin(index, test_groups)
    return np.flatnonzero(test), np.flatnonzero(~test)


def retrain(
    current: bytes,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    version: int,
    flavour: str = "float32",
    groups: np.ndarray | None = None,
    held_out: float = 0.25,
    seed: int = 0,
    epochs: int = 300,
) -> Decision:
    """Train a candidate for the model `current` (classifier or anomaly autoencoder) on
    regional samples and gate it; `labels` index the classifier's classes (0 = normal).

    With `groups` (the device of each sample) whole devices are held out, so that no machine
    is both learnt and judged on.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r} is not one of {', '.join(FLAVOURS)}")
    started = time.perf_counter()
    meta = read_model(current).metadata_json("fogline")
    autoencoder = meta.get("kind") == "autoencoder"
    test, train = split(len(x), groups, held_out, seed)
    n_test = len(test)

    def decided(publish: bool, reason: str, **kw: Any) -> Decision:
        return Decision(
            name=str(meta.get("name", "model")), publish=publish, reason=reason,
            samples=len(x), held_out=n_test, seconds=time.perf_counter() - started,
            flavour=flavour, **{"candidate": None, "current": None, **kw},
        )  # fmt: skip

    config = TrainConfig(epochs=epochs, seed=seed, learning_rate=1e-2)
    hidden = (meta.get("architecture") or {}).get("hidden")
    result: TrainResult
    if autoencoder:
        normal = train[labels[train] == 0]
        if len(normal) < 20:
            return decided(False, f"too few normal samples to train on ({len(normal)})")
        fit_rows = normal
        result = train_autoencoder(x[normal], hidden=hidden or [16, 6, 16], config=config)
    else:
        classes = list(meta["class_names"])
        if len(train) < 2 * len(classes) or len(np.unique(labels[train])) < 2:
            return decided(False, f"too few samples to train on ({len(train)})")
        fit_rows = train
        result = train_classifier(
            x[train], labels[train], n_classes=len(classes), hidden=hidden or [32, 16],
            config=config,
        )  # fmt: skip
    out_meta = {
        **meta,
        "version": version,
        "flavour": flavour,
        "normalisation": result.normalisation.to_dict(),
        "thresholds": {**meta.get("thresholds", {}), **result.thresholds},
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "retrained": {"samples": len(fit_rows), "held_out": n_test, "seed": seed},
    }
    data = write_model(
        result.layers,
        flavour=flavour,
        metadata=out_meta,
        representative=result.normalisation.apply(x[fit_rows]) if flavour == "int8" else None,
        input_name="features",
        output_name="reconstruction" if autoencoder else "probabilities",
        description=f"fogline {meta.get('name', 'model')} v{version} (retrained at the fog)",
    )
    cand = quality(data, x[test], labels[test])
    cur = quality(current, x[test], labels[test])
    what = "balanced accuracy" if autoencoder else "accuracy"
    why = []
    if cand.accuracy < cur.accuracy:
        why.append(f"{what} {cand.accuracy:.3f} < current {cur.accuracy:.3f}")
    if cand.ece > cur.ece + ECE_SLACK:
        why.append(f"calibration error {cand.ece:.3f} > current {cur.ece:.3f} + {ECE_SLACK}")
    if cand.latency_ms > GROWTH * cur.latency_ms + 1.0:
        why.append(f"latency {cand.latency_ms:.1f} ms > {GROWTH}x current {cur.latency_ms:.1f}")
    if cand.size > GROWTH * cur.size:
        why.append(f"size {cand.size} B > {GROWTH}x current {cur.size} B")
    if why:
        return decided(False, "; ".join(why), candidate=cand, current=cur, data=data)
    reason = f"{what} {cur.accuracy:.3f} -> {cand.accuracy:.3f} on {n_test} held-out samples"
    return decided(True, reason, candidate=cand, current=cur, data=data)
