"""Configuration: defaults < TOML file < environment < flags, validated, with clear errors."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fogline.config import ServiceConfig, build, parse, render, setting
from fogline.errors import ConfigError


@dataclasses.dataclass
class DemoConfig(ServiceConfig):
    """A service config with the field types the base lacks."""

    peers: list[str] = setting(["fog-1"], "Upstream peers.")
    verbose: bool = setting(False, "Log every message.")
    ratio: float = setting(0.5, "A share.", minimum=0.0, maximum=1.0)
    batch: int = setting(100, "Records per batch.", minimum=1, maximum=1000)


@dataclasses.dataclass
class PortsConfig(ServiceConfig):
    """A service config with a list of numbers."""

    ports: list[int] = setting([1883], "Ports to try.")


KEYS = [f.name for f in dataclasses.fields(DemoConfig)]


def _parse(argv: list[str], env: dict[str, str] | None = None) -> DemoConfig:
    return parse(DemoConfig, argv, prog="demo", description="demo", section="demo", env=env or {})


# --------------------------------------------------------------------------- build


def test_build_with_no_values_gives_the_defaults() -> None:
    cfg = build(ServiceConfig, {})
    assert cfg == ServiceConfig()
    assert cfg.id == "1"
    assert cfg.broker_host == "127.0.0.1"
    assert cfg.broker_port == 1883
    assert cfg.topic_root == "fl/v1"
    assert cfg.data_dir == Path(".fogline/data")
    assert cfg.metrics_interval == 2.0
    assert cfg.log_level == "INFO"


def test_list_defaults_are_not_shared_between_configs() -> None:
    a, b = build(DemoConfig, {}), build(DemoConfig, {})
    a.peers.append("fog-2")
    assert b.peers == ["fog-1"]


def test_unknown_key_names_the_key_and_lists_known_keys() -> None:
    with pytest.raises(ConfigError) as info:
        build(ServiceConfig, {"broker_hots": "x"})
    assert info.value.key == "broker_hots"
    message = str(info.value)
    assert "broker_hots" in message
    for key in ("broker_host", "broker_port", "id", "log_level", "data_dir"):
        assert key in message


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("broker_port", "1884", 1884),
        ("broker_port", 1885.0, 1885),
        ("metrics_interval", "0.25", 0.25),
        ("metrics_interval", 3, 3.0),
        ("ratio", "1", 1.0),
        ("data_dir", "/var/lib/fogline", Path("/var/lib/fogline")),
        ("peers", "fog-1,fog-2", ["fog-1", "fog-2"]),
        ("peers", " a , b ,c", ["a", "b", "c"]),
        ("peers", ["x", "y"], ["x", "y"]),
        ("broker_host", "mqtt.local", "mqtt.local"),
    ],
)
def test_values_are_coerced_to_the_field_type(key: str, text: Any, expected: Any) -> None:
    value = getattr(build(DemoConfig, {key: text}), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        ("on", True),
        ("1", True),
        (" YES ", True),
        (True, True),
        ("false", False),
        ("no", False),
        ("off", False),
        ("0", False),
        (False, False),
    ],
)
def test_bool_words_are_understood(text: Any, expected: bool) -> None:
    assert build(DemoConfig, {"verbose": text}).verbose is expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("verbose", "maybe"),
        ("broker_port", "80a"),
        ("broker_port", "1.5"),
        ("broker_port", 1.5),
        ("broker_port", True),
        ("metrics_interval", "fast"),
        ("metrics_interval", False),
        ("broker_host", 5),
        ("peers", 5),
    ],
)
def test_values_that_do_not_convert_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build(DemoConfig, {key: value})
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("broker_port", 0),
        ("broker_port", 65536),
        ("metrics_interval", 0.05),
        ("shutdown_timeout", -1),
        ("ratio", 1.01),
        ("ratio", "-0.1"),
        ("batch", 1001),
        ("log_level", "VERBOSE"),
        ("log_level", "info"),
    ],
)
def test_out_of_bounds_values_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build(DemoConfig, {key: value})
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("broker_port", 1), ("broker_port", 65535), ("ratio", 0.0), ("ratio", 1.0), ("batch", 1)],
)
def test_bounds_are_inclusive(key: str, value: Any) -> None:
    assert getattr(build(DemoConfig, {key: value}), key) == value


@pytest.mark.parametrize("ident", ["a/b", "", "+"])
def test_invalid_id_is_rejected(ident: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(ServiceConfig, {"id": ident})
    assert info.value.key == "id"


# --------------------------------------------------------------------------- parse


def test_parse_without_anything_gives_the_defaults() -> None:
    assert _parse([]) == DemoConfig()


def test_precedence_defaults_toml_environment_flags(tmp_path: Path) -> None:
    path = tmp_path / "demo.toml"
    path.write_text(
        'broker_host = "toml-host"\n'
        "broker-port = 2000\n"
        'log_level = "WARNING"\n'
        "metrics_interval = 4.0\n"
        'peers = ["p1", "p2"]\n'
    )
    env = {
        "FOGLINE_BROKER_PORT": "3000",
        "FOGLINE_LOG_LEVEL": "ERROR",
        "FOGLINE_VERBOSE": "yes",
        "OTHER_BROKER_HOST": "ignored",
    }
    cfg = _parse(["--config", str(path), "--log-level", "DEBUG"], env)

    assert cfg.id == "1"  # default
    assert cfg.broker_host == "toml-host"  # TOML over default
    assert cfg.metrics_interval == 4.0
    assert cfg.peers == ["p1", "p2"]
    assert cfg.broker_port == 3000  # environment over TOML
    assert cfg.verbose is True  # environment over default
    assert cfg.log_level == "DEBUG"  # flag over environment and TOML


def test_flags_override_environment_for_every_type(tmp_path: Path) -> None:
    env = {
        "FOGLINE_BROKER_PORT": "3000",
        "FOGLINE_VERBOSE": "true",
        "FOGLINE_PEERS": "e1,e2",
        "FOGLINE_DATA_DIR": "/env",
    }
    argv = ["--broker-port", "4000", "--no-verbose", "--peers", "f1,f2,f3"]
    cfg = _parse([*argv, "--data-dir", str(tmp_path)], env)
    assert cfg.broker_port == 4000
    assert cfg.verbose is False
    assert cfg.peers == ["f1", "f2", "f3"]
    assert cfg.data_dir == tmp_path


def test_environment_values_are_coerced() -> None:
    env = {
        "FOGLINE_ID": "edge-9",
        "FOGLINE_BROKER_PORT": "8883",
        "FOGLINE_METRICS_INTERVAL": "0.5",
        "FOGLINE_VERBOSE": "on",
        "FOGLINE_DATA_DIR": "/srv/fl",
    }
    cfg = _parse([], env)
    assert (cfg.id, cfg.broker_port, cfg.metrics_interval) == ("edge-9", 8883, 0.5)
    assert cfg.verbose is True
    assert cfg.data_dir == Path("/srv/fl")


def test_toml_section_table_is_used_and_dashes_become_underscores(tmp_path: Path) -> None:
    path = tmp_path / "demo.toml"
    path.write_text(
        '[demo]\nbroker-host = "sect-host"\nbroker_port = 2222\nshutdown-timeout = 1.5\n'
    )
    env = {"FOGLINE_BROKER_PORT": "3333"}
    cfg = _parse(["--config", str(path)], env)
    assert cfg.broker_host == "sect-host"
    assert cfg.shutdown_timeout == 1.5
    assert cfg.broker_port == 3333  # environment still beats the file


def test_unknown_key_in_toml_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "demo.toml"
    path.write_text("[demo]\nbroker_prot = 1\n")
    with pytest.raises(SystemExit) as info:
        _parse(["--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "broker_prot" in err
    assert "broker_port" in err  # the known keys are listed


def test_invalid_toml_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('broker_host = "unterminated\n')
    with pytest.raises(SystemExit) as info:
        _parse(["--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "not valid TOML" in err
    assert str(path) in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(SystemExit) as info:
        _parse(["--config", str(path)])
    assert info.value.code == 2
    assert str(path) in capsys.readouterr().err


def test_bad_environment_value_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse([], {"FOGLINE_BROKER_PORT": "70000"})
    assert info.value.code == 2
    assert "broker_port" in capsys.readouterr().err


def test_bad_flag_value_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(["--ratio", "2"])
    assert info.value.code == 2
    assert "ratio" in capsys.readouterr().err


def test_check_config_prints_every_key_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(["--check-config", "--broker-port", "1999"], {"FOGLINE_ID": "edge-4"})
    assert info.value.code == 0
    out = capsys.readouterr().out
    printed = tomllib.loads(out)
    assert sorted(printed) == sorted(KEYS)
    assert printed["broker_port"] == 1999
    assert printed["id"] == "edge-4"


def test_every_flag_is_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in KEYS:
        assert "--" + key.replace("_", "-") in out
    assert "--check-config" in out
    assert "--config" in out


# --------------------------------------------------------------------------- render


def _round_trip(cfg: ServiceConfig) -> ServiceConfig:
    return build(type(cfg), tomllib.loads(render(cfg)))


def test_render_parses_back_to_the_same_values() -> None:
    cfg = build(
        DemoConfig,
        {
            "id": "edge-2",
            "broker_port": 8883,
            "metrics_interval": 0.1,
            "data_dir": "/tmp/fl data",
            "peers": ["fog-1", "fog-2"],
            "verbose": True,
            "ratio": 1.0,
        },
    )
    parsed = tomllib.loads(render(cfg))
    expected = {
        f.name: str(v) if isinstance(v := getattr(cfg, f.name), Path) else v
        for f in dataclasses.fields(cfg)
    }
    assert parsed == expected
    assert _round_trip(cfg) == cfg


def test_render_of_defaults_parses_back() -> None:
    assert _round_trip(DemoConfig()) == DemoConfig()
    assert _round_trip(ServiceConfig()) == ServiceConfig()


def test_render_escapes_quotes_and_backslashes_in_strings() -> None:
    cfg = build(DemoConfig, {"broker_host": 'we"ird\\host', "data_dir": "C:\\fog\\data"})
    assert _round_trip(cfg) == cfg


def test_render_escapes_quotes_and_backslashes_in_lists() -> None:
    cfg = build(DemoConfig, {"peers": ["C:\\fog", 'say "hi"']})
    assert _round_trip(cfg) == cfg


def test_list_of_numbers_is_coerced_from_text() -> None:
    assert build(PortsConfig, {"ports": "1883, 8883"}).ports == [1883, 8883]
    with pytest.raises(ConfigError) as info:
        build(PortsConfig, {"ports": "1,x"})
    assert info.value.key == "ports"


def test_render_writes_lists_of_numbers_as_numbers() -> None:
    cfg = build(PortsConfig, {"ports": [1883, 8883]})
    assert tomllib.loads(render(cfg))["ports"] == [1883, 8883]


def test_render_includes_each_description() -> None:
    text = render(DemoConfig())
    for f in dataclasses.fields(DemoConfig):
        assert f.metadata["help"] in text
