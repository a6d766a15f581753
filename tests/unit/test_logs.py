"""Structured logs and the correlation id that follows a record from edge to cloud."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud_sink.sink import CloudSink, SinkConfig
from edge_agent.agent import EdgeAgent, EdgeConfig
from fog_aggregator.aggregator import FogAggregator, FogConfig
from fogline.codec import Telemetry, encode_telemetry
from fogline.config import build
from fogline.errors import ConfigError
from fogline.logs import JsonFormatter, record_cid
from fogline.service import Inbound

CID = re.compile(r"cid=(\S+)")


def _record(msg: str, *args: object, cid: str | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("edge_agent.agent", logging.DEBUG, __file__, 1, msg, args, None)
    if cid is not None:
        rec.cid = cid
    return rec


def test_the_json_formatter_writes_one_object_with_the_fields() -> None:
    fmt = JsonFormatter(role="edge", ident="e0")
    line = fmt.format(_record("put %s cid=%s", "summary", "e0:summary:d1:0-9", cid="e0:x"))
    assert "\n" not in line
    got = json.loads(line)
    assert set(got) == {"time", "level", "logger", "message", "role", "id", "cid"}
    assert got["level"] == "DEBUG"
    assert got["logger"] == "edge_agent.agent"
    assert got["message"] == "put summary cid=e0:summary:d1:0-9"
    assert (got["role"], got["id"], got["cid"]) == ("edge", "e0", "e0:x")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", got["time"])


def test_the_json_formatter_leaves_out_an_unset_cid_and_keeps_tracebacks() -> None:
    fmt = JsonFormatter(role="cloud", ident="c0")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        rec.exc_info = sys.exc_info()
    got = json.loads(fmt.format(rec))
    assert "cid" not in got
    assert "ValueError: boom" in got["exc"]


def test_a_cid_is_stable_and_names_the_edge_kind_and_readings() -> None:
    body = {"edge": "e0", "device": "d00001", "first": 40, "last": 59}
    assert record_cid("summary", body) == "e0:summary:d00001:40-59"
    assert record_cid("event", body) == "e0:event:d00001:40-59"
    drop = {"reason": "gap", "origin": "e1", "ranges": [["d00002", 7, 9]]}
    assert record_cid("drop", drop) == "e1:drop:d00002:7-9"
    assert record_cid("drop", {"origin": "e1", "reason": "outbox_full", "ranges": []}) is None
    assert record_cid("rollup", {"fog": "f0", "edge": "e0", "readings": 5}) is None
    assert record_cid("summary", {**body, "cid": "given"}) == "given"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "metrics.example"])
def test_a_non_loopback_metrics_host_is_refused_unless_allowed(host: str) -> None:
    with pytest.raises(ConfigError, match="metrics_allow_remote") as err:
        build(SinkConfig, {"metrics_host": host, "metrics_port": 9100})
    assert err.value.key == "metrics_host"
    cfg = build(SinkConfig, {"metrics_host": host, "metrics_allow_remote": "true"})
    assert cfg.metrics_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_metrics_hosts_are_accepted(host: str) -> None:
    assert build(SinkConfig, {"metrics_host": host}).metrics_host == host


def _cids(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    out = []
    for rec in caplog.records:
        if rec.name == logger and rec.levelno == logging.DEBUG and hasattr(rec, "cid"):
            m = CID.search(rec.getMessage())
            assert m is not None and m.group(1) == rec.cid
            out.append(rec.cid)
    return out


def test_a_record_keeps_its_cid_from_edge_through_fog_to_cloud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The three process shells, without a broker: edge puts, fog forwards, cloud commits."""
    caplog.set_level(logging.DEBUG)
    common = {"data_dir": tmp_path}
    edge = EdgeAgent(build(EdgeConfig, {**common, "detector": "zscore", "window": 5}))
    fog = FogAggregator(build(FogConfig, common))
    cloud = CloudSink(build(SinkConfig, common))
    for svc in (edge, fog, cloud):
        svc.on_start()
    try:
        rng = np.random.default_rng(1)
        for i, device in enumerate(("d00001", "d00002")):
            tele = Telemetry(
                device=device, first=0, t0=1.7e9, dt=0.1, fields=("vib", "temp"),
                values=rng.normal(1.0, 0.1, (30, 2)).astype(np.float32),
            )  # fmt: skip
            payload = encode_telemetry(tele, seq=1, ts=1.7e9)
            edge.handle([Inbound(edge.topics.tele("e0", device), payload, i + 1, 1)])
        edge.on_stopping()  # closes the open summaries
        put = _cids(caplog, "edge_agent.agent")
        assert {c.split(":")[1] for c in put} == {"summary"}
        assert sorted(put) == ["e0:summary:d00001:0-29", "e0:summary:d00002:0-29"]

        due = edge.outbox.take_due(1.7e9 + 1)
        assert due is not None
        fog.handle([Inbound(edge.topics.up("edge", "e0"), due[1], 10, 1)])
        assert sorted(_cids(caplog, "fog_aggregator.aggregator")) == sorted(put)

        due = fog.outbox.take_due(1.7e9 + 2)
        assert due is not None
        cloud.handle([Inbound(fog.topics.up("fog", "f0"), due[1], 11, 1)])
        assert sorted(_cids(caplog, "cloud_sink.sink")) == sorted(put)
        assert cloud.counters["stored.summary"] == 2
    finally:
        for svc in (edge, fog, cloud):
            svc.on_stopped()


def test_no_per_record_lines_are_built_above_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    edge = EdgeAgent(build(EdgeConfig, {"data_dir": tmp_path, "detector": "zscore"}))
    edge.on_start()
    try:
        tele = Telemetry(
            device="d00001", first=0, t0=1.7e9, dt=0.1, fields=("vib",),
            values=np.ones((10, 1), np.float32),
        )  # fmt: skip
        payload = encode_telemetry(tele, seq=1, ts=1.7e9)
        edge.handle([Inbound(edge.topics.tele("e0", "d00001"), payload, 1, 1)])
        edge.on_stopping()
        assert edge.counters["records.summary"] == 1
        assert not [r for r in caplog.records if hasattr(r, "cid")]
    finally:
        edge.on_stopped()
