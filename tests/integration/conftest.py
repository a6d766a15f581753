"""Helpers for tests that run the real processes against a private Mosquitto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fogline.broker import Broker


def run_up(data_dir: Path, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run `fogline up --json` to completion and return its report."""
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "up", "--data-dir", str(data_dir), "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return report_from(data_dir)


def report_from(data_dir: Path) -> dict[str, Any]:
    """The report `fogline report --json` gives for a data dir."""
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "report", "--data-dir", str(data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return dict(json.loads(proc.stdout))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until `predicate()` is truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class Processes:
    """Starts fogline process commands against a broker and stops them at teardown."""

    def __init__(self, broker: Broker, data_dir: Path) -> None:
        self.broker = broker
        self.data_dir = data_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, module: str, *args: str) -> subprocess.Popen[bytes]:
        """Start `python -m module` with the broker's port and the data dir."""
        log = open(self.data_dir / f"{module}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        argv = [
            sys.executable, "-m", module, "--broker-port", str(self.broker.port),
            "--data-dir", str(self.data_dir), "--metrics-interval", "0.3", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log(self, index: int) -> str:
        """What process number `index` printed so far."""
        logs = sorted(self.data_dir.glob(f"*-{index}.log"))
        return logs[0].read_text() if logs else ""

    def stop_all(self) -> None:
        """SIGTERM everything still running, then SIGKILL after a grace period."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def processes(broker: Broker, tmp_path: Path) -> Iterator[Processes]:
    """Run fogline processes against the test's broker; all are stopped afterwards."""
    data = tmp_path / "data"
    data.mkdir()
    procs = Processes(broker, data)
    try:
        yield procs
    finally:
        procs.stop_all()


def kill9(pid: int) -> None:
    """SIGKILL a process."""
    os.kill(pid, 9)
