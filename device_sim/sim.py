"""The simulator process: many devices, one MQTT connection, packed telemetry batches.

Simulated time runs `time_scale` times faster than the wall clock, so hours of machine life
(faults developing towards failure) fit in a short run. Reading `k` of every device is taken at
`k * time_scale / rate` simulated seconds after the fleet's start; telemetry carries that time.
The ground truth (which machine develops which fault, when) goes to `truth.json` beside the
ledger, never onto the telemetry topic.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from device_sim.ledger import LEDGER_FILE, Ledger
from device_sim.physics import FAULT_KINDS, FIELDS, FaultMix, Fleet
from fogline import aead
from fogline.codec import Telemetry, encode_telemetry
from fogline.config import ServiceConfig, setting
from fogline.errors import ConfigError, FoglineError
from fogline.evaluate import TRUTH_FILE
from fogline.fleet import device_id, edge_of
from fogline.service import Service

log = logging.getLogger(__name__)

#: Messages published but not yet acknowledged by the broker, at most (MQTT ids are 16-bit).
MAX_UNACKED = 30_000

DEFAULT_FAULTS = [
    "bearing_wear=0.03", "overheating=0.03", "imbalance=0.02", "sensor_stuck=0.01",
    "sensor_dropout=0.01", "sensor_spikes=0.01", "sensor_drift=0.01",
]  # fmt: skip


@dataclass
class SimConfig(ServiceConfig):
    """Settings of a device simulator process."""

    id: str = setting("s0", "Identifier of this simulator process (a topic segment).")
    devices: int = setting(20, "Number of simulated devices.", minimum=1, maximum=1_000_000)
    first_device: int = setting(
        0, "Number of this process's first device (to share a fleet).", minimum=0
    )
    edges: int = setting(
        1, "Number of edges; device i reports to edge e(first_edge + i mod edges).", minimum=1
    )
    first_edge: int = setting(
        0, "Number of the first of this process's edges (a site's simulator).", minimum=0
    )
    rate: float = setting(10.0, "Readings per second per device.", minimum=0.01, maximum=10_000)
    samples_per_message: int = setting(
        10, "Readings packed in one message.", minimum=1, maximum=10_000
    )
    time_scale: float = setting(
        60.0, "Simulated seconds per wall-clock second.", minimum=0.001, maximum=1e6
    )
    faults: list[str] = setting(
        DEFAULT_FAULTS,
        "Fault mix: kind=probability that a machine develops it ('none' for a healthy fleet).",
    )
    fault_horizon_h: float = setting(
        1.0, "Faults start within this many simulated hours.", minimum=0.001
    )
    ambient_offset: float = setting(
        0.0, "Degrees C added to every machine's ambient temperature (a hotter or colder site).",
        minimum=-40.0, maximum=60.0,
    )  # fmt: skip
    wear_hours: list[float] = setting(
        [0.5, 2.0], "Onset-to-failure range in simulated hours for wearing faults (min,max)."
    )
    seed: int = setting(1, "Random seed (runs are reproducible).")
    duration: float = setting(
        0.0, "Stop after this many seconds (0 = run until stopped).", minimum=0.0
    )
    aead_keys: str = setting(
        "", "Folder of device keys; telemetry is sealed with each device's newest ('' = clear)."
    )

    def fault_mix(self) -> FaultMix:
        """The fault mix these settings describe."""
        rates: dict[str, float] = {}
        for item in self.faults:
            if item in ("none", ""):
                continue
            kind, _, value = item.partition("=")
            if kind not in FAULT_KINDS:
                raise ConfigError(
                    "faults", f"unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})"
                )
            try:
                rates[kind] = float(value)
            except ValueError as exc:
                raise ConfigError("faults", f"{item!r} is not kind=probability") from exc
        if len(self.wear_hours) != 2:
            raise ConfigError("wear_hours", "give two numbers: min,max")
        try:
            return FaultMix(
                rates=rates,
                horizon_h=self.fault_horizon_h,
                wear_hours=(self.wear_hours[0], self.wear_hours[1]),
            )
        except ValueError as exc:
            raise ConfigError("faults", str(exc)) from exc

    def validate(self) -> None:
        super().validate()
        self.fault_mix()


@dataclass
class _Round:
    """One message per device, sampled and in the ledger, published over the round's period."""

    values: np.ndarray
    firsts: list[int]
    t0: float
    sent: int = 0
    nbytes: int = 0


