"""The fog aggregator process: custody receiver for edges, custody sender to the cloud."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fog_aggregator.core import rollup_body, split, tally
from fogline.codec import (
    Escalation,
    EscalationReply,
    Record,
    decode,
    encode_ack,
    encode_escalation_reply,
)
from fogline.config import setting
from fogline.custody import Inbox, Outbox, SenderConfig, Uplink
from fogline.db import connect, migrate, transaction
from fogline.errors import DecodeError, FoglineError
from fogline.features import feature_names
from fogline.logs import log_records
from fogline.models.catalog import default_model_path
from fogline.models.loaded import LoadedModel, load_model
from fogline.service import Inbound, Service
from fogline.topics import check_id

log = logging.getLogger(__name__)

_MIGRATIONS = [
    """
    CREATE TABLE rollup_acc (
        edge TEXT PRIMARY KEY,
        since REAL NOT NULL,
        readings INTEGER NOT NULL DEFAULT 0,
        summaries INTEGER NOT NULL DEFAULT 0,
        events INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0,
        devices TEXT NOT NULL DEFAULT '[]'
    )
    """,
    """
    CREATE TABLE training (
        edge TEXT NOT NULL, device TEXT NOT NULL, first INTEGER, last INTEGER,
        label TEXT NOT NULL, features BLOB NOT NULL, received REAL NOT NULL
    )
    """,
]


@dataclass
class FogConfig(SenderConfig):
    """Settings of a fog aggregator."""

    id: str = setting("f0", "Identifier of this fog node (a topic segment).")
    cloud_id: str = setting("c0", "Identifier of the cloud sink this fog reports to.")
    edges: list[str] = setting(
        ["+"], "Edges whose records this fog takes (ids, or + for every edge on the broker)."
    )
    rollup_interval: float = setting(10.0, "Seconds between per-site rollups.", minimum=0.1)
    fog_model: str = setting(
        "", "The classifier that answers escalations ('' = the built-in fog_classifier)."
    )

    def validate(self) -> None:
        super().validate()
        check_id(self.cloud_id, "cloud_id")
        for edge in self.edges:
            if edge != "+":
                check_id(edge, "edges")


class FogAggregator(Service):
    """Applies edge batches exactly once into its own outbox, acks them, forwards to the cloud."""

    role = "fog"

    def __init__(self, config: FogConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.up_prefix = f"{self.topics.root}/edge/"
        self.ack_topic = self.topics.ack("fog", config.id)
        self.cloud_status = self.topics.status("cloud", config.cloud_id)
        self._next_rollup = 0.0

    def on_start(self) -> None:
        self.db = connect(self.cfg.data_dir / f"fog-{self.cfg.id}" / "fog.db")
        migrate(self.db, "fog", _MIGRATIONS)
        self.inbox = Inbox(self.db)
        self.outbox = Outbox(self.db, stream=self.cfg.id, limits=self.cfg.outbox_limits())
        self.uplink = Uplink(
            self.outbox,
            topic_up=self.topics.up("fog", self.cfg.id),
            publish=lambda topic, payload: self.publish(topic, payload, qos=1),
        )
        self._next_rollup = time.time() + self.cfg.rollup_interval
        self.model = self._load_model()

    def _load_model(self) -> LoadedModel | None:
        path = (
            Path(self.cfg.fog_model) if self.cfg.fog_model else default_model_path("fog_classifier")
        )
        try:
            model = load_model(path)
        except (OSError, FoglineError) as exc:
            log.error(
                "cannot load the fog model %s (%s): escalations will go unanswered", path, exc
            )
            return None
        log.info("answering escalations with %s", model.label)
        return model

    def subscriptions(self) -> list[str]:
        ups = [self.topics.up("edge", e) for e in self.cfg.edges]
        escs = [self.topics.esc(e) for e in self.cfg.edges]
        return [*ups, *escs, self.ack_topic, self.cloud_status]

    def accepts(self, topic: str) -> bool:
        # Once stopping, edge batches stay unacknowledged: the edges re-send them later.
        return not (self.stopping and topic.startswith(self.up_prefix) and topic.endswith("/up"))

    def on_connected(self) -> None:
        self.uplink.on_reconnect()

    def handle(self, messages: list[Inbound]) -> None:
        now = time.time()
        batches = []
        escalations = []
        for m in messages:
            try:
                if m.topic.endswith("/esc"):
                    edge = self.topics.parse_esc(m.topic)
                    env = decode(m.payload, expect="esc")
                    if env.src != edge:
                        raise DecodeError(
                            "forged_source", f"escalation from {env.src!r} on {edge!r}'s topic"
                        )
                    escalations.append((m, edge, env.body))
                elif m.topic == self.ack_topic:
                    self.uplink.on_ack(decode(m.payload, expect="ack").body)
                elif m.topic == self.cloud_status:
                    self.uplink.on_receiver_status(decode(m.payload, expect="status").body)
                else:
                    edge = self.topics.parse_sender(m.topic, "edge")
                    env = decode(m.payload, expect="batch")
                    if env.src != edge:
                        raise DecodeError(
                            "forged_source", f"batch from {env.src!r} on {edge!r}'s topic"
                        )
                    batches.append((m, edge, env.body))
            except DecodeError as exc:
                self.reject(exc.reason, m.topic, m.payload, exc.detail)
        if batches:
            self._apply(batches, now)
        if escalations:
            self._escalations(escalations, now)

    def _apply(self, batches: list[Any], now: float) -> None:
        """Dedupe, forward and tally all batches in one transaction, then ack each sender."""
        fresh_by_edge: dict[str, list[Record]] = defaultdict(list)
        with transaction(self.db):
            for m, edge, batch in batches:
                fresh, kept, bad = split(self.inbox.accept(edge, batch))
                for rec in bad:
                    self.reject(
                        "unknown_record_kind", m.topic, m.payload, f"record kind {rec.kind!r}"
                    )
                fresh_by_edge[edge] += fresh
                self._keep_training(m, edge, kept, now)
            forwarded = [(r.kind, r.body) for recs in fresh_by_edge.values() for r in recs]
            self.outbox.put(forwarded, now)
            for edge, t in tally(fresh_by_edge).items():
                self.counters["readings"] += t.readings
                row = self.db.execute(
                    "SELECT devices FROM rollup_acc WHERE edge = ?", (edge,)
                ).fetchone()
                devices = sorted(set(json.loads(row[0]) if row else []) | t.devices)
                self.db.execute(
                    "INSERT INTO rollup_acc"
                    "(edge, since, readings, summaries, events, dropped, devices)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(edge) DO UPDATE SET"
                    " readings = readings + excluded.readings,"
                    " summaries = summaries + excluded.summaries,"
                    " events = events + excluded.events, dropped = dropped + excluded.dropped,"
                    " devices = excluded.devices",
                    (edge, now, t.readings, t.summaries, t.events, t.dropped, json.dumps(devices)),
                )
        self.counters["records_forwarded"] += len(forwarded)
        if log.isEnabledFor(logging.DEBUG):
            log_records(log, "forwarded", forwarded)
        for edge in {e for _, e, _ in batches}:
            ack = self.inbox.ack(edge)
            payload = encode_ack(self.cfg.id, ack, seq=self.next_seq(), ts=now)
            self.publish(self.topics.ack("edge", edge), payload, qos=1)

    def _keep_training(self, m: Inbound, edge: str, records: list[Record], now: float) -> None:
        """Store training samples for regional retraining (inside the apply transaction)."""
        rows = []
        for rec in records:
            b = rec.body
            row = (
                edge, b.get("device"), b.get("first"), b.get("last"), b.get("label"),
                b.get("features"), now,
            )  # fmt: skip
            valid = (
                isinstance(row[1], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in row[2:4])
                and isinstance(row[4], str)
                and isinstance(row[5], bytes)
            )
            if not valid:
                detail = f"training sample {rec.seq} lacks device/first/last/label/features"
                self.reject("bad_training_sample", m.topic, m.payload, detail)
                continue
            rows.append(row)
        self.db.executemany(
            "INSERT INTO training(edge, device, first, last, label, features, received)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self.counters["training_samples"] += len(rows)

    def _escalations(self, requests: list[tuple[Inbound, str, Escalation]], now: float) -> None:
        """Answer escalations with the fog's larger model: one batch for all of them."""
        if self.model is None:
            self.counters["escalations.unanswered"] += len(requests)
            return
        answerable = []
        for m, edge, esc in requests:
            cols = self._columns(esc.fields)
            if cols is None:
                self.reject("unknown_features", m.topic, m.payload, f"fields {list(esc.fields)}")
                continue
            answerable.append((edge, esc, esc.features.astype(np.float64)[cols]))
        if not answerable:
            return
        probs = self.model.run(np.stack([x for _, _, x in answerable]))
        classes = self.model.meta["class_names"]
        for (edge, esc, _), p in zip(answerable, probs, strict=True):
            k = int(np.argmax(p))
            reply = EscalationReply(esc.id, classes[k], float(p[k]), self.model.label)
            payload = encode_escalation_reply(self.cfg.id, reply, seq=self.next_seq(), ts=now)
            self.publish(self.topics.esc_reply(edge), payload, qos=1)
        self.counters["escalations.answered"] += len(answerable)

    def _columns(self, fields: tuple[str, ...]) -> np.ndarray | None:
        assert self.model is not None
        names = feature_names(fields)
        if not all(f in names for f in self.model.features):
            return None
        return np.array([names.index(f) for f in self.model.features])

    def _rollups(self, now: float) -> None:
        with transaction(self.db):
            rows = self.db.execute(
                "DELETE FROM rollup_acc"
                " RETURNING edge, since, readings, summaries, events, dropped, devices"
            ).fetchall()
            records = [
                (
                    "rollup",
                    rollup_body(
                        self.cfg.id,
                        edge,
                        since,
                        now,
                        {
                            "readings": readings,
                            "summaries": summaries,
                            "events": events,
                            "dropped": dropped,
                            "devices": len(json.loads(devices)),
                        },
                    ),
                )
                for edge, since, readings, summaries, events, dropped, devices in rows
            ]
            self.outbox.put(records, now)

    def on_tick(self, now: float) -> None:
        if now >= self._next_rollup:
            self._rollups(now)
            self._next_rollup = now + self.cfg.rollup_interval
        for reason, n in self.outbox.enforce_bounds(now).items():
            self.counters[f"evicted.{reason}"] += n
        if self.connected.is_set():
            batches = self.uplink.batches_sent
            sent = self.uplink.pump(now)
            self.observe_custody(self.uplink.batches_sent - batches, sent)

    def on_stopping(self) -> None:
        self._rollups(time.time())

    def drained(self) -> bool:
        return self.outbox.records == 0

    def metrics(self) -> dict[str, Any]:
        return {
            "outbox_records": self.outbox.records,
            "outbox_bytes": self.outbox.held_bytes,
            "outbox_age": self.outbox.oldest_age(time.time()),
            "acked": self.uplink.acked,
        }

    def on_stopped(self) -> None:
        self.db.close()
