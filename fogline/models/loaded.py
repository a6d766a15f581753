"""A model file ready to run: validated first, loaded, with its metadata and normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fogline.models.reader import validate
from fogline.models.runtime import Model


@dataclass(frozen=True)
class LoadedModel:
    """A validated model file, its interpreter and what its metadata says."""

    name: str
    version: int
    path: Path
    model: Model
    meta: dict[str, Any]
    mean: np.ndarray
    std: np.ndarray
    features: tuple[str, ...]

    @property
    def label(self) -> str:
        """`name@version`, as recorded in decisions."""
        return f"{self.name}@{self.version}"

    def run(self, x: np.ndarray) -> np.ndarray:
        """Normalise raw features and run the model once on the whole batch."""
        return self.model.predict(((x - self.mean) / self.std).astype(np.float32))


def load_model(path: Path) -> LoadedModel:
    """Validate a `.tflite` file before any interpreter sees it, then load it."""
    data = path.read_bytes()
    parsed = validate(data)
    meta = parsed.metadata_json("fogline")
    norm = meta.get("normalisation") or {}
    features = tuple(meta.get("feature_names") or ())
    model = Model(data)
    mean = np.asarray(norm.get("mean", np.zeros(model.input_size)), dtype=np.float64)
    std = np.asarray(norm.get("std", np.ones(model.input_size)), dtype=np.float64)
    return LoadedModel(
        name=str(meta.get("name", path.stem)),
        version=int(meta.get("version", 0)),
        path=path,
        model=model,
        meta=meta,
        mean=mean,
        std=std,
        features=features,
    )
