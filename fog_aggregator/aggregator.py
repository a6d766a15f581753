"""The fog aggregator process: custody receiver for edges, custody sender to the cloud."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fog_aggregator.core import rollup_body, split, tally
from fog_aggregator.retrain import RETRAINED, Decision, retrain, samples_for
from fog_aggregator.rollout import MIGRATIONS as ROLLOUT_MIGRATIONS
from fog_aggregator.rollout import RolloutPolicy, Rollouts, read_incoming
from fogline.codec import (
    Escalation,
    EscalationReply,
    ModelAck,
    Record,
    decode,
    encode_ack,
    encode_escalation_reply,
)
from fogline.config import setting
from fogline.custody import Inbox, Outbox, SenderConfig, Uplink
from fogline.db import connect, migrate, transaction
from fogline.errors import ConfigError, DecodeError, FoglineError
from fogline.features import feature_names
from fogline.logs import log_records
from fogline.models.catalog import default_model_path
from fogline.models.loaded import LoadedModel, load_model
from fogline.models.push import EDGE_MODELS, incoming_dir
from fogline.models.reader import read_model
from fogline.service import Inbound, Service
from fogline.signing import load_signer
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
    # The fields of a sample (its features are `feature_names(fields)`), and where it came from.
    """
    ALTER TABLE training ADD COLUMN fields TEXT;
    ALTER TABLE training ADD COLUMN origin TEXT NOT NULL DEFAULT 'sample'
    """,
    *ROLLOUT_MIGRATIONS,
    """
    CREATE TABLE retrain_runs (
        at REAL NOT NULL, name TEXT NOT NULL, trigger TEXT NOT NULL, publish INTEGER NOT NULL,
        version INTEGER, reason TEXT NOT NULL, summary TEXT NOT NULL
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
    site: str = setting("site0", "Site this fog serves (must be in its signing delegation).")
    signing_dir: str = setting(
        "", "Key folder with this fog's delegated signing key ('' = no model updates)."
    )
    signer: str = setting(
        "",
        "Name of the signing key in signing_dir ('' = this fog's id, as keys delegate names it).",
    )
    edge_models_dir: str = setting(
        "", "Folder of the models the edges start with ('' = built-in), the first rollback target."
    )
    canary_share: float = setting(
        0.25, "Share of the edges that get a new model first.", minimum=0.0, maximum=1.0
    )
    canary_period: float = setting(
        60.0, "Seconds the canaries are watched before a model is promoted or rolled back.",
        minimum=0.0,
    )  # fmt: skip
    canary_tolerance: float = setting(
        2.0, "How many times the other edges' warning/escalation rate the canaries may reach.",
        minimum=1.0,
    )  # fmt: skip
    retrain_interval: float = setting(
        0.0, "Seconds between regional retraining runs of the edge models (0 = never).",
        minimum=0.0,
    )  # fmt: skip
    retrain_min_samples: int = setting(
        200, "New regional samples needed before a retraining run.", minimum=10
    )
    retrain_drift: float = setting(
        0.0, "Retrain early when the escalation rate rises this many times above its"
        " rate before (0 = only on schedule).", minimum=0.0,
    )  # fmt: skip
    retrain_flavour: str = setting(
        "float32", "Number format of retrained models.", choices=("float32", "float16", "int8")
    )
    label_confidence: float = setting(
        0.85, "Confidence of the fog's verdict needed to keep an escalated window as a"
        " training sample.", minimum=0.0, maximum=1.0,
    )  # fmt: skip
    retrain_models: list[str] = setting(
        ["classifier"], "Edge models the fog retrains (classifier, anomaly)."
    )
    model_chunk_bytes: int = setting(
        64 * 1024, "Bytes per model chunk message (below the broker's message limit).",
        minimum=1024, maximum=4 * 1024 * 1024,
    )  # fmt: skip

    def validate(self) -> None:
        super().validate()
        check_id(self.cloud_id, "cloud_id")
        check_id(self.site, "site")
        unknown = set(self.retrain_models) - set(RETRAINED)
        if unknown:
            raise ConfigError(
                "retrain_models", f"{sorted(unknown)}: the fog retrains {', '.join(RETRAINED)}"
            )
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
        self.rollouts = self._rollouts()
        self.incoming = incoming_dir(self.cfg.data_dir, self.cfg.id)
        self._next_incoming = 0.0
        self._retraining = False
        self._last_retrain = time.time()
        self._samples_seen = self._sample_count()
        self._drift_base: tuple[int, int] | None = None  # (escalations, readings) before the run

    def _sample_count(self) -> int:
        return int(self.db.execute("SELECT coalesce(max(rowid), 0) FROM training").fetchone()[0])

    def _retrain_trigger(self, now: float) -> str:
        """Why a retraining run is due now ('' when it is not)."""
        cfg = self.cfg
        if (
            self.rollouts is None
            or self._retraining
            or not (cfg.retrain_interval or cfg.retrain_drift)
        ):
            return ""
        new = self._sample_count() - self._samples_seen
        if new < cfg.retrain_min_samples:
            return ""
        states = self.rollouts.state()
        if any(states.get(name, {}).get("state") == "canary" for name in cfg.retrain_models):
            return ""
        if cfg.retrain_interval and now - self._last_retrain >= cfg.retrain_interval:
            return f"schedule ({new} new samples)"
        esc, readings = self.counters["escalations.answered"], self.counters["readings"]
        if self._drift_base is None:
            self._drift_base = (esc, readings)
            return ""
        base_esc, base_readings = self._drift_base
        before = (base_esc + 1) / max(base_readings, 1)
        since = (esc - base_esc) / max(readings - base_readings, 1)
        if (
            cfg.retrain_drift
            and readings - base_readings > 1000
            and since > cfg.retrain_drift * before
        ):
            return (
                f"drift: escalations {since * 1000:.1f}/1000 readings, {before * 1000:.1f} before"
            )
        return ""

    def _start_retrain(self, trigger: str) -> None:
        """Train candidates off the worker thread; decide on them back on the worker thread."""
        assert self.rollouts is not None
        rows = self.db.execute("SELECT features, fields, label, device FROM training").fetchall()
        stable: dict[str, bytes] = {}
        for name in {*self.cfg.retrain_models, "classifier"}:
            known = self.rollouts.stable(name)
            assert known is not None  # every edge model has its baseline registered
            stable[name] = known[1]
        # Labels are the classifier's classes (0 = normal), for the autoencoder too.
        classes = list(read_model(stable["classifier"]).metadata_json("fogline")["class_names"])
        stable = {name: stable[name] for name in self.cfg.retrain_models}
        jobs = []
        for name, current in stable.items():
            features = tuple(read_model(current).metadata_json("fogline")["feature_names"])
            x, y, devices = samples_for(rows, features, classes)
            jobs.append((name, current, x, y, devices, self.rollouts.latest_version(name) + 1))
        self._retraining = True
        self._samples_seen = self._sample_count()
        flavour = self.cfg.retrain_flavour
        log.info(
            "retraining %s on %d regional samples (%s)",
            ", ".join(self.cfg.retrain_models),
            len(rows),
            trigger,
        )

        def job() -> None:
            done: list[tuple[str, int, Decision | None]] = []
            for name, current, x, y, devices, version in jobs:
                try:
                    d = retrain(current, x, y, groups=devices, version=version, flavour=flavour)
                except (FoglineError, ValueError, ArithmeticError) as exc:
                    log.error("retraining %s failed: %s", name, exc)
                    d = None
                done.append((name, version, d))
            self.call_soon(lambda: self._retrained(done, trigger))

        threading.Thread(target=job, name="fog-retrain", daemon=True).start()

    def _retrained(self, done: list[tuple[str, int, Decision | None]], trigger: str) -> None:
        """Record the retraining runs and roll out the candidates that passed the gate."""
        self._retraining = False
        self._last_retrain = time.time()
        self._drift_base = None
        if self.rollouts is None:
            return
        for name, candidate, decision in done:
            if decision is None:
                continue
            version = None
            if decision.publish and decision.data is not None:
                version = self.propose_model(name, decision.data, origin=f"retrained: {trigger}")
            with transaction(self.db):
                self.db.execute(
                    "INSERT INTO retrain_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        time.time(), name, trigger, int(decision.publish), version,
                        decision.reason, json.dumps(decision.summary()),
                    ),
                )  # fmt: skip
            event = "retrained" if decision.publish else "not_published"
            self.rollouts.note(
                name, version or candidate, event,
                f"{trigger}; {decision.reason}; {decision.samples} samples, "
                f"{decision.seconds:.1f} s",
            )  # fmt: skip

    def _rollouts(self) -> Rollouts | None:
        if not self.cfg.signing_dir:
            return None
        try:
            signer = load_signer(Path(self.cfg.signing_dir), self.cfg.signer or self.cfg.id)
        except FoglineError as exc:
            raise ConfigError("signing_dir", str(exc)) from exc
        policy = RolloutPolicy(
            canary_share=self.cfg.canary_share,
            canary_period=self.cfg.canary_period,
            tolerance=self.cfg.canary_tolerance,
            chunk_size=self.cfg.model_chunk_bytes,
        )
        rollouts = Rollouts(
            self.db,
            fog=self.cfg.id,
            site=self.cfg.site,
            topics=self.topics,
            signer=signer,
            publish=lambda topic, payload: self.publish(topic, payload, qos=1, retain=True),
            record=self._model_record,
            next_seq=self.next_seq,
            policy=policy,
        )
        for name in EDGE_MODELS:
            base = (
                Path(self.cfg.edge_models_dir) / f"{name}.tflite"
                if self.cfg.edge_models_dir
                else default_model_path(name)
            )
            baseline = load_model(base)
            rollouts.register_baseline(name, baseline.version, base.read_bytes())
        log.info("signing model updates as %s for site %s", signer[1].fog, self.cfg.site)
        return rollouts

    def _model_record(self, body: dict[str, Any]) -> None:
        """Send a rollout event upstream (custody record `model`)."""
        with transaction(self.db):
            self.outbox.put([("model", body)], time.time())
        self.counters[f"models.{body['event']}"] += 1

    def propose_model(self, name: str, data: bytes, *, origin: str) -> int:
        """Start rolling `data` out as the next version of edge model `name`."""
        if self.rollouts is None:
            raise ConfigError("signing_dir", "this fog has no signing key: set signing_dir")
        if name not in EDGE_MODELS:
            raise ValueError(f"{name!r} is not an edge model ({', '.join(EDGE_MODELS)})")
        edges = self.rollouts.active_edges(time.time())
        version = self.rollouts.propose(name, data, edges, origin=origin)
        self.publish_status()
        return version

    def _take_incoming(self) -> None:
        """Roll out the model files an operator dropped into the fog's `incoming/` folder."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        waiting = sorted(self.incoming.glob("*.tflite"))
        if waiting and self.rollouts is not None and not self.rollouts.active_edges(time.time()):
            # A canary needs an edge that delivers: wait for one.
            self._ratelog.warning(
                "incoming", "%d model(s) waiting for an active edge to start a canary", len(waiting)
            )
            return
        for path in waiting:
            try:
                ((name, data, _),) = read_incoming(path.parent, path.name)
                version = self.propose_model(name, data, origin=f"pushed {path.name}")
                log.info("rolling out %s as %s v%d", path.name, name, version)
            except (FoglineError, ValueError, OSError) as exc:
                log.error("cannot roll out %s: %s", path, exc)
                self.counters["models.refused"] += 1
                path.rename(path.with_name(path.name + ".refused"))
                continue
            path.unlink()

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
        acks = [self.topics.model_ack(e) for e in self.cfg.edges] if self.rollouts else []
        return [*ups, *escs, *acks, self.ack_topic, self.cloud_status]

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
                elif m.topic.endswith("/model/ack"):
                    self._model_ack(m, now)
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

    def _model_ack(self, m: Inbound, now: float) -> None:
        edge = self.topics.parse_model_ack(m.topic)
        env = decode(m.payload, expect="model_ack")
        if env.src != edge:
            raise DecodeError("forged_source", f"model ack from {env.src!r} on {edge!r}'s topic")
        if self.rollouts is not None:
            assert isinstance(env.body, ModelAck)
            self.rollouts.on_ack(edge, env.body, now)
            self.publish_status()

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
                if self.rollouts is not None:
                    self.rollouts.observe(edge, readings=t.readings, events=t.events)
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
            fields = b.get("fields")
            row = (
                edge, b.get("device"), b.get("first"), b.get("last"), b.get("label"),
                b.get("features"), now,
            )  # fmt: skip
            valid = (
                isinstance(row[1], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in row[2:4])
                and isinstance(row[4], str)
                and isinstance(row[5], bytes)
                and isinstance(fields, list)
                and all(isinstance(f, str) for f in fields)
                and len(row[5]) == 16 * len(fields)
            )
            if not valid:
                detail = f"training sample {rec.seq} lacks device/first/last/label/features"
                self.reject("bad_training_sample", m.topic, m.payload, detail)
                continue
            rows.append((*row, json.dumps(fields)))  # fields: checked to be strings above
        self.db.executemany(
            "INSERT INTO training(edge, device, first, last, label, features, received, fields)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        verdicts = []
        for (edge, esc, _), p in zip(answerable, probs, strict=True):
            k = int(np.argmax(p))
            reply = EscalationReply(esc.id, classes[k], float(p[k]), self.model.label)
            payload = encode_escalation_reply(self.cfg.id, reply, seq=self.next_seq(), ts=now)
            self.publish(self.topics.esc_reply(edge), payload, qos=1)
            # A verdict the fog is sure of labels the window for regional retraining (an unsure
            # one would teach the edge's model to be sure of a guess).
            if p[k] >= self.cfg.label_confidence:
                verdicts.append(
                    (
                        edge, esc.device, esc.first, esc.last, classes[k],
                        np.ascontiguousarray(esc.features, dtype="<f4").tobytes(), now,
                        json.dumps(list(esc.fields)),
                    )
                )  # fmt: skip
            if self.rollouts is not None:
                self.rollouts.observe(edge, escalations=1)
        with transaction(self.db):
            self.db.executemany(
                "INSERT INTO training(edge, device, first, last, label, features, received,"
                " fields, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'escalation')",
                verdicts,
            )
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
        if self.rollouts is not None and not self.stopping:
            if now >= self._next_incoming:
                self._take_incoming()
                self._next_incoming = now + 1.0
            if self.rollouts.tick(now):
                self.publish_status()
            trigger = self._retrain_trigger(now)
            if trigger:
                self._start_retrain(trigger)
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

    def status_extra(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts.state()} if self.rollouts is not None else {}

    def metrics(self) -> dict[str, Any]:
        return {
            "outbox_records": self.outbox.records,
            "outbox_bytes": self.outbox.held_bytes,
            "outbox_age": self.outbox.oldest_age(time.time()),
            "acked": self.uplink.acked,
        }

    def on_stopped(self) -> None:
        self.db.close()
