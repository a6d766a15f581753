"""The secure broker: TLS with the project CA, a login per client, and an ACL per role."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fogline import keys
from fogline.broker import Broker
from fogline.security import apply_client_security
from fogline.topics import Topics
from tests.integration.conftest import run_up

T = Topics()
NAMES = ("device-sim-s0", "edge-e0", "fog-f0", "cloud-c0", "edge-old")


@dataclass
class Secure:
    """A running secure broker with its key folder and one from an unrelated CA."""

    broker: Broker
    keys: Path
    other: Path


@dataclass
class Session:
    """A client's connection attempt and what it received."""

    client: mqtt.Client
    connack: list[mqtt.ReasonCode] = field(default_factory=list)
    suback: list[list[mqtt.ReasonCode]] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    error: BaseException | None = None
    closed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def connected(self) -> bool:
        return bool(self.connack) and not self.connack[0].is_failure


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("secure")
    folder, other = root / "keys", root / "other-keys"
    keys.init(folder)
    keys.issue(folder, "broker", role="broker")
    for name in NAMES[:-1]:
        keys.issue(folder, name, role=keys.role_from_name(name))
    keys.issue(folder, "edge-old", role="edge", days=-1)  # expired yesterday
    keys.init(other)
    keys.issue(other, "edge-e0", role="edge")  # same name, wrong CA
    broker = Broker(data_dir=root / "broker", template="secure", extra={"keys_dir": str(folder)})
    broker.start()
    try:
        yield Secure(broker, folder, other)
    finally:
        broker.stop()


def connect(
    s: Secure,
    name: str | None,
    *,
    folder: Path | None = None,
    login: bool = True,
    password_file: Path | None = None,
    subscribe: str | None = None,
    wait: float = 3.0,
) -> Session:
    """Connect over TLS with `name`'s certificate (and login); wait for CONNACK (and SUBACK)."""
    folder = folder or s.keys
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    sess = Session(client)
    if name is None:
        client.tls_set(ca_certs=str(s.keys / "ca.crt"))
    else:
        cred = keys.credential(folder, name)
        apply_client_security(
            client,
            ca=s.keys / "ca.crt",
            cert=cred.cert,
            key=cred.key,
            username=name if login else "",
            password_file=password_file or cred.password_file,
        )

    def on_connect(c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        sess.connack.append(rc)
        if subscribe and not rc.is_failure:
            c.subscribe(subscribe, qos=1)

    def on_subscribe(
        _c: mqtt.Client, _u: object, _m: int, rcs: list[mqtt.ReasonCode], _p: object
    ) -> None:
        sess.suback.append(rcs)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with sess.lock:
            sess.received.append(msg.topic)

    client.on_connect = on_connect
    client.on_disconnect = lambda *_: sess.closed.set()
    client.on_connect_fail = lambda *_: sess.closed.set()
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(s.broker.host, s.broker.port, keepalive=10)
    except OSError as exc:  # the TLS handshake itself refused us
        sess.error = exc
        return sess
    client.loop_start()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if sess.connack and (not subscribe or sess.suback or not sess.connected):
            break
        if sess.closed.is_set() and not sess.connack:
            break
        time.sleep(0.02)
    return sess


def close(*sessions: Session) -> None:
    for sess in sessions:
        sess.client.disconnect()
        sess.client.loop_stop()


def test_a_client_with_its_own_certificate_and_login_connects(secure: Secure) -> None:
    sess = connect(secure, "edge-e0")
    close(sess)
    assert sess.connected, f"edge-e0 was refused: {sess.connack} {sess.error}"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("anonymous", "not authorised"),
        ("no-certificate", "peer did not return a certificate"),
        ("wrong-password", "not authorised"),
        ("other-ca", "certificate verify failed"),
        ("expired", "certificate verify failed"),
    ],
)
def test_the_broker_refuses(secure: Secure, case: str, reason: str, tmp_path: Path) -> None:
    offset = secure.broker.log_path.stat().st_size
    if case == "anonymous":
        sess = connect(secure, "edge-e0", login=False)
    elif case == "no-certificate":
        sess = connect(secure, None)
    elif case == "wrong-password":
        wrong = tmp_path / "pw"
        wrong.write_text("not-the-password\n")
        sess = connect(secure, "edge-e0", password_file=wrong)
    elif case == "other-ca":
        sess = connect(secure, "edge-e0", folder=secure.other)
    else:
        sess = connect(secure, "edge-old")
    close(sess)
    assert not sess.connected, f"{case}: the broker accepted the connection"
    with secure.broker.log_path.open("rb") as fh:
        fh.seek(offset)
        log = fh.read().decode(errors="replace")
    assert reason in log.lower(), f"{case}: the broker log does not say {reason!r}:\n{log}"


def test_a_device_credential_cannot_write_custody_topics_or_read_everything(
    secure: Secure,
) -> None:
    fog = connect(secure, "fog-f0", subscribe=T.up_sub("edge"))
    edge = connect(secure, "edge-e0", subscribe=T.tele_sub("e0"))
    snoop = connect(secure, "device-sim-s0", subscribe="#")
    dev = connect(secure, "device-sim-s0")
    try:
        assert fog.connected and edge.connected and snoop.connected and dev.connected
        assert fog.suback and not fog.suback[0][0].is_failure, "the fog may read edge batches"
        # A forged batch on another edge's custody topic, then real telemetry as a control.
        dev.client.publish(T.up("edge", "e0"), b"forged", qos=1).wait_for_publish(2)
        dev.client.publish(T.tele("e0", "d00000"), b"reading", qos=1).wait_for_publish(2)
        # The fog acks e0 (a topic the simulator has no right to read).
        fog.client.publish(T.ack("edge", "e0"), b"ack", qos=1).wait_for_publish(2)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not edge.received:
            time.sleep(0.02)
        time.sleep(0.5)  # time for anything that should not arrive
        assert edge.received == [T.tele("e0", "d00000")], "allowed telemetry did not arrive"
        assert fog.received == [], f"the forged batch reached the fog: {fog.received}"
        refused = bool(snoop.suback) and snoop.suback[0][0].is_failure
        assert refused or snoop.received == [], f"'#' delivered {snoop.received}"
    finally:
        close(fog, edge, snoop, dev)


def test_up_secure_runs_the_pipeline_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rep = run_up(data, "--secure", "--devices", "10", "--edges", "1", "--duration", "8")
    conf = (data / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "allow_anonymous false" in conf
    assert rep["produced"] > 0
    assert rep["unaccounted"] == 0, rep
    log = (data / "broker" / "mosquitto.log").read_text()
    for user in ("device-sim-s0", "edge-e0", "fog-f0", "cloud-c0"):
        assert f"u'{user}'" in log, f"{user} did not log in with its own credential"
