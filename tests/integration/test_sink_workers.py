"""Two cloud-sink workers share the fogs' records and one store, with real processes end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fogline.broker import Broker
from fogline.codec import decode
from fogline.topics import Topics
from tests.conftest import MqttClientFactory
from tests.integration.conftest import Processes, wait_for

pytestmark = pytest.mark.timeout(180)

T = Topics()
FOGS = {"f0": "e0", "f1": "e1"}  # fog -> its edge; by hash, f0 goes to worker 0 and f1 to 1
WORKERS = ("c0", "c0-w1")


class Watch:
    """The latest retained status and metrics counters of every process, by `<role>-<id>`."""

    def __init__(self, client: mqtt.Client) -> None:
        self.lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.counters: dict[str, dict[str, int]] = {}
        client.on_message = self._on_message
        client.subscribe(T.all_status(), qos=1)
        client.subscribe(T.all_metrics(), qos=0)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        role, ident = msg.topic.split("/")[-2:]
        env = decode(bytes(msg.payload))
        with self.lock:
            if env.kind == "status":
                self.states[f"{role}-{ident}"] = str(env.body.get("state"))
            elif env.kind == "metrics":
                self.counters[f"{role}-{ident}"] = dict(env.body.get("counters") or {})

    def online(self, names: list[str]) -> bool:
        with self.lock:
            return all(self.states.get(n) == "online" for n in names)

    def counter(self, name: str, key: str) -> int:
        with self.lock:
            return int(self.counters.get(name, {}).get(key, 0))


def _report(data: Path, store: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "report", "--data-dir", str(data), "--json", *store],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return dict(json.loads(proc.stdout))


@pytest.mark.parametrize(
    ("store", "split"),
    [
        ("sqlite", "shared"),
        pytest.param("postgres", "shared", marks=pytest.mark.postgres),
        pytest.param("postgres", "by-fog", marks=pytest.mark.postgres),
    ],
)
def test_two_sink_workers_store_every_reading_once(
    store: str,
    split: str,
    broker: Broker,
    processes: Processes,
    mqtt_client: MqttClientFactory,
    request: pytest.FixtureRequest,
) -> None:
    store_args = [] if store == "sqlite" else ["--store", request.getfixturevalue("pg_url")]
    watch = Watch(mqtt_client(broker))
    for k in (0, 1):
        processes.start(
            "cloud_sink", "--workers", "2", "--worker", str(k), "--split", split, *store_args
        )
    for fog, edge in FOGS.items():
        processes.start("fog_aggregator", "--id", fog, "--edges", edge)
        processes.start(
            "edge_agent", "--id", edge, "--fog-id", fog, "--detector", "zscore",
            "--summary-interval", "0.5",
        )  # fmt: skip
    names = [f"cloud-{w}" for w in WORKERS] + [f"fog-{f}" for f in FOGS]
    names += [f"edge-{e}" for e in FOGS.values()]
    wait_for(lambda: watch.online(names), 30, f"{', '.join(names)} online")

    sim = processes.start("device_sim", "--devices", "20", "--edges", "2", "--duration", "8")
    assert sim.wait(timeout=60) == 0

    def settled() -> dict[str, Any] | None:
        rep = _report(processes.data_dir, store_args)
        return rep if rep["produced"] and rep["unaccounted"] == 0 else None

    rep = wait_for(settled, 60, "every produced reading to be stored")
    for w in WORKERS:
        wait_for(
            lambda w=w: watch.counter(f"cloud-{w}", "stored.summary") > 0,  # type: ignore[misc]
            10,
            f"worker {w} to have stored summaries",
        )
    if split == "by-fog":  # each worker saw the other's fog too, and left it alone
        assert all(watch.counter(f"cloud-{w}", "batches_for_other_workers") > 0 for w in WORKERS)
    processes.stop_all()

    rep = _report(processes.data_dir, store_args)
    assert rep["produced"] >= 20 * 10 * 5
    assert rep["unaccounted"] == 0, rep["unaccounted_devices"]
    assert rep["duplicates"] == 0
    assert rep["dropped"] == {}
    assert rep["rejected_records"] == 0
    assert len(rep["stores"]) == 1
