"""Sealed telemetry between a real device-sim and a real edge, and what the edge refuses."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fogline import aead
from fogline.broker import Broker
from fogline.codec import Envelope, Telemetry, decode, encode_telemetry
from tests.integration.conftest import Processes, wait_for

pytestmark = pytest.mark.timeout(60)

SIM_DEVICES = 3
SPARE = "d00099"  # a device the simulator does not run: this test publishes for it


class Listener:
    """Collects decoded messages on a topic filter."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.got: queue.Queue[Envelope] = queue.Queue()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda _c, _u, m: self.got.put(decode(bytes(m.payload)))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert ready.wait(5)

    def drain(self) -> list[Envelope]:
        out = []
        while not self.got.empty():
            out.append(self.got.get())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _tele(first: int) -> Telemetry:
    values = np.full((10, 2), 1.5, dtype=np.float32)
    return Telemetry(device=SPARE, first=first, t0=time.time(), dt=0.1, fields=("a", "b"),
                     values=values)  # fmt: skip


def test_sealed_telemetry_is_taken_and_tampering_is_dead_lettered(
    broker: Broker, processes: Processes, mqtt_client: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "keys" / "aead"
    aead.provision(keys, [*(f"d{i:05d}" for i in range(SIM_DEVICES)), SPARE])
    metrics = Listener(broker, "fl/v1/metrics/edge/e0")
    dlq = Listener(broker, "fl/v1/dlq/edge/e0")
    edge = processes.start(
        "edge_agent", "--id", "e0", "--detector", "zscore", "--summary-interval", "0.5",
        "--aead-keys", str(keys), "--require-encryption",
    )  # fmt: skip
    wait_for(metrics.drain, 15, "the edge agent's first metrics")
    sim = processes.start(
        "device_sim", "--id", "s0", "--devices", str(SIM_DEVICES), "--rate", "20",
        "--samples-per-message", "4", "--duration", "2", "--aead-keys", str(keys),
    )  # fmt: skip
    assert sim.wait(timeout=20) == 0, processes.log(1)

    last: dict[str, Any] = {}

    def settled() -> bool:
        # The sim has delivered everything it produced; wait until the edge counted it all.
        for env in metrics.drain():
            if last and env.body["counters"] == last["counters"]:
                last.update(env.body)
                return env.body["counters"].get("readings_in", 0) > 0
            last.clear()
            last.update(env.body)
        return False

    wait_for(settled, 15, "the simulator's sealed readings counted by the edge")
    counters = last["counters"]
    taken = counters["readings_in"]
    assert taken > 0 and taken % 4 == 0
    assert not [k for k in counters if k.startswith("rejected.")], counters
    assert not dlq.drain()

    # Now hostile input for SPARE, between valid sealed messages.
    pub = mqtt_client(broker)
    topic = f"fl/v1/dev/e0/{SPARE}/tele"
    store = aead.KeyStore(keys)
    kid, key = store.newest(SPARE)

    def sealed(first: int, *, seq: int) -> bytes:
        return aead.seal_telemetry(_tele(first), kid, key, topic=topic, seq=seq, ts=time.time())

    tampered = bytearray(sealed(10, seq=1))
    tampered[-5] ^= 0x01  # inside the ciphertext's tag
    unknown = aead.seal_telemetry(
        _tele(10), f"{SPARE}.7", bytes(32), topic=topic, seq=1, ts=time.time()
    )
    clear = encode_telemetry(_tele(10), seq=1, ts=time.time())
    hostile = {"bad_tag": bytes(tampered), "unknown_key": unknown, "not_encrypted": clear}
    messages = [sealed(0, seq=0), *hostile.values(), sealed(10, seq=2), sealed(20, seq=3)]
    for payload in messages:
        pub.publish(topic, payload, qos=1).wait_for_publish(5)

    seen: dict[str, dict[str, Any]] = {}

    def dead_lettered() -> bool:
        for env in dlq.drain():
            seen[env.body["reason"]] = env.body
        return set(hostile) <= set(seen)

    wait_for(dead_lettered, 15, f"dead letters for {sorted(hostile)}")
    for reason, payload in hostile.items():
        assert seen[reason]["topic"] == topic
        assert seen[reason]["payload"] == payload[:512]
    assert set(seen) == set(hostile)

    def counted() -> dict[str, Any] | None:
        for env in reversed(metrics.drain()):
            c = env.body["counters"]
            if c.get("readings_in") == taken + 30:
                return dict(c)
        return None

    final = wait_for(counted, 15, "the three valid sealed messages taken")
    rejects = {k: v for k, v in final.items() if k.startswith("rejected.")}
    assert rejects == {f"rejected.{r}": 1 for r in hostile}
    assert edge.poll() is None
    metrics.close()
    dlq.close()
