"""Sites bridged to a cloud broker: what crosses a site's bridge, and the site's Mosquitto."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fogline.broker import Broker
from fogline.fleet import Site
from fogline.topics import Topics

#: The `mosquitto/` template of a site broker (dev.conf.tmpl plus a bridge section).
SITE_TEMPLATE = "site"

Direction = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class BridgeTopic:
    """One `topic` line of a Mosquitto bridge: `out` goes site -> cloud, `in` cloud -> site."""

    topic: str
    direction: Direction
    qos: int

    def line(self) -> str:
        """The line as mosquitto.conf writes it."""
        return f"topic {self.topic} {self.direction} {self.qos}"


def bridge_topics(topics: Topics, site: Site) -> list[BridgeTopic]:
    """What the bridge of `site` carries, and nothing else: the fog's custody records up and the
    cloud's acks back (QoS 1), the retained status of the cloud's processes in (the fog holds or
    re-sends on its cloud sink's), and the status (QoS 1, retained) and metrics (QoS 0, as
    published) of the site's own processes out, for the progress line and `fogline status` on
    the cloud broker."""
    own = [("fog", site.fog), *[("edge", e) for e in site.edge_ids], ("device-sim", site.sim)]
    return [
        BridgeTopic(topics.up("fog", site.fog), "out", 1),
        BridgeTopic(topics.ack("fog", site.fog), "in", 1),
        BridgeTopic(topics.status("cloud", "#"), "in", 1),
        *[BridgeTopic(topics.status(role, ident), "out", 1) for role, ident in own],
        *[BridgeTopic(topics.metrics(role, ident), "out", 0) for role, ident in own],
    ]


def site_broker(
    *,
    data_dir: Path,
    site: Site,
    cloud_host: str,
    cloud_port: int,
    topics: Topics,
    port: int | None = None,
) -> Broker:
    """The Mosquitto of `site` in `data_dir/broker-<site>` (not started), bridged to the cloud
    broker at `cloud_host:cloud_port`; on a free port unless `port` is given."""
    lines = [t.line() for t in bridge_topics(topics, site)]
    return Broker(
        data_dir=data_dir / f"broker-{site.name}",
        port=port,
        template=SITE_TEMPLATE,
        extra={
            "site": site.name,
            # Mosquitto takes the port after the last colon, also of an IPv6 address.
            "cloud_host": cloud_host,
            "cloud_port": str(cloud_port),
            "bridge_topics": "\n".join(lines),
        },
    )
