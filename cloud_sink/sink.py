"""The cloud sink process: custody receiver for fogs, storing into the cloud store."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from cloud_sink.store import STORE_FILE, Store
from fogline.codec import Batch, decode, encode_ack
from fogline.config import ServiceConfig, setting
from fogline.errors import DecodeError
from fogline.logs import log_records
from fogline.service import Inbound, Service
from fogline.topics import check_id

log = logging.getLogger(__name__)


@dataclass
class SinkConfig(ServiceConfig):
    """Settings of a cloud sink."""

    id: str = setting("c0", "Identifier of this cloud sink (a topic segment).")
    fogs: list[str] = setting(
        ["+"], "Fogs whose records this sink takes (ids, or + for every fog on the broker)."
    )

    def validate(self) -> None:
        super().validate()
        for fog in self.fogs:
            if fog != "+":
                check_id(fog, "fogs")


class CloudSink(Service):
    """Stores fog batches exactly once and acks them after the commit."""

    role = "cloud"

    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config)
        self.cfg = config

    def on_start(self) -> None:
        self.store = Store(self.cfg.data_dir / f"cloud-{self.cfg.id}" / STORE_FILE)

    def subscriptions(self) -> list[str]:
        return [self.topics.up("fog", f) for f in self.cfg.fogs]

    def accepts(self, topic: str) -> bool:
        return not self.stopping

    def handle(self, messages: list[Inbound]) -> None:
        batches: list[tuple[str, Batch]] = []
        for m in messages:
            try:
                fog = self.topics.parse_sender(m.topic, "fog")
                env = decode(m.payload, expect="batch")
                if env.src != fog:
                    raise DecodeError("forged_source", f"batch from {env.src!r} on {fog!r}'s topic")
                batches.append((fog, env.body))
            except DecodeError as exc:
                self.reject(exc.reason, m.topic, m.payload, exc.detail)
        if not batches:
            return
        counts = self.store.apply(batches)
        if log.isEnabledFor(logging.DEBUG):
            # Redelivered records are in the batches too: they were committed the first time.
            log_records(log, "committed", ((r.kind, r.body) for _, b in batches for r in b.records))
        for kind, n in counts.items():
            self.counters[f"stored.{kind}"] += n
        now = time.time()
        for fog in {f for f, _ in batches}:
            payload = encode_ack(
                self.cfg.id, self.store.inbox.ack(fog), seq=self.next_seq(), ts=now
            )
            self.publish(self.topics.ack("fog", fog), payload, qos=1)

    def metrics(self) -> dict[str, Any]:
        return {"stored_records": sum(v for k, v in self.store.stats.items() if k != "readings")}

    def on_stopped(self) -> None:
        self.store.close()
