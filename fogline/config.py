"""Validated configuration models: defaults < TOML file < environment < command-line flags.

A config is a dataclass whose fields are declared with `setting()`, which carries the help text
and bounds. Unknown keys in a TOML file are rejected with a message naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import sys
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from fogline.errors import ConfigError
from fogline.topics import DEFAULT_ROOT, check_id

C = TypeVar("C", bound="ServiceConfig")
ENV_PREFIX = "FOGLINE_"


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """Declare a config field with its default, description and bounds."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class ServiceConfig:
    """Settings every fogline process shares."""

    id: str = setting("1", "Identifier of this process within its role (a topic segment).")
    broker_host: str = setting("127.0.0.1", "MQTT broker host name or address.")
    broker_port: int = setting(1883, "MQTT broker TCP port.", minimum=1, maximum=65535)
    topic_root: str = setting(DEFAULT_ROOT, "Prefix of every topic.")
    data_dir: Path = setting(Path(".fogline/data"), "Folder for this deployment's state files.")
    metrics_interval: float = setting(2.0, "Seconds between metrics messages.", minimum=0.1)
    shutdown_timeout: float = setting(
        8.0, "Seconds a stopping process may spend delivering what it holds.", minimum=0.0
    )
    log_level: str = setting(
        "INFO", "Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    log_format: str = setting(
        "text", "Log lines as plain text or as JSON objects.", choices=("text", "json")
    )
    metrics_port: int = setting(
        0, "TCP port serving Prometheus /metrics (0 = off).", minimum=0, maximum=65535
    )
    metrics_host: str = setting("127.0.0.1", "Address /metrics listens on (loopback only).")
    metrics_allow_remote: bool = setting(
        False, "Let metrics_host be a non-loopback address (exposes /metrics to the network)."
    )
    tls_ca: str = setting("", "CA certificate that signs the broker's ('' = no TLS).")
    tls_cert: str = setting("", "This client's certificate file, PEM ('' = none).")
    tls_key: str = setting("", "This client's private key file, PEM ('' = none).")
    username: str = setting("", "MQTT username ('' = anonymous).")
    password_file: str = setting(
        "", "File whose first line is the MQTT password (never give the password itself)."
    )

    def process_id(self) -> str:
        """This process's own id (client id, status topic); `id` unless several share it."""
        return self.id

    def validate(self) -> None:
        """Check cross-field rules; subclasses extend it."""
        check_id(self.id, "id")
        if not (self.metrics_allow_remote or _is_loopback(self.metrics_host)):
            raise ConfigError(
                "metrics_host",
                f"{self.metrics_host!r} is not a loopback address; /metrics has no"
                " authentication, so set metrics_allow_remote = true"
                " (--metrics-allow-remote) to serve it beyond this machine",
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise ConfigError(missing, "tls_cert and tls_key go together")
        if self.password_file and not self.username:
            raise ConfigError("username", "password_file is set but username is empty")


def check_startup(cfg: ServiceConfig) -> None:
    """Refuse an unsafe start: remote broker without TLS or login, unreadable files, no data dir."""
    for key in ("tls_ca", "tls_cert", "tls_key", "password_file"):
        path = getattr(cfg, key)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(key, f"cannot read {path}")
    if not _is_loopback(cfg.broker_host):
        if not (cfg.tls_ca or cfg.tls_cert):
            raise ConfigError(
                "broker_host",
                f"{cfg.broker_host!r} is not a loopback address: refusing to connect without TLS"
                " (set tls_ca, and tls_cert and tls_key for a client certificate)",
            )
        if not cfg.username:
            raise ConfigError(
                "broker_host",
                f"{cfg.broker_host!r} is not a loopback address: refusing to connect anonymously"
                " (set username and password_file)",
            )
    existing = Path(cfg.data_dir).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("data_dir", f"{cfg.data_dir} is not writable (checked {existing})")


def _is_loopback(host: str) -> bool:
    """Whether `host` is `localhost` or a loopback address (IPv4 or IPv6)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a TOML, environment or flag value to the field's type, or raise ConfigError."""
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{value!r} is not a boolean")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{value!r} is not an integer")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(f"{value!r} is not a number")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(f"{value!r} is not a string")
            return value
        if tp is Path:
            return Path(value)
        if typing.get_origin(tp) is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError(f"{value!r} is not a list")
            (inner,) = typing.get_args(tp)
            return [_coerce(key, inner, v.strip() if isinstance(v, str) else v) for v in items]
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, str(exc)) from exc
    raise ConfigError(key, f"unsupported type {tp!r}")


