"""The one module that builds and parses MQTT topic names."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from fogline.errors import ConfigError, DecodeError

DEFAULT_ROOT = "fl/v1"
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a valid topic segment (letters, digits, `_.-`), else raise."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ConfigError(what, f"{value!r} is not a valid id (1-64 of A-Z a-z 0-9 _ . -)")
    return value


@functools.lru_cache(maxsize=1 << 16)  # an edge parses its devices' few topics again and again
def _parse_tele(root: str, topic: str) -> tuple[str, str] | None:
    prefix = root + "/dev/"
    parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
    if len(parts) != 3 or parts[2] != "tele" or not all(_ID.fullmatch(p) for p in parts[:2]):
        return None
    return parts[0], parts[1]


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one root prefix (default `fl/v1`)."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in "+#") or self.root.endswith("/"):
            raise ConfigError("topic_root", f"{self.root!r} is not a valid topic prefix")

    # device -> edge telemetry
    def tele(self, edge: str, device: str) -> str:
        """Telemetry batches of one device, read by its edge."""
        return f"{self.root}/dev/{edge}/{device}/tele"

    def tele_sub(self, edge: str) -> str:
        """Subscription for all telemetry of one edge's devices."""
        return f"{self.root}/dev/{edge}/+/tele"

    def parse_tele(self, topic: str) -> tuple[str, str]:
        """Return `(edge, device)` of a telemetry topic, or raise DecodeError."""
        parsed = _parse_tele(self.root, topic)
        if parsed is None:
            raise DecodeError("bad_topic", f"not a telemetry topic: {topic!r}")
        return parsed

    # custody hops: records go up, acks come back
    def up(self, role: str, ident: str) -> str:
        """Custody records sent upstream by `role` (`edge` or `fog`) `ident`."""
        return f"{self.root}/{role}/{ident}/up"

    def up_sub(self, role: str) -> str:
        """Subscription for custody records from every sender of `role`."""
        return f"{self.root}/{role}/+/up"

    def ack(self, role: str, ident: str) -> str:
        """Acks for the custody records of `role` `ident`."""
        return f"{self.root}/{role}/{ident}/ack"

    def shared_up(self, group: str, fog: str) -> str:
        """Shared subscription of the cloud-sink workers `group` to a fog's records (`+`: all).

        The broker hands each message to one member of the group (MQTT 5, and MQTT 3.1.1 on
        Mosquitto 2, EMQX, HiveMQ and VerneMQ)."""
        return f"$share/{group}/{self.up('fog', fog)}"

    def parse_sender(self, topic: str, role: str) -> str:
        """Return the sender id of an `up` topic of `role`, or raise DecodeError."""
        prefix = f"{self.root}/{role}/"
        parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
        if len(parts) != 2 or parts[1] != "up" or not _ID.fullmatch(parts[0]):
            raise DecodeError("bad_topic", f"not an up topic of {role}: {topic!r}")
        return parts[0]

    # escalations (used by the edge-intelligence layer)
    def esc(self, edge: str) -> str:
        """Escalation requests of an edge."""
        return f"{self.root}/edge/{edge}/esc"

    def esc_sub(self) -> str:
        """Subscription for escalation requests of every edge."""
        return f"{self.root}/edge/+/esc"

    def parse_esc(self, topic: str) -> str:
        """Return the edge id of an escalation topic, or raise DecodeError."""
        prefix = f"{self.root}/edge/"
        parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
        if len(parts) != 2 or parts[1] != "esc" or not _ID.fullmatch(parts[0]):
            raise DecodeError("bad_topic", f"not an escalation topic: {topic!r}")
        return parts[0]

    def esc_reply(self, edge: str) -> str:
        """Escalation replies to an edge."""
        return f"{self.root}/edge/{edge}/esc/reply"

    # model updates: signed manifests and chunks (retained), install acks
    def model(self, fog: str, name: str) -> str:
        """The retained signed manifest of model `name` published by fog `fog`."""
        return f"{self.root}/fog/{fog}/model/{name}"

    def model_chunk(self, fog: str, name: str, index: int) -> str:
        """Retained chunk `index` of the bytes of model `name`."""
        return f"{self.root}/fog/{fog}/model/{name}/chunk/{index}"

    def model_sub(self, fog: str) -> str:
        """Subscription for the manifests of one fog."""
        return f"{self.root}/fog/{fog}/model/+"

    def model_chunks_sub(self, fog: str, name: str) -> str:
        """Subscription for the chunks of model `name` (re-subscribing fetches them again)."""
        return f"{self.root}/fog/{fog}/model/{name}/chunk/+"

    def parse_model(self, topic: str) -> tuple[str, str, int | None]:
        """Return `(fog, name, chunk index or None)` of a model topic, or raise DecodeError."""
        prefix = f"{self.root}/fog/"
        parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
        ok = len(parts) in (3, 5) and parts[1] == "model"
        ok = ok and all(_ID.fullmatch(p) for p in (parts[0], parts[2]))
        if ok and len(parts) == 5:
            ok = parts[3] == "chunk" and parts[4].isdigit() and len(parts[4]) <= 6
        if not ok:
            raise DecodeError("bad_topic", f"not a model topic: {topic!r}")
        return parts[0], parts[2], int(parts[4]) if len(parts) == 5 else None

    def model_ack(self, edge: str) -> str:
        """An edge's answers to model manifests: installed, or rejected with the reason."""
        return f"{self.root}/edge/{edge}/model/ack"

    def model_ack_sub(self) -> str:
        """Subscription for the model acks of every edge."""
        return f"{self.root}/edge/+/model/ack"

    def parse_model_ack(self, topic: str) -> str:
        """Return the edge id of a model ack topic, or raise DecodeError."""
        prefix = f"{self.root}/edge/"
        parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
        if len(parts) != 3 or parts[1:] != ["model", "ack"] or not _ID.fullmatch(parts[0]):
            raise DecodeError("bad_topic", f"not a model ack topic: {topic!r}")
        return parts[0]

    # service plumbing
    def status(self, role: str, ident: str) -> str:
        """Retained `online` / `offline` / `stopped` status of a process."""
        return f"{self.root}/status/{role}/{ident}"

    def metrics(self, role: str, ident: str) -> str:
        """Periodic metrics of a process."""
        return f"{self.root}/metrics/{role}/{ident}"

    def dlq(self, role: str, ident: str) -> str:
        """Rejected input of a process, with the reason (truncated copy)."""
        return f"{self.root}/dlq/{role}/{ident}"

    def all_status(self) -> str:
        """Subscription for every status topic."""
        return f"{self.root}/status/#"

    def all_metrics(self) -> str:
        """Subscription for every metrics topic."""
        return f"{self.root}/metrics/#"
