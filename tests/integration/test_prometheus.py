"""Every process serves Prometheus `/metrics` with its counters, gauges and histograms."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fogline.broker import find_free_port
from tests.integration.conftest import Processes, wait_for

pytestmark = pytest.mark.timeout(90)


@dataclass
class Scrape:
    """One `/metrics` page: sample name -> [(labels, value)]."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            v
            for got, v in self.samples.get(name, [])
            if all(got.get(k) == want for k, want in labels.items())
        )


def scrape(port: int) -> Scrape | None:
    """Fetch and parse `/metrics`; None while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name].append((dict(s.labels), float(s.value)))
    return Scrape(dict(samples))


def scrape_until(port: int, *checks: str, timeout: float = 25.0) -> Scrape:
    """Scrape until every check holds: `name` or `name{label=value,...}` has a value > 0."""
    wanted = []
    for check in checks:
        name, _, rest = check.partition("{")
        labels = dict(kv.split("=") for kv in rest.rstrip("}").split(",") if kv)
        wanted.append((name, labels))

    def good() -> Scrape | None:
        got = scrape(port)
        ok = got is not None and all(got.value(n, **labels) > 0 for n, labels in wanted)
        return got if ok else None

    result: Scrape = wait_for(good, timeout, f"{list(checks)} > 0 on :{port}/metrics")
    return result


def test_processes_expose_their_metrics_to_prometheus(processes: Processes) -> None:
    ports = {name: find_free_port() for name in ("cloud", "fog", "edge", "sim")}

    def metrics(name: str) -> list[str]:
        return ["--metrics-port", str(ports[name])]

    processes.start("cloud_sink", *metrics("cloud"))
    processes.start(
        "edge_agent", "--detector", "zscore", "--summary-interval", "1", *metrics("edge")
    )
    processes.start("device_sim", "--devices", "5", "--duration", "4", *metrics("sim"))
    # The simulator stops after 4 s: scrape it first.
    scrape_until(
        ports["sim"],
        "fogline_info{role=device-sim,id=s0}",
        "fogline_readings_total",
        "fogline_bytes_out_total",
    )

    # No fog yet: the edge's records wait in its outbox.
    edge = scrape_until(
        ports["edge"],
        "fogline_readings_in_total{role=edge,id=e0}",
        "fogline_messages_in_total",
        "fogline_records_total{kind=summary}",
        "fogline_outbox_records",
        "fogline_outbox_bytes",
        "fogline_outbox_age",
        "fogline_devices",
        "fogline_stage_seconds_count{stage=handle}",
        "fogline_stage_seconds_bucket{stage=handle,le=+Inf}",
        "fogline_inbound_batch_messages_count",
        "fogline_custody_batch_records_count",
        "fogline_custody_batch_records_sum",
    )
    assert edge.value("fogline_info", role="edge", id="e0", version="0.1.0") == 1
    assert edge.value("fogline_uptime_seconds", role="edge", id="e0") > 0

    # The fog comes up: the edge re-sends, the cloud stores, the edge's outbox drains.
    processes.start("fog_aggregator", *metrics("fog"))
    scrape_until(
        ports["cloud"],
        "fogline_stored_total{role=cloud,id=c0,kind=summary}",
        "fogline_stored_records",
        "fogline_stage_seconds_count{stage=handle}",
        "fogline_inbound_batch_messages_count",
    )
    scrape_until(
        ports["fog"],
        "fogline_records_forwarded_total{role=fog,id=f0}",
        "fogline_readings_total",
        "fogline_acked",
        "fogline_stage_seconds_count{stage=handle}",
        "fogline_custody_batch_records_count",
    )
    wait_for(
        lambda: (s := scrape(ports["edge"])) and s.value("fogline_outbox_records") == 0,
        25,
        "the edge's outbox to drain",
    )
