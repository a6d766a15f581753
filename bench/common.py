"""What every benchmark section shares: the machine line, the section heading, and how one
`fogline up` run is judged."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any


def machine() -> str:
    """One line of machine facts."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()
    mosq_v = mosq[0] if mosq else "mosquitto ?"
    if shutil.which("mosquitto") is None:
        mosq_v = subprocess.run(
            ["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {mosq_v}"


def heading(title: str, command: str, note: str = "") -> list[str]:
    """The first lines of a BENCHMARKS.md section: title, command, date and machine."""
    return [
        f"## {title}",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}{note}",
        "",
    ]


def judge_up_run(rep: dict[str, Any], devices: int, rate: float) -> dict[str, Any]:
    """Readings/s through the edge decision of a `fogline up` report, and whether the rate was
    sustained: every reading accounted, the rate asked for delivered (a simulator or broker that
    falls behind stretches the run) and the edges kept pace."""
    t = rep["timing"]
    span = t["devices_ran"] + t["edges_caught_up_after"]
    return {
        "devices": devices,
        "asked": devices * rate,
        "produced": rep["produced"],
        "readings_per_s": rep["produced"] / span,
        "caught_up_after": t["edges_caught_up_after"],
        "unaccounted": rep["unaccounted"],
        "duplicates": rep["duplicates"],
        "sustained": rep["unaccounted"] == 0
        and rep["duplicates"] == 0
        and rep["produced"] / span >= 0.95 * devices * rate
        and t["edges_caught_up_after"] < 2.0,
    }
