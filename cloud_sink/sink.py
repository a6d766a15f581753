"""The cloud sink process: custody receiver for fogs, storing into the cloud store.

Several sink processes (workers) may share the fogs' streams and one store: with an MQTT shared
subscription the broker hands each batch to one of them, or, on brokers without shared
subscriptions, each worker takes the fogs whose id hashes to its number. Either way a stream's
batches may reach different workers in any order; the store admits them through one inbox per
stream, read and written in the transaction that stores the rows (see `cloud_sink.store`), and
every ack is the stream's committed state read after the commit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any

from cloud_sink.store import STORE_FILE, CloudStore, open_store
from fogline.cloudstores import is_url
from fogline.codec import Batch, decode, encode_ack
from fogline.config import ServiceConfig, setting
from fogline.errors import ConfigError, DecodeError
from fogline.latency import Latency
from fogline.logs import log_records
from fogline.service import Inbound, Service
from fogline.topics import check_id

log = logging.getLogger(__name__)


def worker_of(fog: str, workers: int) -> int:
    """The worker that takes `fog` when workers split by fog: a hash that every process and
    every Python run agrees on (not CRC-32, whose low bits barely differ for `f0`, `f1`...)."""
    digest = hashlib.blake2b(fog.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % workers


@dataclass
class SinkConfig(ServiceConfig):
    """Settings of a cloud sink."""

    id: str = setting("c0", "Identifier of this cloud sink (a topic segment).")
    fogs: list[str] = setting(
        ["+"], "Fogs whose records this sink takes (ids, or + for every fog on the broker)."
    )
    store: str = setting(
        "",
        "Where records are stored: '' = SQLite in the data dir (cloud-<id>/cloud.db); "
        "postgresql://... = PostgreSQL.",
    )
    workers: int = setting(
        1, "Sink processes of this id sharing the fogs' records and the store.", minimum=1,
        maximum=64,
    )  # fmt: skip
    worker: int = setting(
        0, "This process's number among the workers (0 publishes the status fogs watch).",
        minimum=0,
    )  # fmt: skip
    split: str = setting(
        "shared",
        "How workers share the records: an MQTT shared subscription, or by a hash of the fog id.",
        choices=("shared", "by-fog"),
    )

    def validate(self) -> None:
        super().validate()
        for fog in self.fogs:
            if fog != "+":
                check_id(fog, "fogs")
        if self.store and not is_url(self.store):
            raise ConfigError(
                "store", f"{self.store!r} is neither '' (SQLite) nor a postgresql:// URL"
            )
        if self.worker >= self.workers:
            raise ConfigError("worker", f"{self.worker} is not below workers ({self.workers})")
        check_id(self.process_id(), "id")

    def process_id(self) -> str:
        """Worker 0 is `id` (the status the fogs watch); worker k > 0 is `<id>-w<k>`."""
        return self.id if self.worker == 0 else f"{self.id}-w{self.worker}"


class CloudSink(Service):
    """Stores fog batches exactly once and acks them after the commit."""

    role = "cloud"

    def __init__(self, config: SinkConfig) -> None:
        if is_url(config.store) and importlib.util.find_spec("psycopg") is None:
            raise ConfigError("store", "PostgreSQL needs psycopg: pip install 'fogline[postgres]'")
        super().__init__(config)
        self.cfg = config
        #: Device publish of an event's window -> its commit here.
        self.latency = Latency()

    def on_start(self) -> None:
        where = self.cfg.store or self.cfg.data_dir / f"cloud-{self.cfg.id}" / STORE_FILE
        self.store: CloudStore = open_store(where)
        log.info(
            "storing into %s (worker %d of %d, split %s)",
            self.store.location, self.cfg.worker, self.cfg.workers, self.cfg.split,
        )  # fmt: skip

    def _by_fog(self) -> bool:
        return self.cfg.workers > 1 and self.cfg.split == "by-fog"

    def _mine(self, fog: str) -> bool:
        """Whether this worker takes `fog`'s batches."""
        return not self._by_fog() or worker_of(fog, self.cfg.workers) == self.cfg.worker

    def subscriptions(self) -> list[str]:
        fogs = [f for f in self.cfg.fogs if f == "+" or self._mine(f)]
        if self.cfg.workers > 1 and self.cfg.split == "shared":
            group = f"fogline-cloud-{self.cfg.id}"
            return [self.topics.shared_up(group, f) for f in fogs]
        return [self.topics.up("fog", f) for f in fogs]

    def accepts(self, topic: str) -> bool:
        return not self.stopping

    def handle(self, messages: list[Inbound]) -> None:
        batches: list[tuple[str, Batch]] = []
        for m in messages:
            try:
                fog = self.topics.parse_sender(m.topic, "fog")
                if not self._mine(fog):
                    # Split by fog under a `+` subscription: another worker stores and acks it.
                    self.counters["batches_for_other_workers"] += 1
                    continue
                env = decode(m.payload, expect="batch")
                if env.src != fog:
                    raise DecodeError("forged_source", f"batch from {env.src!r} on {fog!r}'s topic")
                batches.append((fog, env.body))
            except DecodeError as exc:
                self.reject(exc.reason, m.topic, m.payload, exc.detail)
        if not batches:
            return
        counts = self.store.apply(batches)
        committed = time.time()
        for sent in self.store.published:
            self.latency.record(committed - sent)
        self.counters["batches"] += len(batches)
        if log.isEnabledFor(logging.DEBUG):
            # Redelivered records are in the batches too: they were committed the first time.
            log_records(log, "committed", ((r.kind, r.body) for _, b in batches for r in b.records))
        for kind, n in counts.items():
            self.counters[f"stored.{kind}"] += n
        now = time.time()
        for fog in {f for f, _ in batches}:
            # Read after the commit: the stream's whole committed state, other workers' included.
            payload = encode_ack(self.ident, self.store.inbox.ack(fog), seq=self.next_seq(), ts=now)
            self.publish(self.topics.ack("fog", fog), payload, qos=1)

    def metrics(self) -> dict[str, Any]:
        return {
            "stored_records": sum(v for k, v in self.store.stats.items() if k != "readings"),
            **self.latency.gauges("commit"),
        }

    def on_stopped(self) -> None:
        store: CloudStore | None = getattr(self, "store", None)  # None if it never opened
        if store is not None:
            store.close()
