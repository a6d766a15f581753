"""Starts, watches and restarts the pipeline's processes; writes their pid files."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

RESTART_BASE = 0.5
RESTART_CAP = 10.0
STABLE_AFTER = 30.0


@dataclass
class Child:
    """One supervised process."""

    name: str  # e.g. "edge-e0": role and id, also the pid and log file names
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    restart_at: float | None = None
    stopping: bool = False
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Keeps children running: a child that dies unexpectedly is restarted with backoff."""

    def __init__(self, *, run_dir: Path, log_dir: Path) -> None:
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}
        run_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)

    def pid_file(self, name: str) -> Path:
        """Where the pid of child `name` is written."""
        return self.run_dir / f"{name}.pid"

    def add(self, name: str, argv: list[str]) -> Child:
        """Register and start a child."""
        child = self.children[name] = Child(name=name, argv=argv)
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        with open(self.log_dir / f"{child.name}.log", "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches the supervisor only, which then
            # stops the children in order.
            child.proc = subprocess.Popen(
                child.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        child.started = time.monotonic()
        child.restart_at = None
        self.pid_file(child.name).write_text(f"{child.proc.pid}\n")

    def poll(self) -> list[str]:
        """Restart children that died; returns log-worthy messages about what happened."""
        notes = []
        now = time.monotonic()
        for child in self.children.values():
            if child.stopping or child.proc is None:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._spawn(child)
                    notes.append(f"restarted {child.name} (restart {child.restarts})")
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.exit_codes.append(code)
            attempt = 0 if now - child.started > STABLE_AFTER else child.restarts
            delay = min(RESTART_CAP, RESTART_BASE * 2**attempt)
            child.restarts += 1
            child.restart_at = now + delay
            how = f"signal {-code}" if code < 0 else f"status {code}"
            notes.append(f"{child.name} exited ({how}); restarting in {delay:.1f}s")
        return notes

    def alive(self, name: str) -> bool:
        """Whether the child is currently running."""
        proc = self.children[name].proc
        return proc is not None and proc.poll() is None

    def stop(self, names: list[str], timeout: float) -> None:
        """SIGTERM the named children, wait up to `timeout`, then SIGKILL what is left."""
        for name in names:
            child = self.children[name]
            child.stopping = True
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in names:
            proc = self.children[name].proc
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", name, timeout)
                proc.kill()
                proc.wait()
            self.pid_file(name).unlink(missing_ok=True)

    def stop_all(self, timeout: float) -> None:
        """Stop every child at once."""
        self.stop(list(self.children), timeout)

    def restarts(self) -> dict[str, int]:
        """Restart counts per child (only those restarted)."""
        return {c.name: c.restarts for c in self.children.values() if c.restarts}


def read_pid(run_dir: Path, name: str) -> int | None:
    """The pid recorded for `name` under `run_dir`, if any."""
    try:
        return int((run_dir / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
