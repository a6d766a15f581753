"""Shared fixtures: a private Mosquitto per test, connected paho-mqtt clients, the processes
started one by one against a broker (`hand`), a private PostgreSQL cluster per session and the
cloud store on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_sink.store import CloudStore, open_store
from fogline.broker import Broker, find_free_port
from fogline.pgcluster import PostgresCluster, find_pg_bin
from tests.chaos.conftest import Hand

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


# --------------------------------------------------------------------------- PostgreSQL

_schemas = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster for the whole session, with a database `fogline`."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl): PostgreSQL tests skipped")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e .[dev])")
    with PostgresCluster() as cluster:
        cluster.create_database("fogline")
        yield cluster


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    """A fresh empty schema of the session's cluster, as a URL (its `search_path`)."""
    import psycopg

    schema = f"t{next(_schemas)}"
    with psycopg.connect(postgres.url("fogline"), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{postgres.url('fogline')}?options=-csearch_path%3D{schema}"


class StoreUnderTest:
    """Where a cloud store lives (an SQLite path or a PostgreSQL URL) and a way to read it."""

    def __init__(self, kind: str, where: str | Path) -> None:
        self.kind = kind
        self.where = where

    def open(self) -> CloudStore:
        """Open the store (migrating it)."""
        return open_store(self.where)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a query, as tuples (both databases take the same plain SQL)."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.where)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(str(self.where)) as pg:
            return pg.execute(sql).fetchall()

    def tables(self) -> set[str]:
        """The names of the tables in the store."""
        if self.kind == "sqlite":
            return {r[0] for r in self.rows("SELECT name FROM sqlite_master WHERE type='table'")}
        sql = "SELECT table_name FROM information_schema.tables WHERE table_schema=current_schema()"
        return {r[0] for r in self.rows(sql)}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    """The cloud store on SQLite (in `tmp_path`) and on PostgreSQL (a fresh schema)."""
    if request.param == "sqlite":
        return StoreUnderTest("sqlite", tmp_path / "cloud-c0" / "cloud.db")
    return StoreUnderTest("postgres", request.getfixturevalue("pg_url"))


@pytest.fixture
def hand(tmp_path: Path) -> Iterator[Hand]:
    """A broker on a fixed free port (so it can be killed and started again on the same port)
    and a `Hand` to start the processes against it in `tmp_path / "data"`."""
    data = tmp_path / "data"
    broker = Broker(data_dir=data / "broker", port=find_free_port())
    broker.start()
    h = Hand(broker, data)
    try:
        yield h
    finally:
        h.close()
        broker.stop()
