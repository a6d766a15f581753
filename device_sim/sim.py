"""The simulator process: many devices, one MQTT connection, packed telemetry batches."""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from device_sim.ledger import LEDGER_FILE, Ledger
from device_sim.signals import FIELDS, Fleet
from fogline.codec import Telemetry, encode_telemetry
from fogline.config import ServiceConfig, setting
from fogline.fleet import device_id, edge_of
from fogline.service import Service

log = logging.getLogger(__name__)


@dataclass
class SimConfig(ServiceConfig):
    """Settings of a device simulator process."""

    id: str = setting("s0", "Identifier of this simulator process (a topic segment).")
    devices: int = setting(20, "Number of simulated devices.", minimum=1, maximum=1_000_000)
    first_device: int = setting(
        0, "Number of this process's first device (to share a fleet).", minimum=0
    )
    edges: int = setting(1, "Number of edges; device i reports to edge e(i mod edges).", minimum=1)
    rate: float = setting(10.0, "Readings per second per device.", minimum=0.01, maximum=10_000)
    samples_per_message: int = setting(
        10, "Readings packed in one message.", minimum=1, maximum=10_000
    )
    anomaly_rate: float = setting(
        0.002, "Chance per message that a device shows a fault burst.", minimum=0.0, maximum=1.0
    )
    seed: int = setting(1, "Random seed (runs are reproducible).")
    duration: float = setting(
        0.0, "Stop after this many seconds (0 = run until stopped).", minimum=0.0
    )


class DeviceSim(Service):
    """Publishes one telemetry batch per device per period, recording each in the ledger first."""

    role = "device-sim"
    tick_interval = 0.02

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.fleet = Fleet(
            n=config.devices,
            seed=config.seed + config.first_device,
            anomaly_rate=config.anomaly_rate,
        )
        indexes = range(config.first_device, config.first_device + config.devices)
        self.devices = [device_id(i) for i in indexes]
        self.edges = [edge_of(i, config.edges) for i in indexes]
        self.tele_topics = [
            self.topics.tele(e, d) for e, d in zip(self.edges, self.devices, strict=True)
        ]
        self.period = config.samples_per_message / config.rate
        self.ledger: Ledger | None = None
        self.seqs: list[int] = []
        self._pending: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        self._t_start = 0.0
        self._rounds = 0
        self._lag_warned = 0.0

    def on_start(self) -> None:
        folder = self.cfg.data_dir / f"device-sim-{self.cfg.id}"
        self.ledger = Ledger(folder / LEDGER_FILE)
        produced = self.ledger.produced()
        self.seqs = [produced.get(d, 0) for d in self.devices]
        if any(self.seqs):
            log.info("continuing the ledger: %d readings already produced", sum(self.seqs))

    def on_tick(self, now: float) -> None:
        if self.stopping or not self.connected.is_set() or self.ledger is None:
            return
        if self._t_start == 0.0:
            self._t_start = time.monotonic()
        elapsed = time.monotonic() - self._t_start
        if self.cfg.duration and elapsed >= self.cfg.duration:
            self.request_stop()
            return
        due = int(elapsed / self.period) + 1 - self._rounds
        if due > 2 and now - self._lag_warned > 10:
            self._lag_warned = now
            self.counters["lag_warnings"] += 1
            log.warning(
                "cannot keep up: %d rounds behind (%.0f readings/s asked)", due, self.asked_rate
            )
        for _ in range(min(due, 2)):
            self._round(now)
        self._forget_published()

    @property
    def asked_rate(self) -> float:
        """Readings per second this process is configured to produce."""
        return self.cfg.devices * self.cfg.rate

    def _round(self, now: float) -> None:
        """Produce one message per device: ledger first (write-ahead), then publish."""
        assert self.ledger is not None
        n = self.cfg.samples_per_message
        dt = 1.0 / self.cfg.rate
        values = self.fleet.sample(now, dt, n)
        payloads = []
        for i, device in enumerate(self.devices):
            tele = Telemetry(
                device=device,
                first=self.seqs[i],
                t0=now,
                dt=dt,
                fields=FIELDS,
                values=values[i],
            )
            payloads.append(encode_telemetry(tele, seq=self._rounds, ts=now))
        self.ledger.record(
            [(d, e, n, len(p)) for d, e, p in zip(self.devices, self.edges, payloads, strict=True)]
        )
        for i, payload in enumerate(payloads):
            self._pending.append(self.client.publish(self.tele_topics[i], payload, qos=1))
            self.seqs[i] += n
        self._rounds += 1
        self.counters["readings"] += n * len(self.devices)
        self.counters["messages"] += len(self.devices)
        self.counters["bytes_out"] += sum(len(p) for p in payloads)

    def _forget_published(self) -> None:
        while self._pending and self._pending[0].is_published():
            self._pending.popleft()

    def drained(self) -> bool:
        self._forget_published()
        return not self._pending

    def metrics(self) -> dict[str, Any]:
        return {
            "devices": self.cfg.devices,
            "unacked": len(self._pending),
            "asked_rate": self.asked_rate,
        }

    def on_stopped(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
