"""Topic names: the documented tree, under the default and a custom root."""

from __future__ import annotations

import pytest

from fogline.errors import ConfigError, DecodeError
from fogline.topics import DEFAULT_ROOT, Topics, check_id


def test_default_root_is_fl_v1() -> None:
    assert DEFAULT_ROOT == "fl/v1"
    assert Topics().root == "fl/v1"


@pytest.mark.parametrize(
    ("root", "prefix"), [(None, "fl/v1"), ("plant-3/fog", "plant-3/fog"), ("x", "x")]
)
def test_builders_give_the_documented_tree(root: str | None, prefix: str) -> None:
    t = Topics() if root is None else Topics(root=root)
    assert t.tele("edge-1", "pump-7") == f"{prefix}/dev/edge-1/pump-7/tele"
    assert t.tele_sub("edge-1") == f"{prefix}/dev/edge-1/+/tele"
    assert t.up("edge", "edge-1") == f"{prefix}/edge/edge-1/up"
    assert t.up("fog", "fog-1") == f"{prefix}/fog/fog-1/up"
    assert t.up_sub("edge") == f"{prefix}/edge/+/up"
    assert t.ack("edge", "edge-1") == f"{prefix}/edge/edge-1/ack"
    assert t.ack("fog", "fog-1") == f"{prefix}/fog/fog-1/ack"
    assert t.esc("edge-1") == f"{prefix}/edge/edge-1/esc"
    assert t.esc_reply("edge-1") == f"{prefix}/edge/edge-1/esc/reply"
    assert t.status("edge", "edge-1") == f"{prefix}/status/edge/edge-1"
    assert t.metrics("fog", "fog-1") == f"{prefix}/metrics/fog/fog-1"
    assert t.dlq("cloud", "c1") == f"{prefix}/dlq/cloud/c1"
    assert t.all_status() == f"{prefix}/status/#"
    assert t.all_metrics() == f"{prefix}/metrics/#"


@pytest.mark.parametrize("root", [None, "site.a/fl"])
def test_parse_tele_round_trips(root: str | None) -> None:
    t = Topics() if root is None else Topics(root=root)
    assert t.parse_tele(t.tele("edge-1", "pump_7.a")) == ("edge-1", "pump_7.a")


@pytest.mark.parametrize(
    "topic",
    [
        "other/dev/edge-1/pump-7/tele",  # wrong root
        "fl/v2/dev/edge-1/pump-7/tele",  # wrong root version
        "fl/v1/dev/edge-1/pump-7/telemetry",  # wrong suffix
        "fl/v1/dev/edge-1/pump-7/ack",
        "fl/v1/dev/edge-1/+/tele",  # wildcard
        "fl/v1/dev/#",
        "fl/v1/dev/+/pump-7/tele",
        "fl/v1/dev/edge-1/pump-7/tele/x",  # extra level
        "fl/v1/dev/a/edge-1/pump-7/tele",
        "fl/v1/dev/edge-1/tele",  # missing level
        "fl/v1/dev/edge-1//tele",  # empty segment
        "fl/v1/edge/edge-1/up",
        "",
    ],
)
def test_parse_tele_rejects(topic: str) -> None:
    with pytest.raises(DecodeError) as info:
        Topics().parse_tele(topic)
    assert info.value.reason == "bad_topic"


def test_parse_tele_with_custom_root_rejects_the_default_root() -> None:
    with pytest.raises(DecodeError):
        Topics(root="plant").parse_tele("fl/v1/dev/edge-1/pump-7/tele")


@pytest.mark.parametrize("role", ["edge", "fog"])
def test_parse_sender_round_trips(role: str) -> None:
    for t in (Topics(), Topics(root="a/b/c")):
        assert t.parse_sender(t.up(role, "node-9"), role) == "node-9"


@pytest.mark.parametrize(
    ("topic", "role"),
    [
        ("fl/v1/edge/edge-1/ack", "edge"),  # wrong suffix
        ("fl/v1/edge/edge-1/up", "fog"),  # wrong role
        ("fl/v2/edge/edge-1/up", "edge"),  # wrong root
        ("xx/edge/edge-1/up", "edge"),
        ("fl/v1/edge/+/up", "edge"),  # wildcard
        ("fl/v1/edge/#", "edge"),
        ("fl/v1/edge/edge-1/up/x", "edge"),  # extra level
        ("fl/v1/edge/a/edge-1/up", "edge"),
        ("fl/v1/edge/up", "edge"),
        ("fl/v1/edge//up", "edge"),
    ],
)
def test_parse_sender_rejects(topic: str, role: str) -> None:
    with pytest.raises(DecodeError) as info:
        Topics().parse_sender(topic, role)
    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize("root", ["a/#", "a/+/b", "#", "+", "", "fl/v1/"])
def test_invalid_root_is_a_config_error(root: str) -> None:
    with pytest.raises(ConfigError) as info:
        Topics(root=root)
    assert info.value.key == "topic_root"


@pytest.mark.parametrize("value", ["a", "edge-1", "pump_7.b", "A" * 64, "0"])
def test_check_id_accepts_valid_ids(value: str) -> None:
    assert check_id(value) == value


@pytest.mark.parametrize(
    "value", ["a/b", "+", "#", "", "a" * 65, "a b", "é", "a\n", "a\x00", None, 5]
)
def test_check_id_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        check_id(value, "device")  # type: ignore[arg-type]
    assert info.value.key == "device"
