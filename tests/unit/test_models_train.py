"""The numpy trainers: loss falls, results are reproducible and survive the trip to TFLite."""

from __future__ import annotations

import numpy as np

from fogline.models.layers import forward
from fogline.models.reader import validate
from fogline.models.runtime import Model
from fogline.models.train import (
    TrainConfig,
    anomaly_score,
    classify,
    hours_from_output,
    train_autoencoder,
    train_classifier,
    train_failure_predictor,
)
from fogline.models.writer import write_model

FEATURES = 28
FAST = TrainConfig(epochs=40, batch_size=64, learning_rate=3e-3, seed=3)


def fault_data(n: int = 600, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, FEATURES)) * 2.0
    labels = rng.integers(0, classes, n)
    # Raw features far from zero and of mixed scale: normalisation must handle them.
    x = (centres[labels] + rng.normal(size=(n, FEATURES))) * np.linspace(0.1, 10, FEATURES) + 40
    return x, labels


def test_classifier_learns_separable_faults_and_survives_int8() -> None:
    x, labels = fault_data()
    result = train_classifier(x, labels, config=FAST)
    assert result.losses[-1] < 0.1 * result.losses[0]
    xn = result.normalisation.apply(x)
    predicted, confidence = classify(forward(result.layers, xn))
    assert (predicted == labels).mean() > 0.97
    assert confidence.min() > 0.25
    meta = result.metadata(name="fault", version=1, feature_names=[f"f{i}" for i in range(28)])
    data = write_model(result.layers, flavour="int8", representative=xn, metadata=meta)
    assert validate(data).metadata_json()["thresholds"] == {"confidence": 0.85}
    tflite_pred, _ = classify(Model(data).predict(xn))
    assert (tflite_pred == predicted).mean() > 0.97


def test_training_is_reproducible() -> None:
    x, labels = fault_data(n=200)
    a = train_classifier(x, labels, config=TrainConfig(epochs=5, batch_size=32, seed=9))
    b = train_classifier(x, labels, config=TrainConfig(epochs=5, batch_size=32, seed=9))
    for la, lb in zip(a.layers, b.layers, strict=True):
        np.testing.assert_array_equal(la.weights, lb.weights)
    assert a.losses == b.losses


def test_autoencoder_scores_anomalies_above_its_threshold() -> None:
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(600, 4))
    mixing = rng.normal(size=(4, FEATURES))
    normal = latent @ mixing + 0.05 * rng.normal(size=(600, FEATURES)) + 20
    result = train_autoencoder(
        normal, config=TrainConfig(epochs=80, batch_size=64, learning_rate=3e-3)
    )
    assert result.losses[-1] < 0.1 * result.losses[0]
    threshold = result.thresholds["anomaly_score"]
    anomalies = normal + rng.normal(size=normal.shape) * 2 * normal.std(axis=0)
    data = write_model(result.layers, flavour="float32")
    model = Model(data)
    for raw, expect_flagged in ((normal, False), (anomalies, True)):
        xn = result.normalisation.apply(raw)
        flagged = (anomaly_score(xn, model.predict(xn)) > threshold).mean()
        assert flagged > 0.9 if expect_flagged else flagged < 0.05


def test_failure_predictor_regresses_hours_to_failure() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, FEATURES))
    hours = np.exp(3 + x[:, :4] @ np.array([0.8, -0.5, 0.3, 0.6]))
    result = train_failure_predictor(x * 5 + 100, hours, config=FAST)
    assert result.losses[-1] < 0.2 * result.losses[0]
    data = write_model(result.layers, flavour="float16")
    predicted = hours_from_output(Model(data).predict(result.normalisation.apply(x * 5 + 100)))
    log_err = np.log1p(predicted) - np.log1p(hours)
    r2 = 1 - np.mean(log_err**2) / np.var(np.log1p(hours))
    assert r2 > 0.8
    assert (predicted >= 0).all()
