"""`fogline report --html`: one self-contained page with the figures, on hand-built data dirs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from cloud_sink.store import Store
from device_sim.ledger import Ledger
from fogline.cli import main
from fogline.codec import Batch, Record
from fogline.html_report import build_html

START = 1_700_000_000.0  # simulated time 0
DT = 36.0  # simulated seconds per reading
READINGS = 200
DEVICES = ("d00000", "d00001", "d00002", "d00003")
FAILURE_SEQ = 150  # d00001's bearing wear fails here

IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _summary(device: str, first: int, last: int) -> tuple[str, dict[str, Any]]:
    return "summary", {
        "edge": "e0", "device": device, "first": first, "last": last,
        "count": last - first + 1, "t0": START + first * DT, "t1": START + last * DT,
        "fields": ["vib_rms"], "min": [0.0], "mean": [1.0], "max": [2.0], "std": [0.5],
        "events": 0,
    }  # fmt: skip


def _model_event(
    device: str,
    last: int,
    *,
    score: float,
    fault: str | None,
    hours: float | None,
    escalated: bool = False,
) -> tuple[str, dict[str, Any]]:
    return "event", {
        "edge": "e0", "device": device, "first": last - 19, "last": last, "count": 20,
        "ts": START + last * DT, "kind": "model", "status": "warning", "score": score,
        "threshold": 0.84, "fault": fault, "confidence": 0.7 if escalated else 0.95,
        "hours_to_failure": hours,
        "recommendation": "Inspect sensor" if hours is None else f"Schedule maintenance within "
        f"{hours:.0f} h",
        "escalated": escalated, "verdict_by": "fog" if escalated else "edge",
        "unconfirmed": False, "model": "fog_classifier@1" if escalated else "classifier@1",
        "repeats": 0, "evidence": b"\0" * 16,
    }  # fmt: skip


def _zscore_event(device: str, last: int) -> tuple[str, dict[str, Any]]:
    return "event", {
        "edge": "e0", "device": device, "first": last - 19, "last": last, "count": 20,
        "ts": START + last * DT, "kind": "zscore", "field": "vib_rms", "value": 9.0,
        "baseline": 1.0, "z": 8.0,
    }  # fmt: skip


def _rollup(t0: float, readings: int) -> tuple[str, dict[str, Any]]:
    return "rollup", {
        "fog": "f0", "edge": "e0", "t0": t0, "t1": t0 + 10, "readings": readings,
        "summaries": 8, "events": 3, "dropped": 0, "devices": 4,
    }  # fmt: skip


def _model_events() -> list[tuple[str, dict[str, Any]]]:
    wear = [  # predictions converging on the true failure at reading 150
        _model_event(
            "d00001",
            last,
            score=1.0 + last / 20,
            fault="bearing_wear",
            hours=(FAILURE_SEQ - last) * DT / 3600 + 0.3,
            escalated=last == 99,
        )
        for last in (59, 79, 99, 119, 139)
    ]
    return [
        *wear,
        _model_event("d00002", 79, score=12.0, fault="sensor_dropout", hours=None),
        _model_event("d00002", 99, score=9.0, fault="sensor_dropout", hours=None, escalated=True),
        _model_event("d00003", 39, score=1.2, fault=None, hours=3.0),  # a false alarm
    ]


def _data_dir(root: Path, events: list[tuple[str, dict[str, Any]]], *, truth: bool = True) -> Path:
    ledger = Ledger(root / "device-sim-s0" / "ledger.db")
    try:
        ledger.record([(d, "e0", READINGS) for d in DEVICES], nbytes=80_000)
    finally:
        ledger.close()
    recs = [_summary(d, f, f + 49) for d in DEVICES for f in range(0, READINGS, 50)]
    recs += [*events, _rollup(100.0, 400), _rollup(110.0, 400)]
    store = Store(root / "cloud-c0" / "cloud.db")
    try:
        records = tuple(Record(seq=i, kind=k, body=b) for i, (k, b) in enumerate(recs))
        store.apply([("f0", Batch(low=0, records=records))], now=START)
    finally:
        store.close()
    if truth:
        doc = {
            "start": START, "dt": DT, "rate": 10.0, "time_scale": 360.0, "seed": 7,
            "first_device": 0, "devices": len(DEVICES), "fields": ["vib_rms"],
            "faults": [
                {"device": "d00001", "kind": "bearing_wear", "field": None, "onset_h": 0.4,
                 "failure_h": 1.5, "onset_seq": 40, "failure_seq": FAILURE_SEQ},
                {"device": "d00002", "kind": "sensor_dropout", "field": "vib_rms",
                 "onset_h": 0.6, "failure_h": None, "onset_seq": 60, "failure_seq": None},
            ],
        }  # fmt: skip
        (root / "device-sim-s0" / "truth.json").write_text(json.dumps(doc))
    return root


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in IMG.findall(page)]


def _headings(page: str) -> list[str]:
    return re.findall(r"<h2[^>]*>(.*?)</h2>", page)


def test_the_page_is_self_contained_with_every_figure(tmp_path: Path) -> None:
    page = build_html(_data_dir(tmp_path, _model_events()))
    # Nothing to fetch: every src is an embedded image, every href (if any) an anchor.
    for attr, value in re.findall(r'\b(src|href)\s*=\s*["\']([^"\']*)', page):
        assert value.startswith("data:image/png;base64,") or value.startswith("#"), (attr, value)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    images = _images(page)
    assert len(images) == 4, "score, failure prediction, readings/bytes, escalations"
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert _headings(page) == [
        "Custody report",
        "Devices at risk",
        "Anomaly score of the devices at risk",
        "Predicted hours to failure against the truth",
        "Readings per layer and bytes per hop",
        "Escalations and models over time",
        "Evaluation against the ground truth",
    ]
    assert "OK: every reading is accounted for" in page  # the text report


def test_the_page_lists_devices_at_risk_and_the_evaluation(tmp_path: Path) -> None:
    page = build_html(_data_dir(tmp_path, _model_events()))
    at_risk = page.split("id='at-risk'")[1].split("<h2")[0]
    rows = re.findall(r"<tr><td>(d\d{5})</td>", at_risk)
    assert rows == ["d00001", "d00003", "d00002"], "soonest predicted failure first"
    evaluation = page.split("id='evaluation'")[1]
    # d00001 (bearing wear) and d00002 (sensor dropout) are detected; d00003's event is false.
    assert re.search(
        r"<td>bearing_wear</td><td class=\"n\">1</td><td class=\"n\">1</td>", evaluation
    )
    assert re.search(r"<td>false alarms</td><td class=\"n\">1</td>", evaluation)


def test_without_ground_truth_the_page_says_so(tmp_path: Path) -> None:
    page = build_html(_data_dir(tmp_path, _model_events(), truth=False))
    assert len(_images(page)) == 3
    assert "No ground truth (device-sim-*/truth.json)" in page
    assert "Evaluation against the ground truth" not in _headings(page)


def test_a_zscore_only_store_gets_a_note_instead_of_empty_figures(tmp_path: Path) -> None:
    events = [_zscore_event("d00001", 59), _zscore_event("d00002", 119)]
    page = build_html(_data_dir(tmp_path, events))
    assert len(_images(page)) == 1, "only readings per layer and bytes per hop"
    assert "No model events in the cloud store" in page
    assert "z-score events: 2" in page
    assert "No device has a model warning." in page
    assert "Evaluation against the ground truth" in _headings(page)


def test_report_html_flag_writes_the_page_and_keeps_the_text_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data_dir(tmp_path / "data", _model_events())
    out = tmp_path / "report.html"
    assert main(["report", "--data-dir", str(data), "--html", str(out)]) == 0
    captured = capsys.readouterr()
    assert "OK: every reading is accounted for" in captured.out
    assert f"wrote {out}" in captured.err
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert len(_images(page)) == 4
