"""Regional retraining at the fog, on the drifted `hot_site` scenario's labelled windows."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fog_aggregator.retrain import (
    calibration_error,
    quality,
    retrain,
    samples_for,
    split,
)
from fogline import scenario
from fogline.models.build import Dataset, load_windows
from fogline.models.catalog import default_model_path
from fogline.models.reader import read_model, validate
from fogline.models.runtime import Model

CURRENT = default_model_path("classifier").read_bytes()
META = read_model(CURRENT).metadata_json("fogline")


@pytest.fixture(scope="module")
def hot() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of 150 machines of the hot site, in the classifier's features, with the truth."""
    ds: Dataset = load_windows(dataclasses.replace(scenario.load("hot_site"), devices=150))
    cols = [ds.feature_names.index(f) for f in META["feature_names"]]
    classes = META["class_names"]
    assert set(ds.kind_names) == set(classes)
    y = np.array([classes.index(ds.kind_names[k]) for k in ds.kind])
    return ds.x[:, cols].astype(np.float64), y, ds.device


@pytest.mark.parametrize("flavour", ["float32", "float16", "int8"])
def test_retraining_on_the_drifted_site_beats_the_shipped_model(
    hot: tuple[np.ndarray, np.ndarray, np.ndarray], flavour: str
) -> None:
    x, y, devices = hot
    d = retrain(CURRENT, x, y, groups=devices, version=2, flavour=flavour)
    assert d.publish, d.reason
    assert d.candidate is not None and d.current is not None and d.data is not None
    # Judged on machines it never saw, on the exact bytes it would publish.
    assert d.current.accuracy < 0.75  # the shipped model suffers from the drift...
    assert d.candidate.accuracy > 0.85  # ...the retrained one does not
    assert d.candidate.ece <= d.current.ece + 0.02
    meta = validate(d.data).metadata_json("fogline")
    assert (meta["version"], meta["flavour"]) == (2, flavour)
    assert meta["feature_names"] == META["feature_names"]
    # The edge's runtime agrees with the executor the gate used.
    test, _ = split(len(x), devices, 0.25, 0)
    model = Model(d.data)
    mean, std = (np.asarray(meta["normalisation"][k]) for k in ("mean", "std"))
    probs = model.predict(((x[test] - mean) / std).astype(np.float32))
    assert (probs.argmax(1) == y[test]).mean() == pytest.approx(d.candidate.accuracy, abs=0.01)
    assert json.loads(json.dumps(d.summary()))["publish"] is True


def test_a_worse_candidate_is_not_published() -> None:
    # Without drift the shipped model is good; a barely trained candidate is refused, with why.
    ds = load_windows(dataclasses.replace(scenario.load("hot_site"), devices=80, ambient_offset=0))
    cols = [ds.feature_names.index(f) for f in META["feature_names"]]
    y = np.array([META["class_names"].index(ds.kind_names[k]) for k in ds.kind])
    x = ds.x[:, cols].astype(np.float64)
    d = retrain(CURRENT, x, y, groups=ds.device, version=2, epochs=3)
    assert d.current is not None and d.current.accuracy > 0.85
    assert not d.publish
    assert d.reason.startswith("accuracy"), d.reason


def test_too_few_samples_are_refused() -> None:
    x = np.zeros((5, len(META["feature_names"])))
    d = retrain(CURRENT, x, np.zeros(5, dtype=int), version=2)
    assert not d.publish and "too few samples" in d.reason and d.data is None


def test_held_out_devices_are_whole() -> None:
    groups = np.repeat(np.array(["a", "b", "c", "d"]), 10)
    test, train = split(40, groups, 0.25, 3)
    assert set(groups[test]).isdisjoint(groups[train]) and len(test) == 10


def test_calibration_error_of_a_perfectly_calibrated_model_is_zero() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration_error(probs, np.array([0, 1])) == 0.0
    assert calibration_error(probs, np.array([1, 0])) == 1.0


def test_samples_are_taken_in_the_models_feature_order() -> None:
    from device_sim.physics import FIELDS
    from fogline.features import feature_names

    fields = list(FIELDS)
    names = feature_names(fields)
    row = np.arange(len(names), dtype="<f4")
    rows = [
        (row.tobytes(), json.dumps(fields), "normal", "d1"),
        (row.tobytes(), json.dumps(fields), "no_such_class", "d2"),
        (row.tobytes(), json.dumps(["x"]), "normal", "d3"),
    ]
    want = tuple(META["feature_names"])
    x, _, devices = samples_for(rows, want, META["class_names"])
    assert x.shape == (1, len(want)) and list(devices) == ["d1"]
    assert list(x[0]) == [names.index(f) for f in want]


def test_the_anomaly_model_is_retrained_on_normal_samples_and_gated(
    hot: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    x, y, devices = hot
    current = default_model_path("anomaly").read_bytes()
    d = retrain(current, x, y, groups=devices, version=2)
    assert d.candidate is not None and d.current is not None
    assert d.reason.startswith("balanced accuracy")
    assert d.publish == (d.candidate.accuracy >= d.current.accuracy)
    # Whatever the gate says, the candidate does what it was trained for: at its threshold
    # (the 99th percentile of the training normals) it passes the held-out machines' normals.
    test, _ = split(len(x), devices, 0.25, 0)
    normal = test[y[test] == 0]
    assert d.data is not None
    assert quality(d.data, x[normal], y[normal]).accuracy > 0.95