def _check_bounds(cfg: ServiceConfig) -> None:
    for f, _tp in _fields(type(cfg)):
        value = getattr(cfg, f.name)
        lo, hi, choices = f.metadata.get("minimum"), f.metadata.get("maximum"), None
        choices = f.metadata.get("choices")
        if lo is not None and value < lo:
            raise ConfigError(f.name, f"{value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f.name, f"{value} is above the maximum {hi}")
        if choices is not None and value not in choices:
            raise ConfigError(f.name, f"{value!r} is not one of {', '.join(choices)}")


def build(cls: type[C], values: dict[str, Any]) -> C:
    """Make a validated config from a mapping; unknown keys raise ConfigError naming the key."""
    types = {f.name: tp for f, tp in _fields(cls)}
    for key in values:
        if key not in types:
            raise ConfigError(key, f"unknown key (known: {', '.join(sorted(types))})")
    cfg = cls(**{k: _coerce(k, types[k], v) for k, v in values.items()})
    _check_bounds(cfg)
    cfg.validate()
    return cfg


def load_toml(path: Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML file: its top-level keys, overridden by the `[section]` table if present.

    Keys with dashes become underscores.
    """
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc
    # Top-level keys apply to every process; the process's own table overrides them; other
    # processes' tables are theirs, so one file can configure a whole deployment.
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    if section is not None and isinstance(data.get(section), dict):
        merged.update(data[section])
    return {k.replace("-", "_"): v for k, v in merged.items()}


def from_env(cls: type[C], env: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    """Values for `cls` taken from `FOGLINE_<KEY>` environment variables."""
    out = {}
    for f, _tp in _fields(cls):
        name = ENV_PREFIX + f.name.upper()
        if name in env:
            out[f.name] = env[name]
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_arguments(parser: argparse.ArgumentParser, cls: type[ServiceConfig]) -> None:
    """Add one `--key` flag per config field (defaults suppressed so only given flags count)."""
    for f, tp in _fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = _default(f)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata['help']} (default: {shown})",
        }
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag, **kwargs)


def parse(
    cls: type[C],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    section: str,
    env: dict[str, str] | os._Environ[str] = os.environ,
) -> C:
    """Parse flags, `--config FILE`, the environment and defaults into a validated config.

    `--check-config` prints the resolved configuration and exits. Errors exit with status 2.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", type=Path, help=f"TOML file (keys at top level or in [{section}])"
    )
    parser.add_argument(
        "--check-config", action="store_true", help="print the resolved configuration and exit"
    )
    add_arguments(parser, cls)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    check = args.pop("check_config")
    values: dict[str, Any] = {}
    try:
        if config_file is not None:
            values.update(load_toml(config_file, section))
        values.update(from_env(cls, env))
        values.update(args)
        cfg = build(cls, values)
    except ConfigError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    if check:
        print(render(cfg))
        sys.exit(0)
    return cfg


def render(cfg: ServiceConfig) -> str:
    """The configuration as TOML text."""
    lines = []
    for f, _tp in _fields(type(cfg)):
        text = _toml_value(getattr(cfg, f.name))
        lines.append(f"{f.name} = {text}  # {f.metadata['help']}")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
