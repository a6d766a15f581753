"""`fogline models build` / `inspect` and the shipped default models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fogline.cli import main
from fogline.models import build
from fogline.models.catalog import (
    CLASSIFIER_KEYS,
    DEFAULT_MODELS,
    METADATA_KEYS,
    default_model_path,
    load_metadata,
)
from fogline.models.reader import validate
from fogline.models.runtime import Model
from fogline.scenario import load

# The shipped classifier scores 96.25 % accuracy and 60.8 % macro recall on the factory test
# split (5,000 devices, seed 0); always answering "normal" would score 93.8 % and 12.5 %.
CLASSIFIER_ACCURACY_FLOOR = 0.955
CLASSIFIER_MACRO_RECALL_FLOOR = 0.5
MAX_DEFAULT_BYTES = 100 * 1024


def _small_scenario() -> build.Scenario:
    # Few devices, many faults, short windows of time: trains in seconds.
    return dataclasses.replace(load("quick"), devices=60)


@pytest.fixture(scope="module")
def small_build() -> list[build.Built]:
    build.log_print = lambda *a, **k: None
    return build.build(_small_scenario(), seed=3, gate=False)


def test_two_builds_with_the_same_seed_are_byte_identical(
    small_build: list[build.Built], tmp_path: Path
) -> None:
    again = build.build(_small_scenario(), seed=3, gate=False)
    assert [b.name for b in small_build] == list(DEFAULT_MODELS)
    for first, second in zip(small_build, again, strict=True):
        assert first.data == second.data, f"{first.name} differs between two builds"
    paths = build.write_all(again, tmp_path)
    for b, path in zip(small_build, paths, strict=True):
        assert path.read_bytes() == b.data
        meta = load_metadata(path)
        assert meta["seed"] == 3 and meta["scenario"]["name"] == "quick"


@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_shipped_default_validates_loads_and_documents_itself(name: str) -> None:
    path = default_model_path(name)
    data = path.read_bytes()
    assert len(data) < MAX_DEFAULT_BYTES
    parsed = validate(data)
    meta = parsed.metadata_json()
    wanted = [*METADATA_KEYS, *(CLASSIFIER_KEYS if "classifier" in name else ())]
    missing = [k for k in wanted if k not in meta]
    assert not missing, f"{name} metadata lacks {missing}"
    assert meta["name"] == name and meta["version"] == 1 and meta["flavour"] == "float32"
    assert meta["training_window"]["readings"] == 20
    features = meta["feature_names"]
    assert len(meta["normalisation"]["mean"]) == len(features)
    model = Model(path)
    assert model.input_size == len(features)
    out = model.predict(np.zeros((3, len(features)), dtype=np.float32))
    assert out.shape[0] == 3 and np.isfinite(out).all()
    if "classifier" in name:
        assert out.shape[1] == len(meta["class_names"])
        assert meta["class_names"][0] == "normal"
    if name == "anomaly":
        assert meta["thresholds"]["anomaly_score"] > 0
        assert meta["metrics"]["false_alarm_rate"] < 0.02


def test_shipped_classifiers_are_accurate_and_the_fog_one_at_least_as_much() -> None:
    edge = load_metadata(default_model_path("classifier"))["metrics"]
    fog = load_metadata(default_model_path("fog_classifier"))["metrics"]
    assert edge["accuracy"] > CLASSIFIER_ACCURACY_FLOOR
    assert edge["macro_recall"] > CLASSIFIER_MACRO_RECALL_FLOOR
    assert fog["accuracy"] >= edge["accuracy"]


def test_inspect_prints_ops_and_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    path = default_model_path("classifier")
    assert main(["models", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "FULLY_CONNECTED v1" in out and "SOFTMAX v1" in out
    assert '"class_names"' in out and "serving_default" in out
    assert f"{path.stat().st_size:,} bytes" in out


def test_inspect_rejects_a_corrupted_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(default_model_path("classifier").read_bytes())
    data[4:8] = b"XXXX"
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(data))
    assert main(["models", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rejected" in err and "file identifier" in err
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    assert main(["models", "inspect", "--json", str(truncated)]) == 2
