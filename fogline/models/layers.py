"""Dense layers as the writer takes them, and the float reference forward pass."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Activation = Literal["none", "relu", "logistic", "softmax"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


@dataclass(frozen=True, kw_only=True)
class Dense:
    """One FULLY_CONNECTED layer: `y = act(x @ weights.T + bias)`, weights shaped [out, in]."""

    weights: np.ndarray
    bias: np.ndarray
    activation: Activation = "none"

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float32)
        b = np.asarray(self.bias, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"weights must be 2-D [out, in], got shape {w.shape}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias shape {b.shape} does not match weights {w.shape}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not one of {ACTIVATIONS}")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError("weights and bias must be finite")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "bias", b)

    @property
    def in_features(self) -> int:
        """Width of the layer's input."""
        return int(self.weights.shape[1])

    @property
    def out_features(self) -> int:
        """Width of the layer's output."""
        return int(self.weights.shape[0])


def check_layers(layers: Sequence[Dense]) -> None:
    """Raise ValueError unless `layers` chain (widths match) and softmax is only last."""
    if not layers:
        raise ValueError("a network needs at least one layer")
    for i, (a, b) in enumerate(itertools.pairwise(layers)):
        if a.out_features != b.in_features:
            raise ValueError(
                f"layer {i} outputs {a.out_features} but layer {i + 1} takes {b.in_features}"
            )
    for i, layer in enumerate(layers[:-1]):
        if layer.activation == "softmax":
            raise ValueError(f"softmax only allowed on the last layer (layer {i} has it)")


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    """Apply an activation row-wise (softmax over the last axis)."""
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "logistic":
        return 1 / (1 + np.exp(-z))
    if activation == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return z


def forward(layers: Sequence[Dense], x: np.ndarray, *, dtype: type = np.float64) -> np.ndarray:
    """Float reference: run `x` ([batch, in]) through the layers in `dtype` arithmetic."""
    h: np.ndarray = np.asarray(x, dtype=dtype)
    for layer in layers:
        h = activate(h @ layer.weights.astype(dtype).T + layer.bias.astype(dtype), layer.activation)
    return h


def pre_activations(layers: Sequence[Dense], x: np.ndarray) -> list[np.ndarray]:
    """Per-layer FC outputs (before the activation) for calibration, in float64."""
    out = []
    h = np.asarray(x, dtype=np.float64)
    for layer in layers:
        z = h @ layer.weights.astype(np.float64).T + layer.bias.astype(np.float64)
        out.append(z)
        h = activate(z, layer.activation)
    return out
