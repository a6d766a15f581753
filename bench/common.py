"""What every benchmark section shares: the machine line and the section heading."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path


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
