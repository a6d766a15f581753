"""Splitting a fleet over sites, what a site's bridge carries, and the flags `--topology sites`
refuses (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline import cli, up
from fogline.fleet import Site, edge_of, split_sites
from fogline.sites import bridge_topics, site_broker
from fogline.topics import Topics


def test_edges_split_in_blocks_and_devices_follow_their_edges() -> None:
    sites = split_sites(devices=40, edges=5, sites=2)
    assert [s.edge_ids for s in sites] == [["e0", "e1", "e2"], ["e3", "e4"]]
    assert [(s.first_device, s.devices) for s in sites] == [(0, 24), (24, 16)]
    assert [(s.fog, s.sim, s.name) for s in sites] == [("f0", "s0", "site0"), ("f1", "s1", "site1")]
    # Every device in exactly one site, and served by one of that site's edges.
    for s in sites:
        for i in range(s.first_device, s.first_device + s.devices):
            assert edge_of(i, s.edges, s.first_edge) in s.edge_ids


@pytest.mark.parametrize(("devices", "edges", "sites"), [(10, 1, 2), (1, 4, 2), (10, 4, 0)])
def test_a_site_without_an_edge_or_a_device_is_refused(
    devices: int, edges: int, sites: int
) -> None:
    with pytest.raises(ValueError):
        split_sites(devices, edges, sites)


def test_the_bridge_carries_only_what_crosses() -> None:
    site = Site(index=1, first_edge=2, edges=2, first_device=20, devices=20)
    lines = {t.line() for t in bridge_topics(Topics(), site)}
    assert lines == {
        "topic fl/v1/fog/f1/up out 1",
        "topic fl/v1/fog/f1/ack in 1",
        "topic fl/v1/status/cloud/# in 1",
        "topic fl/v1/status/fog/f1 out 1",
        "topic fl/v1/status/edge/e2 out 1",
        "topic fl/v1/status/edge/e3 out 1",
        "topic fl/v1/status/device-sim/s1 out 1",
        "topic fl/v1/metrics/fog/f1 out 0",
        "topic fl/v1/metrics/edge/e2 out 0",
        "topic fl/v1/metrics/edge/e3 out 0",
        "topic fl/v1/metrics/device-sim/s1 out 0",
    }


def test_the_site_template_renders_the_bridge(tmp_path: Path) -> None:
    site = split_sites(devices=4, edges=2, sites=2)[0]
    broker = site_broker(
        data_dir=tmp_path, site=site, cloud_host="127.0.0.1", cloud_port=18830, topics=Topics()
    )
    conf = broker.render().read_text()
    assert broker.data_dir == tmp_path / "broker-site0"
    assert "connection site0-cloud\naddress 127.0.0.1:18830\n" in conf
    assert "cleansession true" in conf
    assert "topic fl/v1/fog/f0/up out 1\n" in conf
    assert "${" not in conf


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--topology", "sites", "--secure"], "does not support --secure"),
        (["--topology", "sites", "--broker", "nats"], "use --broker mosquitto"),
        (["--topology", "sites", "--broker-port", "1883"], "drop --broker-port"),
        (["--sites", "3"], "--sites needs --topology sites"),
        (["--topology", "sites", "--sites", "3", "--edges", "2"], "give each site an edge"),
    ],
)
def test_up_refuses_what_sites_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: str
) -> None:
    args = cli.parser().parse_args(["up", "--data-dir", str(tmp_path / "data"), *flags])
    assert up.run(args) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
