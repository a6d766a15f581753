"""The edge agent process: MQTT shell around `EdgeCore`, with an outbox to the fog."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.core import EdgeCore, Record, Rules
from edge_agent.decisions import EscalationRules, ModelDecisions
from edge_agent.models import ModelDetector
from edge_agent.ota import MIGRATIONS as OTA_MIGRATIONS
from edge_agent.ota import Installer
from fogline import aead
from fogline.codec import (
    Envelope,
    Escalation,
    ModelAck,
    ModelChunk,
    Telemetry,
    decode,
    encode_escalation,
    encode_model_ack,
)
from fogline.config import setting
from fogline.custody import Outbox, SenderConfig, Uplink
from fogline.db import connect, migrate, transaction
from fogline.errors import ConfigError, DecodeError, FoglineError
from fogline.logs import log_records
from fogline.models.catalog import default_model_path
from fogline.models.loaded import LoadedModel, load_model
from fogline.models.push import EDGE_MODELS
from fogline.service import Inbound, Service
from fogline.signing import SignatureRejected, SignedManifest, load_root_public
from fogline.topics import check_id

log = logging.getLogger(__name__)


_MIGRATIONS = [
    "CREATE TABLE devices (device TEXT PRIMARY KEY, expected INTEGER NOT NULL)",
    *OTA_MIGRATIONS,
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
    detector: str = setting(
        "models", "How windows are judged: TFLite models, or the z-score rule.",
        choices=("models", "zscore"),
    )  # fmt: skip
    models_dir: str = setting(
        "", "Folder with anomaly.tflite, classifier.tflite, failure.tflite ('' = built-in)."
    )
    confidence_threshold: float = setting(
        0.85, "Classifier confidence below which a suspect window is escalated to the fog.",
        minimum=0.0, maximum=1.0,
    )  # fmt: skip
    anomaly_threshold: float = setting(
        0.0, "Anomaly score above which a window is a warning (0 = the model's own).", minimum=0.0
    )
    escalation_timeout: float = setting(
        2.0, "Seconds to wait for the fog's verdict before deciding alone.", minimum=0.01
    )
    escalation_rate: float = setting(
        20.0, "Escalations per second allowed on average (the fog's budget).", minimum=0.0
    )
    escalation_burst: float = setting(50.0, "Escalations allowed at once.", minimum=1.0)
    train_share: float = setting(
        0.01, "Share of normal windows sent to the fog as training samples.",
        minimum=0.0, maximum=1.0,
    )  # fmt: skip

    anomaly_persistence: int = setting(
        2, "Consecutive anomalous windows before an anomaly score alone raises a warning.",
        minimum=1,
    )  # fmt: skip
    event_holdoff: float = setting(
        10.0, "Seconds during which a device's repeated warning is counted, not sent again.",
        minimum=0.0,
    )  # fmt: skip

    aead_keys: str = setting(
        "", "Folder of device keys that open sealed telemetry ('' = none: sealed is refused)."
    )
    require_encryption: bool = setting(
        False, "Refuse telemetry sent in clear (reason not_encrypted); needs aead_keys."
    )
    ota_root_key: str = setting(
        "", "Root public key (signing.pub) model updates must chain to ('' = no updates)."
    )
    ota_max_bytes: int = setting(
        16 * 1024 * 1024, "Largest model update accepted, in bytes.", minimum=1024
    )

    def validate(self) -> None:
        super().validate()
        check_id(self.fog_id, "fog_id")
        if self.require_encryption and not self.aead_keys:
            raise ConfigError("aead_keys", "require_encryption is set but aead_keys is empty")

    def model_path(self, role: str) -> Path:
        """Where the model for `role` (anomaly, classifier, failure) is read from."""
        if self.models_dir:
            return Path(self.models_dir) / f"{role}.tflite"
        return default_model_path(role)


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
        self.reply_topic = self.topics.esc_reply(config.id)
        self.model_topics = self.topics.model_sub(config.fog_id)[:-1]  # manifests and chunks
        self.decisions: ModelDecisions | None = None
        self.installer: Installer | None = None
        self.keystore: aead.KeyStore | None = None
        self._keys_checked = 0.0
        if config.aead_keys:
            try:
                self.keystore = aead.KeyStore(Path(config.aead_keys))
            except FoglineError as exc:
                raise ConfigError("aead_keys", str(exc)) from exc
            log.info(
                "opening sealed telemetry: %d device keys in %s",
                len(self.keystore.keys),
                config.aead_keys,
            )

    def on_start(self) -> None:
        self.db = connect(self.cfg.data_dir / f"edge-{self.cfg.id}" / "edge.db")
        migrate(self.db, "edge", _MIGRATIONS)
        expected = dict(self.db.execute("SELECT device, expected FROM devices").fetchall())
        if self.cfg.detector == "models":
            if self.cfg.ota_root_key:
                self.installer = self._installer()
            self.decisions = self._load_decisions()
        window = self.cfg.window
        if self.decisions is not None and self.decisions.detector.window is not None:
            window = self.decisions.detector.window
            if window != self.cfg.window:
                log.info("windows of %d readings, as the models were trained", window)
        rules = Rules(
            window=window,
            z_threshold=self.cfg.z_threshold,
            warmup_windows=self.cfg.warmup_windows,
            summary_interval=self.cfg.summary_interval,
        )
        latency = self.decisions.latency if self.decisions is not None else None
        self.core = EdgeCore(self.cfg.id, rules, expected, self.decisions, latency)
        self.outbox = Outbox(self.db, stream=self.cfg.id, limits=self.cfg.outbox_limits())
        self.uplink = Uplink(
            self.outbox,
            topic_up=self.topics.up("edge", self.cfg.id),
            publish=lambda topic, payload: self.publish(topic, payload, qos=1),
        )

    def _installer(self) -> Installer:
        try:
            root = load_root_public(Path(self.cfg.ota_root_key))
        except FoglineError as exc:
            raise ConfigError("ota_root_key", str(exc)) from exc
        return Installer(
            self.db,
            self.cfg.data_dir / f"edge-{self.cfg.id}" / "models",
            root,
            self.cfg.id,
            names=EDGE_MODELS,
            running=self._running_version,
            switch=self._switch,
            fetch=self._fetch_chunks,
            max_bytes=self.cfg.ota_max_bytes,
        )

    def _fetch_chunks(self, name: str, on: bool) -> None:
        """Subscribe to (or leave) the retained chunks of model `name`."""
        topic = self.topics.model_chunks_sub(self.cfg.fog_id, name)
        if on:
            self.client.subscribe(topic, qos=1)
        else:
            self.client.unsubscribe(topic)

    def _running_version(self, role: str) -> int:
        if self.decisions is None or role not in self.decisions.detector.models:
            return 0
        return self.decisions.detector.models[role].version

    def _load_decisions(self) -> ModelDecisions:
        models = {role: load_model(self.cfg.model_path(role)) for role in EDGE_MODELS}
        if self.installer is not None:
            for name, installed in self.installer.current().items():
                model = load_model(installed.path)
                models[name] = dataclasses.replace(model, version=installed.version)
        for m in models.values():
            log.info("model %s from %s", m.label, m.path)
        detector = ModelDetector(
            models,
            confidence_threshold=self.cfg.confidence_threshold,
            anomaly_threshold=self.cfg.anomaly_threshold or None,
        )
        rules = EscalationRules(
            timeout=self.cfg.escalation_timeout,
            rate=self.cfg.escalation_rate,
            burst=self.cfg.escalation_burst,
            train_share=self.cfg.train_share,
            holdoff=self.cfg.event_holdoff,
            persistence=self.cfg.anomaly_persistence,
        )
        return ModelDecisions(self.cfg.id, detector, rules)

    def _switch(self, role: str, model: LoadedModel) -> None:
        """Use `model` for `role` from the next batch on (called between two batches)."""
        assert self.decisions is not None
        self.decisions.detector.replace(role, model)
        log.info("now using %s for %s", model.label, role)
        self.publish_status()

    def status_extra(self) -> dict[str, Any]:
        if self.decisions is None:
            return {"detector": "zscore"}
        models = self.decisions.detector.models
        return {"detector": "models", "models": {role: m.label for role, m in models.items()}}

    def subscriptions(self) -> list[str]:
        return [
            self.topics.tele_sub(self.cfg.id),
            self.ack_topic,
            self.fog_status,
            self.reply_topic,
            *([self.topics.model_sub(self.cfg.fog_id)] if self.installer is not None else []),
        ]

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
            elif m.topic == self.reply_topic:
                records += self._reply(m)
            elif m.topic.startswith(self.model_topics):
                self._model_update(m, now)
            else:
                records += self._telemetry(m, now)
        records += self._decide(now)
        self._commit(records, now)

    def _model_update(self, m: Inbound, now: float) -> None:
        """A manifest or a chunk of a model update (an empty payload clears a retained one)."""
        if self.installer is None or not m.payload:
            return
        ack: ModelAck | None
        try:
            env = decode(m.payload)
            if isinstance(env.body, ModelChunk):
                ack = self.installer.on_chunk(env.body)
            elif env.kind == "manifest":
                ack = self.installer.on_manifest(SignedManifest.from_dict(env.body), now)
            else:
                raise DecodeError("unexpected_kind", f"{env.kind!r} on a model topic")
        except DecodeError as exc:
            self.reject(exc.reason, m.topic, m.payload, exc.detail)
            return
        except SignatureRejected as exc:
            self.reject(f"manifest_{exc.reason}", m.topic, m.payload, exc.detail)
            return
        if ack is not None:
            self.counters[f"models.{ack.status}"] += 1
            payload = encode_model_ack(self.cfg.id, ack, seq=self.next_seq(), ts=now)
            self.publish(self.topics.model_ack(self.cfg.id), payload, qos=1)

    def _reply(self, m: Inbound) -> list[Record]:
        if self.decisions is None:
            return []
        try:
            reply = decode(m.payload, expect="esc_reply").body
        except DecodeError as exc:
            self.reject(exc.reason, m.topic, m.payload, exc.detail)
            return []
        return self.decisions.on_reply(
            reply.id, reply.fault, reply.confidence, reply.model, time.time()
        )

    def _decide(self, now: float, *, final: bool = False) -> list[Record]:
        """Score the windows that became ready (one batch), ask the fog where unsure."""
        if self.decisions is None:
            return []
        scoring = bool(self.decisions.pending)
        started = time.perf_counter()
        records, requests = self.decisions.flush(now)
        if scoring:
            self.observe_stage("score", time.perf_counter() - started)
        for r in requests:
            esc = Escalation(r.id, r.device, r.first, r.last, r.fields, r.features)
            payload = encode_escalation(self.cfg.id, esc, seq=self.next_seq(), ts=now)
            self.publish(self.topics.esc(self.cfg.id), payload, qos=1)
        return records + self.decisions.expire(now, everything=final)

    def _telemetry(self, m: Inbound, now: float) -> list[Record]:
        try:
            _edge, device = self.topics.parse_tele(m.topic)
            env = decode(m.payload, expect="tele")
            tele = self._open(env, m.topic)
        except DecodeError as exc:
            self.reject(exc.reason, m.topic, m.payload, exc.detail)
            return []
        if tele.device != device:
            self.reject("forged_device", m.topic, m.payload, f"payload says {tele.device!r}")
            return []
        self.counters["readings_in"] += tele.count
        if self.core.is_replay(tele):
            detail = f"readings {tele.first}..{tele.last} were already taken"
            self.reject("replay", m.topic, m.payload, detail)
        records = self.core.ingest(tele, now, env.ts)
        if any(kind == "drop" and body["reason"] == "non_finite" for kind, body in records):
            # Accounted for by the drop record; also dead-lettered so the device can be fixed.
            self.reject("non_finite", m.topic, m.payload, "NaN or infinite sample values")
        return records

    def _open(self, env: Envelope, topic: str) -> Telemetry:
        """The telemetry of a message: opened if sealed, refused if clear but required sealed."""
        body = env.body
        if isinstance(body, Telemetry):
            if self.cfg.require_encryption:
                raise DecodeError("not_encrypted", "telemetry in clear; this edge requires AEAD")
            return body
        if self.keystore is None:
            raise DecodeError("unknown_key", f"sealed with {body.kid!r}; this edge has no keys")
        if body.kid not in self.keystore.keys and time.monotonic() - self._keys_checked > 1.0:
            # A key provisioned (rotated in) after start: look at the folder again, at most 1/s.
            self._keys_checked = time.monotonic()
            self.keystore.refresh()
        return aead.open_telemetry(self.keystore, env, topic=topic)

    def _commit(self, records: list[Record], now: float) -> None:
        """Write records and the devices' restart points in one transaction."""
        if not records:
            return
        with transaction(self.db):
            self.outbox.put(records, now)
            self.db.executemany(
                "INSERT INTO devices(device, expected) VALUES (?, ?)"
                " ON CONFLICT(device) DO UPDATE SET expected = excluded.expected",
                list(self.core.moved_restart_points().items()),
            )
        for kind, _ in records:
            self.counters[f"records.{kind}"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log_records(log, "put", records)

    def on_tick(self, now: float) -> None:
        if self.keystore is not None and time.monotonic() - self._keys_checked > 2.0:
            # Removed (retired) key files stop being accepted within seconds.
            self._keys_checked = time.monotonic()
            self.keystore.refresh()
        self._commit(self.core.due_summaries(now) + self._decide(now), now)
        for reason, n in self.outbox.enforce_bounds(now).items():
            self.counters[f"evicted.{reason}"] += n
        if self.connected.is_set():
            batches = self.uplink.batches_sent
            sent = self.uplink.pump(now)
            self.observe_custody(self.uplink.batches_sent - batches, sent)

    def on_stopping(self) -> None:
        # Windows still waiting for the fog are decided alone (unconfirmed) before summaries close.
        now = time.time()
        self._commit(self._decide(now, final=True) + self.core.due_summaries(now, force=True), now)

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
            **{
                f"decisions.{k}": v
                for k, v in (self.decisions.stats if self.decisions else {}).items()
            },
            **{f"ota.{k}": v for k, v in (self.installer.stats if self.installer else {}).items()},
            **self.core.latency.gauges("decision"),
        }

    def on_stopped(self) -> None:
        self.db.close()
