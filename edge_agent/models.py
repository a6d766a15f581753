"""The edge's models: anomaly score, fault class with confidence, hours to failure.

`ModelDetector.score()` takes every window that became ready in one tick and runs each model
once on the whole batch (one `invoke()` per model). Models can be replaced between two batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fogline.features import feature_names, window_features
from fogline.models.loaded import LoadedModel
from fogline.models.train import anomaly_score, hours_from_output

log = logging.getLogger(__name__)

SENSOR_KINDS = frozenset(("sensor_stuck", "sensor_dropout", "sensor_spikes", "sensor_drift"))
NORMAL = "normal"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The edge's decision on one window."""

    status: str  # "normal" or "warning"
    score: float
    threshold: float
    fault: str  # a fault kind, or "normal"
    confidence: float
    hours_to_failure: float | None
    recommendation: str
    features: np.ndarray  # the window's features: the evidence sent with an event
    uncertain: bool  # confidence below the threshold: ask the fog


def recommendation(status: str, fault: str, hours: float | None) -> str:
    """What an operator should do about a window."""
    if status != "warning":
        return ""
    if fault in SENSOR_KINDS:
        return "Inspect sensor"
    if hours is not None and fault != NORMAL:
        return f"Schedule maintenance within {max(1, int(hours))} h"
    return "Inspect machine"


class ModelDetector:
    """Scores batches of windows with the anomaly, classifier and failure models."""

    def __init__(
        self,
        models: dict[str, LoadedModel],
        *,
        confidence_threshold: float = 0.85,
        anomaly_threshold: float | None = None,
    ) -> None:
        missing = {"anomaly", "classifier", "failure"} - set(models)
        if missing:
            raise ValueError(f"missing models: {', '.join(sorted(missing))}")
        self.models = dict(models)
        self.confidence_threshold = confidence_threshold
        self._anomaly_override = anomaly_threshold
        self._columns: dict[tuple[tuple[str, ...], str], np.ndarray | None] = {}

    @property
    def window(self) -> int | None:
        """Readings per window the models were trained on, if their metadata says."""
        tw = self.models["classifier"].meta.get("training_window") or {}
        value = (tw.get("readings") or tw.get("window")) if isinstance(tw, dict) else None
        return int(value) if isinstance(value, int) else None

    @property
    def threshold(self) -> float:
        """The anomaly score above which a window is a warning."""
        if self._anomaly_override is not None:
            return self._anomaly_override
        return float(self.models["anomaly"].meta.get("thresholds", {}).get("anomaly_score", np.inf))

    @property
    def classes(self) -> list[str]:
        """Class names of the classifier's outputs."""
        names = self.models["classifier"].meta.get("class_names")
        if not names:
            raise ValueError("the classifier's metadata has no class_names")
        return list(names)

    def replace(self, role: str, model: LoadedModel) -> None:
        """Swap one model (called between two batches)."""
        self.models[role] = model
        self._columns.clear()

    def columns(self, fields: Sequence[str], role: str) -> np.ndarray | None:
        """Indexes of a model's features among the features of `fields`, None if any is missing."""
        key = (tuple(fields), role)
        if key not in self._columns:
            names = feature_names(fields)
            want = self.models[role].features
            self._columns[key] = (
                np.array([names.index(f) for f in want]) if all(f in names for f in want) else None
            )
        return self._columns[key]

    def can_score(self, fields: Sequence[str]) -> bool:
        """Whether every model finds its features in telemetry with these fields."""
        return all(
            self.columns(fields, role) is not None for role in ("anomaly", "classifier", "failure")
        )

    def score(self, windows: np.ndarray, fields: Sequence[str]) -> list[Verdict]:
        """Verdicts for windows shaped (N, readings, fields): one invoke per model."""
        feats = window_features(windows).astype(np.float64)

        def inputs(role: str) -> np.ndarray:
            cols = self.columns(fields, role)
            assert cols is not None
            return feats[:, cols]

        a = self.models["anomaly"]
        x_a = inputs("anomaly")
        recon = a.run(x_a)
        scores = anomaly_score((x_a - a.mean) / a.std, recon)
        probs = self.models["classifier"].run(inputs("classifier"))
        hours = hours_from_output(self.models["failure"].run(inputs("failure")))
        classes = self.classes
        threshold = self.threshold
        out = []
        for i in range(len(windows)):
            k = int(np.argmax(probs[i]))
            fault, conf = classes[k], float(probs[i, k])
            suspect = scores[i] >= threshold or fault != NORMAL
            sure = conf >= self.confidence_threshold
            warning = scores[i] >= threshold or (fault != NORMAL and sure)
            status = "warning" if warning else NORMAL
            h = float(hours[i]) if warning and fault not in SENSOR_KINDS else None
            out.append(
                Verdict(
                    status=status,
                    score=float(scores[i]),
                    threshold=threshold,
                    fault=fault,
                    confidence=conf,
                    hours_to_failure=h,
                    recommendation=recommendation(status, fault, h),
                    features=feats[i].astype(np.float32),
                    uncertain=suspect and not sure,
                )
            )
        return out
