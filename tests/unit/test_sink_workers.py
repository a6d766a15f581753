"""Cloud-sink workers: their settings, names, subscriptions and who takes which fog's batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sink.sink import CloudSink, SinkConfig, worker_of
from fogline.codec import Batch, Record, decode, encode_batch
from fogline.config import build
from fogline.errors import ConfigError
from fogline.service import Inbound

SUMMARY = {
    "edge": "e0", "device": "d0", "first": 0, "last": 9, "count": 10, "t0": 1.0, "t1": 2.0,
    "fields": ["a"], "min": [0.0], "mean": [0.0], "max": [0.0], "std": [0.0], "events": 0,
}  # fmt: skip


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"workers": 2, "worker": 2}, "worker"),
        ({"worker": 1}, "worker"),
        ({"workers": 0}, "workers"),
        ({"store": "mysql://db/fogline"}, "store"),
        ({"store": "/var/lib/cloud.db"}, "store"),
        ({"split": "random"}, "split"),
        ({"id": "c" * 63, "workers": 2, "worker": 1}, "id"),
    ],
)
def test_bad_worker_settings_name_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(SinkConfig, values)
    assert err.value.key == key


def test_worker_zero_is_the_cloud_id_and_the_others_have_their_own() -> None:
    ids = [build(SinkConfig, {"workers": 3, "worker": k}).process_id() for k in range(3)]
    assert ids == ["c0", "c0-w1", "c0-w2"]
    assert build(SinkConfig, {"store": "postgresql://u@h/db"}).store == "postgresql://u@h/db"


def test_the_fog_hash_is_stable_and_spreads_fog_ids() -> None:
    assert [worker_of(f"f{i}", 2) for i in range(10)] == [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    counts = [0, 0, 0]
    for i in range(300):
        counts[worker_of(f"fog-{i}", 3)] += 1
    assert min(counts) > 70


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[Callable[..., CloudSink]]:
    made: list[CloudSink] = []

    def make(**values: Any) -> CloudSink:
        sink = CloudSink(build(SinkConfig, {"data_dir": tmp_path, **values}))
        sink.on_start()
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.on_stopped()


def test_subscriptions_by_mode(sinks: Callable[..., CloudSink]) -> None:
    one = sinks()
    assert one.subscriptions() == ["fl/v1/fog/+/up"]
    assert one.client_id == "fogline-cloud-c0"
    shared = sinks(workers=2, worker=1)
    assert shared.subscriptions() == ["$share/fogline-cloud-c0/fl/v1/fog/+/up"]
    assert shared.client_id == "fogline-cloud-c0-w1"
    assert shared.topics.status("cloud", shared.ident) == "fl/v1/status/cloud/c0-w1"
    by_fog = sinks(workers=2, worker=1, split="by-fog", fogs=["f0", "f1", "f8"])
    assert by_fog.subscriptions() == ["fl/v1/fog/f1/up", "fl/v1/fog/f8/up"]
    assert sinks(workers=2, split="by-fog").subscriptions() == ["fl/v1/fog/+/up"]


def test_split_by_fog_stores_and_acks_only_its_own_fogs(
    sinks: Callable[..., CloudSink],
) -> None:
    sink = sinks(workers=2, worker=1, split="by-fog")
    sent: list[tuple[str, bytes]] = []
    sink.publish = lambda topic, payload, **_: sent.append((topic, payload))  # type: ignore[method-assign]
    batch = Batch(low=0, records=(Record(0, "summary", SUMMARY),))
    msgs = [
        Inbound(sink.topics.up("fog", fog), encode_batch(fog, batch, seq=1, ts=1.0), i, 1)
        for i, fog in enumerate(("f0", "f1"))
    ]
    sink.handle(msgs)
    assert sink.counters["batches_for_other_workers"] == 1
    assert sink.counters["stored.summary"] == 1
    assert [t for t, _ in sent] == ["fl/v1/fog/f1/ack"]
    ack = decode(sent[0][1], expect="ack")
    assert (ack.src, ack.body.stream, ack.body.hwm) == ("c0-w1", "f1", 0)
