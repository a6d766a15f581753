"""The supervisor: pid files, restart with backoff after a crash, bounded stop."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fogline.supervisor import RESTART_BASE, Supervisor, pid_alive, read_pid

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]
CRASHER = [sys.executable, "-c", "import sys; sys.exit(3)"]
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n",
]


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    s = Supervisor(run_dir=tmp_path / "run", log_dir=tmp_path / "log")
    yield s
    s.stop_all(timeout=0.5)


def _until(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _poll_until(sup: Supervisor, word: str, timeout: float) -> tuple[list[str], float]:
    """Call poll() until a note contains `word`; returns every note seen and when it came."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        notes = sup.poll()
        seen += notes
        if any(word in n for n in notes):
            return seen, time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"no note with {word!r} within {timeout}s; notes: {seen}")


@pytest.mark.timeout(10)
def test_a_child_gets_a_pid_file_and_stop_terminates_it_and_removes_it(
    sup: Supervisor, tmp_path: Path
) -> None:
    child = sup.add("edge-e0", SLEEPER)
    pid = read_pid(tmp_path / "run", "edge-e0")
    assert pid is not None
    assert (tmp_path / "run" / "edge-e0.pid").exists()
    assert child.proc is not None
    assert pid == child.proc.pid
    assert pid_alive(pid)
    assert sup.alive("edge-e0")
    assert sup.poll() == []

    t0 = time.monotonic()
    sup.stop(["edge-e0"], timeout=2.0)
    assert time.monotonic() - t0 < 1.5, "SIGTERM is enough for a child that honours it"
    assert not sup.alive("edge-e0")
    assert not pid_alive(pid)
    assert read_pid(tmp_path / "run", "edge-e0") is None
    assert not (tmp_path / "run" / "edge-e0.pid").exists()
    assert sup.poll() == [], "a stopped child is not restarted"


@pytest.mark.timeout(10)
def test_a_child_that_dies_is_restarted_after_the_backoff(sup: Supervisor, tmp_path: Path) -> None:
    sup.add("sleeper", SLEEPER)
    sup.add("fog-f0", CRASHER)
    first_pid = read_pid(tmp_path / "run", "fog-f0")

    notes, died_at = _poll_until(sup, "exited", timeout=2.0)
    (exit_note,) = [n for n in notes if "exited" in n]
    assert "fog-f0" in exit_note
    assert "status 3" in exit_note
    assert sup.restarts() == {"fog-f0": 1}
    assert sup.alive("sleeper")

    notes, restarted_at = _poll_until(sup, "restarted", timeout=2.0)
    assert restarted_at - died_at >= RESTART_BASE * 0.9, "no restart before the backoff"
    assert any("fog-f0" in n for n in notes if "restarted" in n)
    second_pid = read_pid(tmp_path / "run", "fog-f0")
    assert second_pid is not None
    assert second_pid != first_pid
    assert second_pid == sup.children["fog-f0"].proc.pid  # type: ignore[union-attr]

    # It dies again, sooner than it became stable: the backoff doubles.
    notes, _ = _poll_until(sup, "exited", timeout=2.0)
    (exit_note,) = [n for n in notes if "exited" in n]
    assert "status 3" in exit_note
    assert f"{2 * RESTART_BASE:.1f}s" in exit_note
    assert sup.restarts() == {"fog-f0": 2}

    sup.stop_all(timeout=1.0)
    assert list((tmp_path / "run").glob("*.pid")) == []


@pytest.mark.timeout(10)
def test_a_child_ignoring_sigterm_is_killed_after_the_timeout(
    sup: Supervisor, tmp_path: Path
) -> None:
    child = sup.add("stubborn", STUBBORN)
    log = tmp_path / "log" / "stubborn.log"
    assert _until(lambda: log.exists() and "ready" in log.read_text(), timeout=3.0)
    pid = read_pid(tmp_path / "run", "stubborn")
    assert pid is not None

    t0 = time.monotonic()
    sup.stop(["stubborn"], timeout=0.5)
    elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 2.0
    assert child.proc is not None
    assert child.proc.returncode == -9
    assert not pid_alive(pid)
    assert not (tmp_path / "run" / "stubborn.pid").exists()
