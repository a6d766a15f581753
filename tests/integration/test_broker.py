"""The broker launcher against a real Mosquitto on free loopback ports."""

from __future__ import annotations

import os
import queue
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

import fogline.broker as broker_mod
from fogline.broker import Broker, BrokerError, find_mosquitto

pytestmark = pytest.mark.timeout(30)

WAIT = 3.0


def unique_topic(name: str) -> str:
    return f"fogline-test/{uuid.uuid4().hex}/{name}"


def subscribe(client: mqtt.Client, topic: str) -> queue.Queue[mqtt.MQTTMessage]:
    """Subscribe at QoS 1, wait for the SUBACK, and return a queue of received messages."""
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    client.on_message = lambda _c, _u, msg: received.put(msg)
    client.on_subscribe = lambda *_args: subscribed.set()
    client.subscribe(topic, qos=1)
    assert subscribed.wait(WAIT), f"no SUBACK for {topic}"
    return received


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def template_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the launcher at a scratch template folder."""
    folder = tmp_path / "templates"
    folder.mkdir()
    monkeypatch.setattr(broker_mod, "templates_dir", lambda: folder)
    return folder


def test_published_message_reaches_subscriber(broker: Broker, mqtt_client) -> None:
    assert broker.is_running()
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert broker.port != 1883
    topic = unique_topic("hello")
    received = subscribe(mqtt_client(broker), topic)

    mqtt_client(broker).publish(topic, b"reading-1", qos=1).wait_for_publish(WAIT)

    msg = received.get(timeout=WAIT)
    assert (msg.topic, msg.payload) == (topic, b"reading-1")
    assert broker.conf_path.is_file()
    assert "running" in broker.log_path.read_text()


def test_stop_frees_port_and_leaves_no_process(tmp_path: Path) -> None:
    first = Broker(data_dir=tmp_path / "first").start()
    pid, port = first.pid, first.port
    assert pid is not None and process_exists(pid)

    first.stop()
    first.stop()  # idempotent

    assert not first.is_running()
    assert not process_exists(pid)
    with Broker(data_dir=tmp_path / "second", port=port) as second:
        assert second.port == port
        assert second.is_running()


@pytest.fixture
def other_broker(tmp_path: Path) -> Iterator[Broker]:
    """A second broker alongside the `broker` fixture."""
    with Broker(data_dir=tmp_path / "other") as b:
        yield b


# Brokers are requested before `mqtt_client` so the clients disconnect before the brokers stop.
def test_two_brokers_at_once_get_different_ports(
    broker: Broker, other_broker: Broker, mqtt_client
) -> None:
    assert broker.port != other_broker.port
    assert broker.data_dir != other_broker.data_dir
    topic = unique_topic("isolated")
    received = subscribe(mqtt_client(broker), topic)
    mqtt_client(other_broker).publish(topic, b"on-other", qos=1).wait_for_publish(WAIT)
    mqtt_client(broker).publish(topic, b"on-broker", qos=1).wait_for_publish(WAIT)
    assert received.get(timeout=WAIT).payload == b"on-broker"
    assert received.empty()


def test_auto_port_taken_before_start_is_replaced(tmp_path: Path) -> None:
    b = Broker(data_dir=tmp_path / "broker")
    with socket.create_server(("127.0.0.1", b.port)):
        taken = b.port
        with b:
            assert b.port != taken
            assert b.is_running()


def test_fixed_port_in_use_raises(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        b = Broker(data_dir=tmp_path / "broker", port=port)
        with pytest.raises(BrokerError, match=f"port {port} is in use"):
            b.start()
    assert not b.is_running()
    assert b.port == port


def test_missing_template_raises(tmp_path: Path) -> None:
    b = Broker(data_dir=tmp_path / "broker", template="no-such-template")
    with pytest.raises(BrokerError, match=r"no-such-template\.conf\.tmpl not found.*'dev'"):
        b.start()
    assert b.pid is None


def test_missing_templates_folder_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "__file__", str(tmp_path / "fogline" / "broker.py"))
    with pytest.raises(BrokerError, match="mosquitto/ folder"):
        Broker(data_dir=tmp_path / "broker").start()


def test_unknown_placeholder_raises(tmp_path: Path, template_dir: Path) -> None:
    (template_dir / "typo.conf.tmpl").write_text("listener ${port} ${hots}\n")
    with pytest.raises(BrokerError, match=r"unknown placeholder \$\{hots\}"):
        Broker(data_dir=tmp_path / "broker", template="typo").start()


def test_invalid_config_raises_with_log_tail(tmp_path: Path, template_dir: Path) -> None:
    (template_dir / "bad.conf.tmpl").write_text(
        "user ${user}\nlistener ${port} ${host}\nno_such_option 1\n"
    )
    b = Broker(data_dir=tmp_path / "broker", template="bad")
    with pytest.raises(BrokerError, match="exited with code") as info:
        b.start()
    assert "no_such_option" in info.value.log_tail
    assert "no_such_option" in str(info.value)
    assert not b.is_running()


def test_extra_placeholders_are_rendered(tmp_path: Path, template_dir: Path) -> None:
    dev = (
        Path(broker_mod.__file__).resolve().parents[1] / "mosquitto" / "dev.conf.tmpl"
    ).read_text()
    (template_dir / "tagged.conf.tmpl").write_text(dev + "# run ${run_id}\n")
    with Broker(data_dir=tmp_path / "broker", template="tagged", extra={"run_id": "r42"}) as b:
        assert "# run r42" in b.conf_path.read_text()


def test_kill_then_start_reuses_persistence(broker: Broker, mqtt_client) -> None:
    topic = unique_topic("retained")
    publisher = mqtt_client(broker)
    publisher.publish(topic, b"kept", qos=1, retain=True).wait_for_publish(WAIT)
    publisher.disconnect()
    publisher.loop_stop()
    broker.stop()  # a clean stop writes mosquitto.db
    assert (broker.data_dir / "mosquitto.db").is_file()

    broker.kill()  # no-op when already stopped
    broker.start()
    port = broker.port
    broker.kill()
    assert not broker.is_running()

    broker.start()
    assert broker.port == port
    assert subscribe(mqtt_client(broker), topic).get(timeout=WAIT).payload == b"kept"


def test_context_manager_stops_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), Broker(data_dir=tmp_path / "broker") as b:
        pid = b.pid
        raise RuntimeError("boom")
    assert not b.is_running()
    assert pid is not None and not process_exists(pid)


def test_missing_binary_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker_mod, "_SBIN_DIRS", (str(tmp_path),))
    with pytest.raises(BrokerError, match="apt-get install mosquitto mosquitto-clients"):
        find_mosquitto()
