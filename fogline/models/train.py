"""Numpy trainers for the edge models: small MLPs fitted with Adam, seeded and reproducible.

Every trainer returns layers the writer accepts plus the input normalisation (mean/std) that
goes into the model metadata; the model itself takes normalised inputs.

- anomaly autoencoder: normalised inputs -> bottleneck -> reconstruction (linear output).
  The TFLite model outputs the reconstruction; the score, mean squared reconstruction error in
  normalised units, is computed outside with `anomaly_score`.
- fault classifier: softmax class probabilities; confidence = max probability (`classify`).
- failure predictor: regression of log1p(hours to failure); `hours_from_output` inverts it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fogline.models.layers import Activation, Dense, forward

Kind = Literal["autoencoder", "classifier", "failure_predictor"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimiser settings; `batch_size=None` trains full-batch."""

    epochs: int = 200
    learning_rate: float = 1e-2
    batch_size: int | None = None
    seed: int = 0
    weight_decay: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Normalisation:
    """Per-feature standardisation applied before the model: (x - mean) / std."""

    mean: np.ndarray
    std: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise raw features."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form for the model metadata."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """A trained network, its input normalisation, loss per epoch and suggested thresholds."""

    kind: Kind
    layers: list[Dense]
    normalisation: Normalisation
    losses: list[float]
    thresholds: dict[str, float] = field(default_factory=dict)

    def metadata(
        self,
        *,
        name: str,
        version: int,
        feature_names: Sequence[str],
        training_window: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The metadata dict the writer stores as JSON in the model."""
        return {
            "name": name,
            "version": version,
            "kind": self.kind,
            "feature_names": list(feature_names),
            "normalisation": self.normalisation.to_dict(),
            "training_window": training_window or {},
            "thresholds": dict(self.thresholds),
            "output": _OUTPUT_MEANING[self.kind],
            **extra,
        }


_OUTPUT_MEANING = {
    "autoencoder": "reconstruction of the normalised input; score = mean squared error",
    "classifier": "class probabilities; confidence = max probability",
    "failure_predictor": "log1p(hours to failure)",
}


def fit_normalisation(x: np.ndarray) -> Normalisation:
    """Mean and std per feature; a constant feature gets std 1 so it maps to 0."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    return Normalisation(mean=x.mean(axis=0), std=np.where(std < 1e-6, 1.0, std))


def anomaly_score(x_normalised: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Per-row mean squared reconstruction error (the autoencoder's anomaly score)."""
    diff = np.asarray(reconstruction, dtype=np.float64) - np.asarray(x_normalised, np.float64)
    return np.mean(diff**2, axis=1)


def classify(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class index, confidence = max probability) per row."""
    p = np.asarray(probabilities)
    return p.argmax(axis=1), p.max(axis=1)


def hours_from_output(y: np.ndarray) -> np.ndarray:
    """Invert the failure predictor's log1p target back to hours (never negative)."""
    return np.maximum(np.expm1(np.asarray(y, dtype=np.float64).reshape(-1)), 0.0)


def train_autoencoder(
    x: np.ndarray, *, hidden: Sequence[int] = (16, 8, 16), config: TrainConfig = TrainConfig()
) -> TrainResult:
    """Fit a reconstruction autoencoder on raw features `x` ([n, features])."""
    norm = fit_normalisation(x)
    xn = norm.apply(x).astype(np.float64)
    sizes = [xn.shape[1], *hidden, xn.shape[1]]
    layers, losses = _fit(sizes, "none", xn, xn, "mse", config)
    scores = anomaly_score(xn, forward(layers, xn))
    thresholds = {"anomaly_score": float(np.quantile(scores, 0.99))}
    return TrainResult(
        kind="autoencoder", layers=layers, normalisation=norm, losses=losses, thresholds=thresholds
    )


def train_classifier(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int | None = None,
    hidden: Sequence[int] = (32, 16),
    config: TrainConfig = TrainConfig(),
    confidence_threshold: float = 0.85,
) -> TrainResult:
    """Fit a softmax fault classifier on raw features and integer labels."""
    labels = np.asarray(labels, dtype=np.int64)
    k = int(n_classes if n_classes is not None else labels.max() + 1)
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    norm = fit_normalisation(x)
    xn = norm.apply(x).astype(np.float64)
    onehot = np.eye(k)[labels]
    layers, losses = _fit([xn.shape[1], *hidden, k], "softmax", xn, onehot, "cross_entropy", config)
    return TrainResult(
        kind="classifier",
        layers=layers,
        normalisation=norm,
        losses=losses,
        thresholds={"confidence": confidence_threshold},
    )


def train_failure_predictor(
    x: np.ndarray,
    hours: np.ndarray,
    *,
    hidden: Sequence[int] = (32, 16),
    config: TrainConfig = TrainConfig(),
) -> TrainResult:
    """Fit a regressor of log1p(hours to failure) on raw features."""
    hours = np.asarray(hours, dtype=np.float64).reshape(-1, 1)
    if (hours < 0).any():
        raise ValueError("hours to failure must be >= 0")
    norm = fit_normalisation(x)
    xn = norm.apply(x).astype(np.float64)
    layers, losses = _fit([xn.shape[1], *hidden, 1], "none", xn, np.log1p(hours), "mse", config)
    return TrainResult(kind="failure_predictor", layers=layers, normalisation=norm, losses=losses)


def _loss(kind: str, out: np.ndarray, target: np.ndarray) -> float:
    if kind == "cross_entropy":
        return float(-np.mean(np.sum(target * np.log(np.clip(out, 1e-12, 1.0)), axis=1)))
    return float(np.mean((out - target) ** 2))


def _fit(
    sizes: Sequence[int],
    out_activation: Activation,
    x: np.ndarray,
    y: np.ndarray,
    loss: str,
    cfg: TrainConfig,
) -> tuple[list[Dense], list[float]]:
    rng = np.random.default_rng(cfg.seed)
    # He initialisation for the ReLU hidden layers.
    ws = [rng.normal(0, np.sqrt(2.0 / a), size=(b, a)) for a, b in itertools.pairwise(sizes)]
    bs = [np.zeros(b) for b in sizes[1:]]
    params = [*ws, *bs]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    hidden: list[Activation] = ["relu"] * (len(sizes) - 2)
    acts: list[Activation] = [*hidden, out_activation]
    n = len(x)
    batch = n if cfg.batch_size is None else max(1, min(cfg.batch_size, n))
    step = 0
    losses: list[float] = []
    for _ in range(cfg.epochs):
        order = rng.permutation(n) if batch < n else np.arange(n)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            grads = _gradients(ws, bs, acts, x[idx], y[idx], loss)
            step += 1
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                if cfg.weight_decay and i < len(ws):
                    g = g + cfg.weight_decay * p
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                m_hat = m[i] / (1 - beta1**step)
                v_hat = v[i] / (1 - beta2**step)
                p -= cfg.learning_rate * m_hat / (np.sqrt(v_hat) + eps)
        layers = _layers(ws, bs, acts)
        losses.append(_loss(loss, forward(layers, x), y))
    return _layers(ws, bs, acts), losses


def _layers(ws: list[np.ndarray], bs: list[np.ndarray], acts: list[Activation]) -> list[Dense]:
    return [Dense(weights=w, bias=b, activation=a) for w, b, a in zip(ws, bs, acts, strict=True)]


def _gradients(
    ws: list[np.ndarray],
    bs: list[np.ndarray],
    acts: list[Activation],
    x: np.ndarray,
    y: np.ndarray,
    loss: str,
) -> list[np.ndarray]:
    hs = [x]
    zs = []
    for w, b, a in zip(ws, bs, acts, strict=True):
        z = hs[-1] @ w.T + b
        zs.append(z)
        if a == "relu":
            hs.append(np.maximum(z, 0))
        elif a == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            hs.append(e / e.sum(axis=1, keepdims=True))
        else:
            hs.append(z)
    n = len(x)
    # Softmax + cross-entropy and linear + MSE both have a simple output gradient.
    delta = (hs[-1] - y) / n if loss == "cross_entropy" else 2 * (hs[-1] - y) / y.size
    gw: list[np.ndarray] = [np.empty(0)] * len(ws)
    gb: list[np.ndarray] = [np.empty(0)] * len(ws)
    for i in range(len(ws) - 1, -1, -1):
        gw[i] = delta.T @ hs[i]
        gb[i] = delta.sum(axis=0)
        if i:
            delta = (delta @ ws[i]) * (zs[i - 1] > 0)
    return [*gw, *gb]
