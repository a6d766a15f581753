"""Where the shipped default models live and how to read a model's metadata."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fogline.models.errors import ModelRejected
from fogline.models.reader import read_model_file
from fogline.models.writer import METADATA_NAME

DEFAULT_PACKAGE = "fogline.models.default"
DEFAULT_MODELS: tuple[str, ...] = ("anomaly", "classifier", "failure", "fog_classifier")
# Keys every model written by `fogline models build` carries in its metadata.
METADATA_KEYS: tuple[str, ...] = (
    "name",
    "version",
    "kind",
    "flavour",
    "created",
    "feature_names",
    "normalisation",
    "training_window",
    "scenario",
    "seed",
    "thresholds",
    "output",
    "metrics",
)
# Classifiers add the name of each output.
CLASSIFIER_KEYS: tuple[str, ...] = ("class_names",)


def default_model_path(name: str) -> Path:
    """Path of the shipped default model `name` (one of DEFAULT_MODELS)."""
    if name not in DEFAULT_MODELS:
        raise KeyError(f"no default model {name!r} (known: {', '.join(DEFAULT_MODELS)})")
    path = Path(str(resources.files(DEFAULT_PACKAGE).joinpath(f"{name}.tflite")))
    if not path.is_file():
        raise ModelRejected(f"default model {name!r} is missing from the installation ({path})")
    return path


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The fogline metadata JSON of the `.tflite` file at `path`; ModelRejected if unreadable."""
    return read_model_file(path).metadata_json(METADATA_NAME)
