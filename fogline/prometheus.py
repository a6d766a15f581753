"""Prometheus `/metrics` for one process: its MQTT metrics as counters and gauges, plus histograms.

The counters and gauges are the ones the periodic `metrics` message carries, taken from the same
snapshot (made on the worker thread each `metrics_interval`), so a scrape and the MQTT message
agree; the HTTP thread never touches the service's state. Each process has its own registry.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fogline import __version__

log = logging.getLogger(__name__)

PREFIX = "fogline"
#: Counter keys `<name>.<value>` whose suffix becomes a label rather than part of the name.
LABELLED: dict[str, str] = {
    "rejected": "reason",
    "evicted": "reason",
    "records": "kind",
    "stored": "kind",
    "escalations": "outcome",
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(key: str) -> str:
    """`fogline_<key>` with every character Prometheus does not allow replaced by `_`."""
    return f"{PREFIX}_{_UNSAFE.sub('_', key)}"


class _Snapshot(Collector):
    """Renders the last metrics snapshot as Prometheus counter and gauge families."""

    def __init__(self, role: str, ident: str) -> None:
        self.role = role
        self.ident = ident
        # Replaced whole (never mutated) so a scrape on the HTTP thread reads a consistent one.
        self.data: tuple[dict[str, int], dict[str, Any], float] = ({}, {}, 0.0)

    def collect(self) -> Iterator[Metric]:
        counters, gauges, uptime = self.data
        base = [self.role, self.ident]
        info = GaugeMetricFamily(
            f"{PREFIX}_info", "The process: role, id and fogline version.",
            labels=["role", "id", "version"],
        )  # fmt: skip
        info.add_metric([*base, __version__], 1)
        yield info
        yield _gauge(f"{PREFIX}_uptime_seconds", "Seconds since the process started.", base, uptime)
        families: dict[str, CounterMetricFamily] = {}
        for key, value in sorted(counters.items()):
            head, _, tail = key.partition(".")
            label = LABELLED.get(head) if tail else None
            name = metric_name(head if label else key)
            fam = families.get(name)
            if fam is None:
                doc = f"Counter {head}.<{label}> of the metrics message." if label else None
                fam = families[name] = CounterMetricFamily(
                    name,
                    doc or f"Counter {key} of the metrics message.",
                    labels=["role", "id", label] if label else ["role", "id"],
                )
            fam.add_metric([*base, tail] if label else base, value)
        yield from families.values()
        for key, value in sorted(gauges.items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = metric_name(key)
            if name in families:  # never two families with one name
                name += "_gauge"
            yield _gauge(name, f"Gauge {key} of the metrics message.", base, value)


def _gauge(name: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=["role", "id"])
    fam.add_metric(labels, value)
    return fam


class Exporter:
    """One process's Prometheus registry and its HTTP endpoint."""

    def __init__(self, role: str, ident: str) -> None:
        self.role = role
        self.ident = ident
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = _Snapshot(role, ident)
        self.registry.register(self._snapshot)
        self._stage = Histogram(
            f"{PREFIX}_stage_seconds",
            "Seconds one stage took: handle = one batch of inbound messages, "
            "score = one model scoring batch (edge).",
            ["role", "id", "stage"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self._inbound = Histogram(
            f"{PREFIX}_inbound_batch_messages",
            "Inbound messages handled in one worker step.",
            ["role", "id"],
            registry=self.registry,
            buckets=SIZE_BUCKETS,
        ).labels(role, ident)
        self._custody = Histogram(
            f"{PREFIX}_custody_batch_records",
            "Records per published custody batch (the mean when one pump sends several).",
            ["role", "id"],
            registry=self.registry,
            buckets=SIZE_BUCKETS,
        ).labels(role, ident)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def update(self, counters: Mapping[str, int], gauges: Mapping[str, Any], uptime: float) -> None:
        """Take a new snapshot of the counters and gauges (call on the worker thread)."""
        self._snapshot.data = (dict(counters), dict(gauges), uptime)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record how long one run of `stage` took."""
        self._stage.labels(self.role, self.ident, stage).observe(seconds)

    def observe_inbound(self, messages: int) -> None:
        """Record the size of one batch of inbound messages."""
        self._inbound.observe(messages)

    def observe_custody(self, batches: int, records: int) -> None:
        """Record published custody batches (`records` in all over `batches`)."""
        for _ in range(batches):
            self._custody.observe(records / batches)

    def start(self, host: str, port: int) -> None:
        """Serve `/metrics` on `host:port` in a daemon thread (OSError when the port is taken)."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._server = self._thread = None