class DeviceSim(Service):
    """Publishes one telemetry batch per device per period, recording each in the ledger first."""

    role = "device-sim"
    tick_interval = 0.02

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.fleet = Fleet(
            n=config.devices, first=config.first_device, seed=config.seed,
            mix=config.fault_mix(), ambient_offset=config.ambient_offset,
        )  # fmt: skip
        indexes = range(config.first_device, config.first_device + config.devices)
        self.devices = [device_id(i) for i in indexes]
        self.edges = [edge_of(i, config.edges, config.first_edge) for i in indexes]
        self.tele_topics = [
            self.topics.tele(e, d) for e, d in zip(self.edges, self.devices, strict=True)
        ]
        self.period = config.samples_per_message / config.rate
        self.dt_sim = config.time_scale / config.rate
        self.folder = config.data_dir / f"device-sim-{config.id}"
        self.ledger: Ledger | None = None
        self.seqs: list[int] = []
        self.sim_start = 0.0
        self._pending: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        self._t_start = 0.0
        self._rounds = 0
        #: The round being published (None between rounds).
        self._round: _Round | None = None
        self._lag_warned = 0.0
        #: Per device, the key id and key its telemetry is sealed with (empty: sent in clear).
        self.seal_keys: list[tuple[str, bytes]] = []
        if config.aead_keys:
            store = aead.KeyStore(Path(config.aead_keys))
            try:
                self.seal_keys = [store.newest(d) for d in self.devices]
            except FoglineError as exc:
                raise ConfigError("aead_keys", str(exc)) from exc
            log.info("sealing telemetry with %s (keys in %s)", aead.ALGORITHM, config.aead_keys)

    def on_start(self) -> None:
        self.ledger = Ledger(self.folder / LEDGER_FILE)
        self.ledger.register(zip(self.devices, self.edges, strict=True))
        produced = self.ledger.produced()
        self.seqs = [produced.get(d, 0) for d in self.devices]
        if any(self.seqs):
            log.info("continuing the ledger: %d readings already produced", sum(self.seqs))
        # After a restart the physics resumes at the simulated time of the next reading.
        self.sim_start = self._write_truth()

    def _write_truth(self) -> float:
        """Write the ground truth (kept from an earlier run of the same fleet); return its start."""
        path = self.folder / TRUTH_FILE
        start = time.time()
        if path.exists():
            start = float(json.loads(path.read_text()).get("start", start))
        faults = [
            {
                "device": device_id(f.device),
                "kind": f.kind,
                "field": f.field,
                "onset_h": f.onset / 3600,
                "failure_h": None if f.failure is None else f.failure / 3600,
                "onset_seq": math.ceil(f.onset / self.dt_sim),
                "failure_seq": None if f.failure is None else math.ceil(f.failure / self.dt_sim),
            }
            for f in self.fleet.faults
        ]
        doc = {
            "start": start,
            "dt": self.dt_sim,
            "rate": self.cfg.rate,
            "time_scale": self.cfg.time_scale,
            "seed": self.cfg.seed,
            "first_device": self.cfg.first_device,
            "devices": self.cfg.devices,
            "fields": list(FIELDS),
            "faults": faults,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        log.info(
            "ground truth: %d of %d machines develop a fault (%s)",
            len(faults),
            self.cfg.devices,
            path,
        )
        return start

    def on_tick(self, now: float) -> None:
        if self.stopping or not self.connected.is_set() or self.ledger is None:
            return
        if self._t_start == 0.0:
            self._t_start = time.monotonic()
        elapsed = time.monotonic() - self._t_start
        if self.cfg.duration and elapsed >= self.cfg.duration:
            self._publish_upto(len(self.devices))  # a round is never left half published
            self.request_stop()
            return
        due = int(elapsed / self.period) + 1 - self._rounds
        if due > 2 and now - self._lag_warned > 10:
            self._lag_warned = now
            self.counters["lag_warnings"] += 1
            log.warning(
                "cannot keep up: %d rounds behind (%.0f readings/s asked)", due, self.asked_rate
            )
        self._forget_published()
        if due > 0:
            # The next round is due: whatever is left of this one goes out now.
            self._publish_upto(len(self.devices))
        for _ in range(min(due, 2)):
            self._publish_upto(len(self.devices))
            if len(self._pending) + len(self.devices) > MAX_UNACKED:
                # The broker is not keeping up: wait rather than queue without bound (MQTT has
                # only 65,535 message ids). The rounds not produced show as lag, never as loss.
                self.counters["backpressure_waits"] += 1
                break
            self._start_round()
        if self._round is not None:
            # Devices publish spread evenly over the period, as independent machines would.
            share = (elapsed - (self._rounds - 1) * self.period) / self.period
            self._publish_upto(min(len(self.devices), math.ceil(share * len(self.devices))))
        self._forget_published()

    def on_stopping(self) -> None:
        if self.ledger is not None:
            self._publish_upto(len(self.devices))

    @property
    def asked_rate(self) -> float:
        """Readings per second this process is configured to produce."""
        return self.cfg.devices * self.cfg.rate

    def _start_round(self) -> None:
        """Sample one message per device and write it to the ledger (write-ahead); the messages
        go out over the round's period (`_publish_upto`)."""
        assert self.ledger is not None
        n = self.cfg.samples_per_message
        t_sim = self.seqs[0] * self.dt_sim
        values = self.fleet.sample(t_sim, self.dt_sim, n)
        self.ledger.record_round(n, nbytes=0)
        self._round = _Round(values=values, firsts=list(self.seqs), t0=self.sim_start + t_sim)
        for i in range(len(self.seqs)):
            self.seqs[i] += n
        self._rounds += 1

    def _publish_upto(self, upto: int) -> None:
        """Publish the current round's messages of devices `[sent, upto)`, each stamped with the
        moment it is published."""
        r = self._round
        if r is None or upto <= r.sent:
            return
        n = self.cfg.samples_per_message
        for i in range(r.sent, upto):
            tele = Telemetry(
                device=self.devices[i], first=r.firsts[i], t0=r.t0, dt=self.dt_sim,
                fields=FIELDS, values=r.values[i],
            )  # fmt: skip
            if self.seal_keys:
                kid, key = self.seal_keys[i]
                payload = aead.seal_telemetry(
                    tele, kid, key, topic=self.tele_topics[i], seq=self._rounds, ts=time.time()
                )
            else:
                payload = encode_telemetry(tele, seq=self._rounds, ts=time.time())
            self._pending.append(self.client.publish(self.tele_topics[i], payload, qos=1))
            r.nbytes += len(payload)
        self.counters["readings"] += n * (upto - r.sent)
        self.counters["messages"] += upto - r.sent
        r.sent = upto
        if upto == len(self.devices):
            assert self.ledger is not None
            self.ledger.add_bytes(r.nbytes)
            self.counters["bytes_out"] += r.nbytes
            self._round = None

    def _forget_published(self) -> None:
        while self._pending:
            info = self._pending[0]
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # Refused by the client: in the ledger but never sent; the edge reports the gap.
                self.counters["publish_refused"] += 1
            elif not info.is_published():
                break
            self._pending.popleft()

    def drained(self) -> bool:
        self._forget_published()
        return not self._pending

    def metrics(self) -> dict[str, Any]:
        return {
            "devices": self.cfg.devices,
            "unacked": len(self._pending),
            "asked_rate": self.asked_rate,
            "simulated_hours": (self.seqs[0] * self.dt_sim / 3600) if self.seqs else 0.0,
        }

    def on_stopped(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
