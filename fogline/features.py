"""Window features shared by training-data export and edge inference (pure numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STATS = ("mean", "std", "min", "max")


def feature_names(fields: Sequence[str]) -> list[str]:
    """Names of the features `window_features` computes, in order: `<field>.<stat>`."""
    return [f"{f}.{s}" for s in STATS for f in fields]


def window_features(windows: np.ndarray) -> np.ndarray:
    """Features of windows shaped (..., readings, fields): (..., 4 * fields), float32."""
    w = windows.astype(np.float64)
    feats = [w.mean(-2), w.std(-2), w.min(-2), w.max(-2)]
    return np.concatenate(feats, axis=-1).astype(np.float32)
