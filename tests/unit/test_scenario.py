"""Scenario files: built-ins load, unknown keys are named, values are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline.errors import ConfigError
from fogline.scenario import builtin_names, from_dict, load


def test_builtin_scenarios_load() -> None:
    assert {"quick", "factory", "stress"} <= set(builtin_names())
    quick = load("quick")
    assert quick.devices == 50 and quick.fault_rates["bearing_wear"] > 0
    assert load("stress").devices == 10_000
    args = quick.sim_args()
    assert args[args.index("--time-scale") + 1] == str(quick.time_scale)


def test_file_scenario_with_edge_settings(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        "devices = 3\nduration = 5\n[faults]\nhorizon_h = 0.1\n[faults.rates]\nimbalance = 1.0\n"
        "[edge]\nz_threshold = 3.5\n"
    )
    sc = load(str(path))
    assert sc.name == "mine" and sc.devices == 3
    assert sc.fault_rates == {"imbalance": 1.0}
    assert sc.edge_args() == ["--z-threshold", "3.5"]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"devicez": 3}, "devicez"),
        ({"faults": {"rate": {}}}, "faults.rate"),
        ({"devices": 0}, "devices"),
        ({"faults": {"rates": {"bearing_wear": 2}}}, "faults.rates"),
        ({"faults": {"wear_hours": [3, 1]}}, "faults.wear_hours"),
    ],
)
def test_bad_scenarios_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert err.value.key == key


def test_unknown_builtin_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="quick"):
        load("nonesuch")
