"""fogline's paho client (block reads, batched PUBACKs) against a real Mosquitto."""

from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from bench.blast import blast
from fogline.broker import Broker
from fogline.mqttclient import FAST, READ_BLOCK, Client

pytestmark = pytest.mark.timeout(60)


class Receiver:
    """A persistent-session subscriber on `Client` with manual acks, run by `loop_start`."""

    def __init__(self, broker: Broker, client_id: str, topic: str, *, parse: bool = True) -> None:
        self.payloads: list[bytes] = []
        self.mids: list[int] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        self.client.on_message = self._on_message
        if parse:  # PUBLISH packets parsed from the read block, as the services run
            self.client.on_publish_received = self._on_publish
        self.via_paho = 0
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.payloads.append(bytes(msg.payload))
            self.mids.append(msg.mid)
            self.via_paho += 1

    def _on_publish(self, _topic: str, payload: bytes, mid: int, _qos: int) -> None:
        with self.lock:
            self.payloads.append(payload)
            self.mids.append(mid)

    def wait_for(self, n: int, timeout: float = 30.0, *, ack: bool = False) -> int:
        """Wait until `n` messages arrived; with `ack`, acknowledge them in batches meanwhile
        (the broker holds at most its in-flight limit of unacknowledged messages)."""
        deadline = time.monotonic() + timeout
        acked = 0
        while time.monotonic() < deadline and len(self.payloads) < n:
            time.sleep(0.01)
            if ack:
                with self.lock:
                    mids = self.mids[acked:]
                self.client.ack_many(mids)
                acked += len(mids)
        if ack:
            self.client.ack_many(self.mids[acked:])
        return len(self.payloads)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _messages(topic: str, n: int) -> list[tuple[str, bytes]]:
    return [(topic, f"m{i:06d}".encode() * (1 + i % 40)) for i in range(n)]


@pytest.mark.parametrize("parse", [True, False], ids=["parsed-from-block", "paho"])
def test_a_pipelined_burst_arrives_whole_and_in_order(broker: Broker, parse: bool) -> None:
    topic = f"t/{uuid.uuid4().hex}"
    rx = Receiver(broker, f"rx-order-{parse}", topic, parse=parse)
    try:
        # Small messages, then some larger than a read block (they cross its end).
        sent = _messages(topic, 5000) + [(topic, bytes([i]) * (READ_BLOCK + 999)) for i in range(3)]
        blast(broker.port, sent, qos=1)
        assert rx.wait_for(len(sent), ack=True) == len(sent)
        assert rx.payloads == [p for _t, p in sent]  # no packet split or merged by the buffer
        assert len(set(rx.mids)) > 1000
        if parse:
            assert rx.via_paho < len(sent) // 10, "most packets parsed from the block"
        else:
            assert rx.via_paho == len(sent)
        # The last message is delivered at once, not when the next bytes happen to arrive.
        blast(broker.port, [(topic, b"last")], qos=1)
        assert rx.wait_for(len(sent) + 1, timeout=2.0, ack=True) == len(sent) + 1
    finally:
        rx.close()


def test_qos0_messages_are_parsed_too(broker: Broker) -> None:
    topic = f"t/{uuid.uuid4().hex}"
    rx = Receiver(broker, "rx-q0", topic)
    try:
        sent = _messages(topic, 3000)
        blast(broker.port, sent, qos=0)
        assert rx.wait_for(len(sent)) == len(sent)
        assert rx.payloads == [p for _t, p in sent]
        assert set(rx.mids) == {0}
    finally:
        rx.close()


@pytest.mark.parametrize("acked", [True, False])
def test_batched_acks_settle_the_session(broker: Broker, acked: bool) -> None:
    """Acked with one write: the broker does not deliver them again to the same session.
    Unacked (the control): it does, so the check can fail."""
    topic = f"t/{uuid.uuid4().hex}"
    client_id = f"rx-{uuid.uuid4().hex[:8]}"
    rx = Receiver(broker, client_id, topic)
    try:
        sent = _messages(topic, 300)
        blast(broker.port, sent, qos=1)
        assert rx.wait_for(len(sent)) == len(sent)
        if acked:
            rx.client.ack_many(rx.mids)
            time.sleep(0.5)  # the acks reach the broker
    finally:
        rx.close()
    again = Receiver(broker, client_id, topic)
    try:
        redelivered = again.wait_for(len(sent), timeout=2.0)
    finally:
        again.close()
    assert redelivered == (0 if acked else len(sent))


def test_the_fast_paths_are_in_use() -> None:
    # paho-mqtt 2.x keeps the hooks; a release without them would fall back silently.
    assert FAST
