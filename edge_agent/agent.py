"""The edge agent process: MQTT shell around `EdgeCore`, with an outbox to the fog."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from edge_agent.core import EdgeCore, Record, Rules
from fogline.codec import decode
from fogline.config import setting
from fogline.custody import Outbox, SenderConfig, Uplink
from fogline.db import connect, migrate, transaction
from fogline.errors import DecodeError
from fogline.service import Inbound, Service
from fogline.topics import check_id

log = logging.getLogger(__name__)

_MIGRATIONS = [
    "CREATE TABLE devices (device TEXT PRIMARY KEY, expected INTEGER NOT NULL)",
]


@dataclass
class EdgeConfig(SenderConfig):
    """Settings of an edge agent."""

    id: str = setting("e0", "Identifier of this edge (a topic segment).")
    fog_id: str = setting("f0", "Identifier of the fog aggregator this edge reports to.")
    window: int = setting(20, "Readings per decision window.", minimum=2, maximum=100_000)
    z_threshold: float = setting(
        4.0, "Window-mean z-score above which a window is abnormal.", minimum=0.5
    )
    warmup_windows: int = setting(5, "Windows per device before decisions start.", minimum=1)
    summary_interval: float = setting(5.0, "Seconds between per-device summaries.", minimum=0.1)

    def validate(self) -> None:
        super().validate()
        check_id(self.fog_id, "fog_id")


class EdgeAgent(Service):
    """Subscribes to its devices' telemetry, decides per window and sends records to the fog."""

    role = "edge"
    persistent_session = True  # the broker queues telemetry while the agent restarts

    def __init__(self, config: EdgeConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.tele_prefix = self.topics.tele_sub(config.id)[: -len("+/tele")]
        self.ack_topic = self.topics.ack("edge", config.id)
        self.fog_status = self.topics.status("fog", config.fog_id)

    def on_start(self) -> None:
        self.db = connect(self.cfg.data_dir / f"edge-{self.cfg.id}" / "edge.db")
        migrate(self.db, "edge", _MIGRATIONS)
        expected = dict(self.db.execute("SELECT device, expected FROM devices").fetchall())
        rules = Rules(
            window=self.cfg.window,
            z_threshold=self.cfg.z_threshold,
            warmup_windows=self.cfg.warmup_windows,
            summary_interval=self.cfg.summary_interval,
        )
        self.core = EdgeCore(self.cfg.id, rules, expected)
        self.outbox = Outbox(self.db, stream=self.cfg.id, limits=self.cfg.outbox_limits())
        self.uplink = Uplink(
            self.outbox,
            topic_up=self.topics.up("edge", self.cfg.id),
            publish=lambda topic, payload: self.publish(topic, payload, qos=1),
        )

    def subscriptions(self) -> list[str]:
        return [self.topics.tele_sub(self.cfg.id), self.ack_topic, self.fog_status]

    def accepts(self, topic: str) -> bool:
        # Once stopping, telemetry stays unacknowledged so the broker redelivers it later.
        return not (self.stopping and topic.startswith(self.tele_prefix))

    def on_connected(self) -> None:
        self.uplink.on_reconnect()

    def handle(self, messages: list[Inbound]) -> None:
        now = time.time()
        records: list[Record] = []
        for m in messages:
            if m.topic == self.ack_topic:
                try:
                    self.uplink.on_ack(decode(m.payload, expect="ack").body)
                except DecodeError as exc:
                    self.reject(exc.reason, m.topic, m.payload, exc.detail)
            elif m.topic == self.fog_status:
                try:
                    self.uplink.on_receiver_status(decode(m.payload, expect="status").body)
                except DecodeError as exc:
                    self.reject(exc.reason, m.topic, m.payload, exc.detail)
            else:
                records += self._telemetry(m, now)
        self._commit(records, now)

    def _telemetry(self, m: Inbound, now: float) -> list[Record]:
        try:
            _edge, device = self.topics.parse_tele(m.topic)
            env = decode(m.payload, expect="tele")
        except DecodeError as exc:
            self.reject(exc.reason, m.topic, m.payload, exc.detail)
            return []
        if env.body.device != device:
            self.reject("forged_device", m.topic, m.payload, f"payload says {env.body.device!r}")
            return []
        self.counters["readings_in"] += env.body.count
        if self.core.is_replay(env.body):
            tele = env.body
            detail = f"readings {tele.first}..{tele.last} were already taken"
            self.reject("replay", m.topic, m.payload, detail)
        records = self.core.ingest(env.body, now)
        if any(kind == "drop" and body["reason"] == "non_finite" for kind, body in records):
            # Accounted for by the drop record; also dead-lettered so the device can be fixed.
            self.reject("non_finite", m.topic, m.payload, "NaN or infinite sample values")
        return records

    def _commit(self, records: list[Record], now: float) -> None:
        """Write records and the devices' restart points in one transaction."""
        if not records:
            return
        with transaction(self.db):
            self.outbox.put(records, now)
            self.db.executemany(
                "INSERT INTO devices(device, expected) VALUES (?, ?)"
                " ON CONFLICT(device) DO UPDATE SET expected = excluded.expected",
                list(self.core.committed().items()),
            )
        for kind, _ in records:
            self.counters[f"records.{kind}"] += 1

    def on_tick(self, now: float) -> None:
        self._commit(self.core.due_summaries(now), now)
        for reason, n in self.outbox.enforce_bounds(now).items():
            self.counters[f"evicted.{reason}"] += n
        if self.connected.is_set():
            self.uplink.pump(now)

    def on_stopping(self) -> None:
        self._commit(self.core.due_summaries(time.time(), force=True), time.time())

    def drained(self) -> bool:
        return self.outbox.records == 0

    def metrics(self) -> dict[str, Any]:
        now = time.time()
        return {
            "devices": len(self.core.devices),
            # Readings taken or reported missing so far: the supervisor compares it to the ledger.
            "position": sum(d.expected for d in self.core.devices.values()),
            "outbox_records": self.outbox.records,
            "outbox_bytes": self.outbox.held_bytes,
            "outbox_age": self.outbox.oldest_age(now),
            "acked": self.uplink.acked,
            **{f"core.{k}": v for k, v in self.core.stats.items()},
        }

    def on_stopped(self) -> None:
        self.db.close()
