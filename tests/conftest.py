"""Shared fixtures: a private Mosquitto per test and connected paho-mqtt clients."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fogline.broker import Broker

# Tests in these folders start a real Mosquitto; `-m "not integration"` skips them.
_BROKER_DIRS = ("integration", "chaos")
_CONNECT_TIMEOUT = 5.0

MqttClientFactory = Callable[..., mqtt.Client]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration and tests/chaos as `integration`."""
    here = Path(__file__).parent
    for item in items:
        try:
            top = item.path.relative_to(here).parts[0]
        except ValueError:
            continue
        if top in _BROKER_DIRS:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A running Mosquitto on a free loopback port, with its data in `tmp_path / "broker"`."""
    b = Broker(data_dir=tmp_path / "broker")
    try:
        b.start()
        yield b
    finally:
        b.stop()


@pytest.fixture
def mqtt_client() -> Iterator[MqttClientFactory]:
    """Factory: `mqtt_client(broker, client_id=None, **client_kwargs)` -> a connected client."""
    clients: list[mqtt.Client] = []

    def connect(broker: Broker, client_id: str | None = None, **kwargs: Any) -> mqtt.Client:
        connected = threading.Event()
        codes: list[mqtt.ReasonCode] = []

        def on_connect(
            client: mqtt.Client,
            userdata: object,
            flags: mqtt.ConnectFlags,
            reason_code: mqtt.ReasonCode,
            properties: mqtt.Properties | None,
        ) -> None:
            codes.append(reason_code)
            connected.set()

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
            **kwargs,
        )
        client.on_connect = on_connect
        clients.append(client)
        client.connect(broker.host, broker.port, keepalive=30)
        client.loop_start()
        if not connected.wait(_CONNECT_TIMEOUT):
            raise TimeoutError(f"no CONNACK from {broker.url} within {_CONNECT_TIMEOUT}s")
        if codes[0].is_failure:
            raise ConnectionError(f"{broker.url} refused the connection: {codes[0]}")
        return client

    yield connect

    for client in clients:
        client.disconnect()
        client.loop_stop()
