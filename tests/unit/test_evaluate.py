"""Evaluation arithmetic on hand-made truth and events."""

from __future__ import annotations

import math

import pytest

from fogline.evaluate import Event, Truth, bandwidth, evaluate

DT = 36.0  # simulated seconds per reading: 100 readings per simulated hour


def test_detection_recall_delay_and_false_alarms() -> None:
    truths = {
        "a": Truth("a", "bearing_wear", onset_seq=100, failure_seq=400),
        "b": Truth("b", "bearing_wear", onset_seq=200, failure_seq=500),
        "c": Truth("c", "sensor_stuck", onset_seq=50, failure_seq=None),
        "late": Truth("late", "overheating", onset_seq=10_000, failure_seq=20_000),
    }
    produced = {"a": 300, "b": 300, "c": 300, "h": 300, "late": 300}
    events = [
        Event("a", 80, 99),  # before onset: a false alarm
        Event("a", 140, 159),  # first hit: delay = (159 - 100 + 1) readings = 0.6 h
        Event("a", 160, 179),  # another hit
        Event("c", 40, 59),  # window reaches into the onset at 50: a hit, delay 0.1 h
        Event("h", 0, 19),  # healthy device: a false alarm
    ]
    ev = evaluate(truths, events, produced, DT)
    bw = ev["faults"]["bearing_wear"]
    assert (bw["devices"], bw["detected"], bw["recall"]) == (2, 1, 0.5)
    assert bw["mean_delay_h"] == pytest.approx(0.6)
    assert ev["faults"]["sensor_stuck"]["mean_delay_h"] == pytest.approx(0.1)
    # The overheating onset was never produced: it is not counted as a missed fault.
    assert "overheating" not in ev["faults"]
    assert ev["false_alarms"] == 2
    # Healthy device-hours: a 100 + b 200 + c 50 + h 300 + late 300 readings = 9.5 h.
    assert ev["false_alarms_per_device_hour"] == pytest.approx(2 / 9.5)
    assert ev["precision"]["any"] == {"events": 5, "precision": pytest.approx(3 / 5)}
    assert ev["simulated_hours"] == pytest.approx(3.0)
    assert ev["failure_prediction_mae_h"] is None
    assert ev["escalation_rate"] == 0.0


def test_named_predictions_precision_and_failure_mae() -> None:
    truths = {"a": Truth("a", "bearing_wear", onset_seq=0, failure_seq=1000)}
    produced = {"a": 600, "h": 600}
    events = [
        Event("a", 480, 499, fault="bearing_wear", hours_to_failure=5.5),  # truth: 5.01 h
        Event("a", 500, 519, fault="overheating", hours_to_failure=4.0, escalated=True),
        Event("h", 0, 19, fault="overheating"),
    ]
    ev = evaluate(truths, events, produced, DT)
    assert ev["precision"]["bearing_wear"]["precision"] == 1.0
    assert ev["precision"]["overheating"] == {"events": 2, "precision": 0.0}
    truth_1 = (1000 - 499) / 100
    truth_2 = (1000 - 519) / 100
    mae = (abs(5.5 - truth_1) + abs(4.0 - truth_2)) / 2
    assert ev["failure_prediction_mae_h"] == pytest.approx(mae)
    assert ev["failure_predictions"] == 2
    assert ev["escalation_rate"] == pytest.approx(1 / 3)


def test_no_events_and_no_faults() -> None:
    ev = evaluate({}, [], {"h": 100}, DT)
    assert ev["faults"] == {} and ev["precision"] == {} and ev["false_alarms"] == 0
    assert ev["false_alarms_per_device_hour"] == 0.0
    assert ev["escalation_rate"] is None


def test_bandwidth_reduction() -> None:
    bw = bandwidth({"bytes": {"device_edge": 1000, "edge_fog": 100, "fog_cloud": 50}})
    assert bw["edge_reduction"] == 10 and bw["end_to_end_reduction"] == 20
    assert (
        bandwidth({"bytes": {"device_edge": 0, "edge_fog": 0, "fog_cloud": 0}})["edge_reduction"]
        is None
    )
    assert not math.isnan(bw["edge_reduction"])
