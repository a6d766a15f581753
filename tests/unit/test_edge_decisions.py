"""Model decisions at the edge: one batch per tick, warnings, escalation, budget, samples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edge_agent.decisions import EscalationRules, ModelDecisions, Window
from edge_agent.models import ModelDetector
from fogline.features import feature_names, window_features
from fogline.models.loaded import load_model
from fogline.models.train import (
    TrainConfig,
    train_autoencoder,
    train_classifier,
    train_failure_predictor,
)
from fogline.models.writer import save_model

FIELDS = ("a", "b")
CLASSES = ["normal", "bearing_wear"]
W = 10


def _windows(rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    w = rng.normal(size=(n, W, len(FIELDS)))
    w[:, :, 0] += shift
    return w.astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    normal, faulty = _windows(rng, 400, 0.0), _windows(rng, 400, 6.0)
    xn, xf = window_features(normal), window_features(faulty)
    names = feature_names(FIELDS)
    cfg = TrainConfig(epochs=150, learning_rate=1e-2, seed=1)
    folder = tmp_path_factory.mktemp("models")
    ae = train_autoencoder(xn, hidden=(6, 3, 6), config=cfg)
    clf = train_classifier(
        np.concatenate([xn, xf]), np.repeat([0, 1], 400), n_classes=2, hidden=(8,), config=cfg
    )
    hours = rng.uniform(1, 50, size=400)
    fail = train_failure_predictor(xf, hours, hidden=(8,), config=cfg)
    window = {"readings": W}
    for role, result, extra in [
        ("anomaly", ae, {}),
        ("classifier", clf, {"class_names": CLASSES}),
        ("failure", fail, {}),
    ]:
        meta = result.metadata(
            name=role, version=1, feature_names=names, training_window=window, **extra
        )
        save_model(folder / f"{role}.tflite", result.layers, metadata=meta)
    return {role: folder / f"{role}.tflite" for role in ("anomaly", "classifier", "failure")}


def _decisions(models: dict[str, Path], **rules: float) -> ModelDecisions:
    loaded = {role: load_model(p) for role, p in models.items()}
    threshold = rules.pop("confidence_threshold", 0.85)
    detector = ModelDetector(loaded, confidence_threshold=threshold)
    return ModelDecisions("e0", detector, EscalationRules(**rules))


def _add(d: ModelDecisions, values: np.ndarray, device: str = "d1") -> None:
    for i, v in enumerate(values):
        d.add(Window(device, i * W, v, FIELDS, 100.0 + i))


def test_normal_windows_raise_nothing_and_are_sampled_for_training(models: dict[str, Path]) -> None:
    d = _decisions(models, train_share=1.0)
    assert d.detector.window == W
    _add(d, _windows(np.random.default_rng(5), 20, 0.0))
    records, requests = d.flush(200.0)
    assert requests == []
    kinds = [k for k, _ in records]
    assert "event" not in kinds
    # Every normal window is a training sample at share 1.0, with its features as evidence.
    assert kinds.count("train") >= 18
    body = next(b for k, b in records if k == "train")
    assert len(body["features"]) == 4 * 4 * len(FIELDS) and body["label"] == "normal"
    assert d.stats["batches"] == 1 and d.stats["scored"] == 20


def test_faulty_windows_are_warnings_with_class_hours_and_advice(models: dict[str, Path]) -> None:
    d = _decisions(models, train_share=0.0, holdoff=0.0)
    _add(d, _windows(np.random.default_rng(6), 10, 6.0))
    records, requests = d.flush(200.0)
    assert requests == []
    events = [b for k, b in records if k == "event"]
    assert len(events) == 10
    e = events[0]
    assert e["status"] == "warning" and e["fault"] == "bearing_wear"
    assert e["confidence"] >= 0.85 and e["escalated"] is False and e["verdict_by"] == "edge"
    assert e["hours_to_failure"] is not None and e["hours_to_failure"] >= 0
    assert e["recommendation"].startswith("Schedule maintenance within ")
    assert (e["device"], e["first"], e["last"], e["count"]) == ("d1", 0, W - 1, W)
    assert d.stats["batches"] == 1  # ten windows, one invoke per model


def test_unsure_windows_go_to_the_fog_and_its_verdict_is_used(models: dict[str, Path]) -> None:
    d = _decisions(models, confidence_threshold=1.01, timeout=2.0, train_share=0.0, persistence=1)
    _add(d, _windows(np.random.default_rng(7), 3, 6.0))
    records, requests = d.flush(200.0)
    assert records == [] and len(requests) == 3
    assert requests[0].features.shape == (4 * len(FIELDS),)
    answered = d.on_reply(requests[0].id, "bearing_wear", 0.97, "fog_classifier@1", 200.5)
    assert len(answered) == 1
    e = answered[0][1]
    assert (e["verdict_by"], e["escalated"], e["unconfirmed"]) == ("fog", True, False)
    assert e["confidence"] == 0.97 and e["model"] == "fog_classifier@1"
    # The same reply again, or one for an unknown id, changes nothing.
    assert d.on_reply(requests[0].id, "bearing_wear", 0.97, "x", 200.6) == []
    assert d.on_reply("nope", "normal", 0.5, "x", 200.7) == []
    # No answer before the deadline: the edge decides alone, unconfirmed.
    assert d.expire(201.0) == []
    late = d.expire(202.5)
    assert len(late) == 2
    assert all(b["unconfirmed"] and b["verdict_by"] == "edge" for _, b in late)
    assert d.stats["unconfirmed"] == 2 and d.stats["answered"] == 1


def test_an_unsure_fog_names_no_fault(models: dict[str, Path]) -> None:
    d = _decisions(models, confidence_threshold=0.99, timeout=2.0, train_share=0.0, persistence=1)
    d.detector.confidence_threshold = 1.01  # every window goes to the fog
    _add(d, _windows(np.random.default_rng(9), 2, 6.0))
    _, requests = d.flush(200.0)
    assert len(requests) == 2
    d.detector.confidence_threshold = 0.99
    # Anomalous window, fog unsure of its class: still a warning, but no fault is named.
    ((kind, e),) = d.on_reply(requests[0].id, "bearing_wear", 0.6, "fog_classifier@1", 200.5)
    assert kind == "event" and e["fault"] is None and e["verdict_by"] == "fog"
    assert e["recommendation"] == "Inspect machine"
    # Not anomalous and the fog unsure: no warning at all.
    waiting = d.waiting[requests[1].id]
    waiting.verdict = dataclasses.replace(waiting.verdict, score=0.0)
    assert d.on_reply(requests[1].id, "bearing_wear", 0.6, "fog_classifier@1", 200.6) == []
    assert d.stats["fog_unsure"] == 2


def test_escalation_budget_protects_the_fog(models: dict[str, Path]) -> None:
    d = _decisions(
        models, confidence_threshold=1.01, rate=0.0, burst=2.0, train_share=0.0, persistence=1
    )
    _add(d, _windows(np.random.default_rng(8), 5, 6.0))
    records, requests = d.flush(200.0)
    assert len(requests) == 2
    assert d.stats["over_budget"] == 3
    # Over budget: decided alone at once and marked unconfirmed, never silently dropped.
    assert len(records) == 3 and all(b["unconfirmed"] for _, b in records)


def test_a_replaced_model_is_used_from_the_next_batch(models: dict[str, Path]) -> None:
    d = _decisions(models, train_share=0.0)
    d.detector.replace("classifier", load_model(models["classifier"]))
    _add(d, _windows(np.random.default_rng(9), 2, 6.0))
    records, _ = d.flush(200.0)
    assert all(b["model"] == "classifier@1" for _, b in records)


def test_repeated_warnings_of_a_device_are_counted_not_resent(models: dict[str, Path]) -> None:
    d = _decisions(models, train_share=0.0, holdoff=10.0)
    _add(d, _windows(np.random.default_rng(10), 10, 6.0))
    _add(d, _windows(np.random.default_rng(11), 2, 6.0), device="d2")
    records, _ = d.flush(200.0)
    events = [b for k, b in records if k == "event"]
    assert [e["device"] for e in events] == ["d1", "d2"]
    assert d.stats["repeats"] == 9 + 1
    # After the hold-off the next warning goes up again, saying how many it stood for.
    _add(d, _windows(np.random.default_rng(12), 1, 6.0))
    later, _ = d.flush(211.0)
    assert [b["repeats"] for k, b in later if k == "event"] == [9]


def test_a_lone_anomalous_window_is_held_until_the_anomaly_persists(
    models: dict[str, Path],
) -> None:
    # With no confident class, only the anomaly score speaks: one window is not enough.
    d = _decisions(models, confidence_threshold=1.01, train_share=0.0, persistence=2)
    _add(d, _windows(np.random.default_rng(13), 1, 6.0), device="d3")
    assert d.flush(200.0) == ([], [])
    assert d.stats["held"] == 1
    _add(d, _windows(np.random.default_rng(14), 1, 6.0), device="d3")
    _, requests = d.flush(201.0)
    assert len(requests) == 1  # the second anomalous window in a row counts
