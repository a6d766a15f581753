"""The wire contract as an outside client sees it, and hostile input against a real edge agent."""

from __future__ import annotations

import math
import queue
import shutil
import subprocess
import threading
import time
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fogline.broker import Broker
from fogline.codec import Telemetry, decode, encode_telemetry
from tests.integration.conftest import Processes, wait_for

pytestmark = pytest.mark.timeout(90)


def _mosquitto_sub() -> str:
    path = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    if not shutil.which(path):
        pytest.fail("mosquitto_sub is missing: install mosquitto-clients (make test does)")
    return path


def test_mosquitto_sub_decodes_telemetry_by_the_readme_schema(
    broker: Broker, processes: Processes
) -> None:
    topic = "fl/v1/dev/e0/d00003/tele"
    # -F %x prints the payload as hex: binary-safe through a pipe.
    sub = subprocess.Popen(
        [_mosquitto_sub(), "-h", broker.host, "-p", str(broker.port), "-q", "1",
         "-t", topic, "-C", "1", "-F", "%x", "-W", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.5)  # let the subscription land before readings flow
    processes.start("device_sim", "--id", "s0", "--devices", "5", "--rate", "20",
                    "--samples-per-message", "4", "--edges", "1")  # fmt: skip
    out, err = sub.communicate(timeout=40)
    assert sub.returncode == 0, err
    payload = bytes.fromhex(out.strip())

    # Decoding exactly as the README documents it, with msgpack and numpy only.
    env = msgpack.unpackb(payload, raw=False)
    assert set(env) == {"v", "kind", "src", "seq", "ts", "body"}
    assert env["v"] == 1 and env["kind"] == "tele" and env["src"] == "d00003"
    body = env["body"]
    assert body["device"] == "d00003"
    assert body["n"] == 4
    fields = ["vib_rms", "vib_peak", "vib_kurtosis", "temp_bearing", "temp_motor", "current",
              "pressure"]  # fmt: skip
    assert body["fields"] == fields
    # dt is in simulated seconds: time_scale (default 60) / rate.
    assert math.isclose(body["dt"], 60 / 20)
    values = np.frombuffer(body["data"], dtype="<f4").reshape(body["n"], len(body["fields"]))
    assert np.isfinite(values).all()
    # Plausible machine readings: bearing temperature in degC, current in A.
    assert 20 < values[:, 3].mean() < 120 and 0 < values[:, 5].mean() < 500
    assert body["first"] % 4 == 0  # readings are numbered per device, 4 per message


class Listener:
    """Collects decoded messages on a topic filter."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.got: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = lambda _c, _u, m: self.got.put((m.topic, decode(m.payload)))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.ready.wait(5)

    def drain(self) -> list[tuple[str, Any]]:
        out = []
        while not self.got.empty():
            out.append(self.got.get())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _tele(device: str, first: int, values: np.ndarray) -> bytes:
    fields = ("a", "b")
    t = Telemetry(device=device, first=first, t0=time.time(), dt=0.1, fields=fields, values=values)
    return encode_telemetry(t, seq=first, ts=time.time())


def test_edge_survives_hostile_input_and_dead_letters_it(
    broker: Broker, processes: Processes, mqtt_client: Any
) -> None:
    dlq = Listener(broker, "fl/v1/dlq/edge/e0")
    metrics = Listener(broker, "fl/v1/metrics/edge/e0")
    edge = processes.start("edge_agent", "--id", "e0", "--summary-interval", "0.5")
    pub = mqtt_client(broker)
    wait_for(lambda: metrics.drain(), 15, "the edge agent's first metrics")

    good = np.ones((10, 2), dtype=np.float32)
    valid = _tele("d1", 0, good)
    nan = good.copy()
    nan[3, 1] = np.nan
    huge = msgpack.packb(
        {"v": 1, "kind": "tele", "src": "d1", "seq": 1, "ts": 1.0,
         "body": {"device": "d1", "first": 10, "t0": 0.0, "dt": 0.1, "fields": ["a"],
                  "n": 10**9, "data": b"\0" * 64}}
    )  # fmt: skip
    hostile = {
        "truncated": ("fl/v1/dev/e0/d1/tele", valid[: len(valid) // 2]),
        "malformed": ("fl/v1/dev/e0/d1/tele", b"\xc1\xc1\xc1"),
        "wrong_type": ("fl/v1/dev/e0/d1/tele", msgpack.packb({"v": 1, "kind": "tele", "src": "d1",
                                                              "seq": "x", "ts": 1.0, "body": {}})),
        "bad_version": ("fl/v1/dev/e0/d1/tele", msgpack.packb({"v": 9, "kind": "tele", "src": "d1",
                                                               "seq": 0, "ts": 1.0, "body": {}})),
        "too_large": ("fl/v1/dev/e0/d1/tele", huge),
        "forged_device": ("fl/v1/dev/e0/d2/tele", _tele("d1", 0, good)),
    }  # fmt: skip
    pub.publish("fl/v1/dev/e0/d1/tele", valid, qos=1).wait_for_publish(5)
    for topic, payload in hostile.values():
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    pub.publish("fl/v1/dev/e0/d1/tele", valid, qos=1).wait_for_publish(5)  # a replay
    pub.publish("fl/v1/dev/e0/d1/tele", _tele("d1", 10, nan), qos=1).wait_for_publish(5)
    pub.publish("fl/v1/dev/e0/d1/tele", _tele("d1", 20, good), qos=1).wait_for_publish(5)

    expected = set(hostile) | {"non_finite", "replay"}
    seen: dict[str, dict[str, Any]] = {}

    def all_dead_lettered() -> bool:
        for _topic, env in dlq.drain():
            seen[env.body["reason"]] = env.body
        return expected <= set(seen)

    wait_for(all_dead_lettered, 15, f"dead letters for {sorted(expected)}")
    for reason, (topic, payload) in hostile.items():
        assert seen[reason]["topic"] == topic
        assert seen[reason]["size"] == len(payload)
        assert seen[reason]["payload"] == payload[:512]

    def counted() -> dict[str, Any] | None:
        for _topic, env in reversed(metrics.drain()):
            c = env.body["counters"]
            if all(c.get(f"rejected.{r}") == 1 for r in expected):
                return dict(env.body)
        return None

    last = wait_for(counted, 15, "every rejection counted once in the edge's metrics")
    # The agent kept going: valid readings around the bad ones were taken, the NaN batch became
    # a counted drop (recorded for upstream), nothing else was lost.
    gauges = last["gauges"]
    assert gauges["core.readings"] == 20
    assert gauges["core.non_finite"] == 10
    assert edge.poll() is None
    dlq.close()
    metrics.close()
