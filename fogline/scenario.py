"""Scenarios: a named, reproducible simulated deployment (fleet, rates, faults, edge rules)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from fogline.errors import ConfigError

BUILTIN_PACKAGE = "fogline.scenarios"


@dataclass(frozen=True)
class Scenario:
    """Everything `fogline simulate` needs to run and judge one deployment."""

    name: str
    description: str = ""
    devices: int = 50
    edges: int = 2
    duration: float = 20.0
    rate: float = 10.0
    samples_per_message: int = 10
    time_scale: float = 360.0
    seed: int = 7
    fault_rates: dict[str, float] = field(default_factory=dict)
    fault_horizon_h: float = 1.0
    wear_hours: tuple[float, float] = (0.5, 2.0)
    ambient_offset: float = 0.0
    edge: dict[str, Any] = field(default_factory=dict)
    fog: dict[str, Any] = field(default_factory=dict)

    def sim_args(self) -> list[str]:
        """Flags for `device-sim` that reproduce this scenario's fleet."""
        rates = ",".join(f"{k}={v}" for k, v in sorted(self.fault_rates.items()))
        return [
            "--time-scale", str(self.time_scale), "--faults", rates or "none",
            "--fault-horizon-h", str(self.fault_horizon_h),
            "--wear-hours", f"{self.wear_hours[0]},{self.wear_hours[1]}",
            "--ambient-offset", str(self.ambient_offset),
        ]  # fmt: skip

    def edge_args(self) -> list[str]:
        """Flags for `edge-agent` from the scenario's `[edge]` table."""
        return _flags(self.edge)

    def fog_args(self) -> list[str]:
        """Flags for `fog-aggregator` from the scenario's `[fog]` table."""
        return _flags(self.fog)


def _flags(table: dict[str, Any]) -> list[str]:
    out = []
    for key, value in table.items():
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


def builtin_names() -> list[str]:
    """Names of the scenarios shipped with fogline."""
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files(BUILTIN_PACKAGE).iterdir()
        if p.name.endswith(".toml")
    )


def load(spec: str) -> Scenario:
    """A scenario from a TOML file path or a built-in name; unknown keys raise ConfigError."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError("scenario", f"cannot read {path}: {exc.strerror}") from exc
        default_name = path.stem
    else:
        if spec not in builtin_names():
            known = ", ".join(builtin_names())
            raise ConfigError("scenario", f"no scenario {spec!r} (built-in: {known}; or a .toml)")
        text = resources.files(BUILTIN_PACKAGE).joinpath(f"{spec}.toml").read_text()
        default_name = spec
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("scenario", f"{spec} is not valid TOML: {exc}") from exc
    return from_dict(data, default_name)


def from_dict(data: dict[str, Any], default_name: str = "scenario") -> Scenario:
    """Validate a scenario mapping (the TOML layout: top-level keys, `[faults]`, `[edge]`)."""
    data = dict(data)
    faults = data.pop("faults", {})
    if not isinstance(faults, dict):
        raise ConfigError("faults", "must be a table")
    faults = dict(faults)
    values: dict[str, Any] = {"name": data.pop("name", default_name)}
    values["fault_rates"] = faults.pop("rates", {})
    if "horizon_h" in faults:
        values["fault_horizon_h"] = faults.pop("horizon_h")
    if "wear_hours" in faults:
        values["wear_hours"] = tuple(faults.pop("wear_hours"))
    if faults:
        raise ConfigError(
            f"faults.{next(iter(faults))}", "unknown key (known: rates, horizon_h, wear_hours)"
        )
    known = {f.name for f in fields(Scenario)} - {"fault_rates", "fault_horizon_h", "wear_hours"}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                key, f"unknown scenario key (known: {', '.join(sorted(known | {'faults'}))})"
            )
        values[key] = value
    sc = Scenario(**values)
    _check(sc)
    return sc


def _check(sc: Scenario) -> None:
    numbers = {
        "devices": (sc.devices, 1), "edges": (sc.edges, 1), "duration": (sc.duration, 1),
        "rate": (sc.rate, 0.01), "samples_per_message": (sc.samples_per_message, 1),
        "time_scale": (sc.time_scale, 0.001), "fault_horizon_h": (sc.fault_horizon_h, 0.001),
    }  # fmt: skip
    for key, (value, low) in numbers.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
            raise ConfigError(key, f"{value!r} must be a number >= {low}")
    if not isinstance(sc.fault_rates, dict) or not all(
        isinstance(v, int | float) and 0 <= v <= 1 for v in sc.fault_rates.values()
    ):
        raise ConfigError("faults.rates", "must map fault kinds to probabilities in [0, 1]")
    offset = sc.ambient_offset
    if not isinstance(offset, int | float) or isinstance(offset, bool) or not -40 <= offset <= 60:
        raise ConfigError("ambient_offset", f"{offset!r} must be degrees C in [-40, 60]")
    lo, hi = sc.wear_hours
    if not 0 < lo <= hi:
        raise ConfigError("faults.wear_hours", "must be [min, max] hours with 0 < min <= max")
    if not isinstance(sc.edge, dict):
        raise ConfigError("edge", "must be a table of edge-agent settings")
    if not isinstance(sc.fog, dict):
        raise ConfigError("fog", "must be a table of fog-aggregator settings")
