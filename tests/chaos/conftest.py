"""Helpers for chaos tests: the real pipeline (`fogline up`, or the processes started one by one
against a `Broker`), a follower of the status and metrics topics, samplers and an independent
per-device accounting read straight from the ledgers and the cloud store."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fogline.broker import Broker
from fogline.codec import decode
from fogline.errors import DecodeError
from fogline.supervisor import pid_alive, read_pid
from fogline.topics import Topics
from tests.integration.conftest import report_from, wait_for

__all__ = ["report_from", "wait_for"]

FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)


def say(*parts: Any) -> None:
    """Figures worth recording: printed so `pytest -s` (or a failure) shows them."""
    print("[chaos]", *parts, flush=True)


# --------------------------------------------------------------------------- observing


@dataclass
class Sample:
    """One metrics message as received."""

    at: float  # the test's wall clock when received
    ts: float  # the sender's wall clock (envelope `ts`)
    counters: dict[str, float]
    gauges: dict[str, float]


@dataclass
class Seen:
    """Everything received from one process."""

    states: list[tuple[float, str, float | None]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


class Watcher:
    """Follows `status/#` and `metrics/#` of a broker (reconnects by itself after a broker kill)."""

    def __init__(self, host: str, port: int, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        self.seen: dict[tuple[str, str], Seen] = defaultdict(Seen)
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"chaos-watch-{uuid.uuid4().hex[:8]}"
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self.topics.all_status(), qos=1)
        client.subscribe(self.topics.all_metrics(), qos=0)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        try:
            env = decode(bytes(msg.payload))
        except DecodeError:
            return
        now = time.time()
        with self.lock:
            seen = self.seen[(parts[-2], parts[-1])]
            if env.kind == "status":
                started = env.body.get("started")
                seen.states.append((now, str(env.body.get("state")), started))
            elif env.kind == "metrics":
                seen.samples.append(
                    Sample(
                        now,
                        env.ts,
                        dict(env.body.get("counters") or {}),
                        dict(env.body.get("gauges") or {}),
                    )
                )

    def state(self, role: str, ident: str) -> str | None:
        """The last status `role/ident` published (None before any)."""
        with self.lock:
            states = self.seen[(role, ident)].states
            return states[-1][1] if states else None

    def samples(self, role: str, ident: str, since: float = 0.0) -> list[Sample]:
        """Metrics samples of `role/ident` received at or after `since`."""
        with self.lock:
            return [s for s in self.seen[(role, ident)].samples if s.at >= since]

    def last(self, role: str, ident: str) -> Sample | None:
        """The last metrics sample of `role/ident`."""
        with self.lock:
            samples = self.seen[(role, ident)].samples
            return samples[-1] if samples else None

    def gauge(self, role: str, ident: str, name: str) -> float | None:
        """The last value of a gauge."""
        s = self.last(role, ident)
        return None if s is None else s.gauges.get(name)

    def counter(self, role: str, ident: str, name: str) -> float:
        """The last value of a counter (0 when not reported yet)."""
        s = self.last(role, ident)
        return 0.0 if s is None else float(s.counters.get(name, 0))

    def wait_online(self, who: list[tuple[str, str]], timeout: float = 30.0) -> None:
        """Wait until every `(role, id)` reported `online`."""
        wait_for(
            lambda: all(self.state(r, i) == "online" for r, i in who),
            timeout,
            f"{who} to be online",
        )

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


class Sampler:
    """Calls `probe()` every `interval` seconds in a thread and keeps `(time, value)` pairs."""

    def __init__(self, probe: Callable[[], float | None], interval: float = 0.1) -> None:
        self.probe = probe
        self.interval = interval
        self.values: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.probe()
            except Exception:  # a probe racing a process restart must not end the sampling
                value = None
            if value is not None:
                self.values.append((time.time(), float(value)))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        """Stop sampling; return what was sampled."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.values

    def peak(self) -> float:
        """The largest value sampled so far (0 when none)."""
        return max((v for _, v in self.values), default=0.0)


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def outbox_records(db: Path) -> int | None:
    """Records held in the outbox of a sender's database (read-only; None when unreadable)."""
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            row = conn.execute("SELECT value FROM outbox_meta WHERE key = 'records'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return None if row is None else int(row[0])


# --------------------------------------------------------------------------- `fogline up`


class UpRun:
    """`fogline up --json` as a subprocess, with access to its pid files and its broker."""

    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.run = data / "run"
        self.log_path = data.parent / "fogline-up.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fogline.cli", "up", "--data-dir", str(data), "--json", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.watcher: Watcher | None = None

    def pid(self, name: str) -> int | None:
        """The pid in `run/<name>.pid`, if the process is alive."""
        pid = read_pid(self.run, name)
        return pid if pid is not None and pid_alive(pid) else None

    def wait_started(self, timeout: float = 40.0) -> None:
        """Wait until the simulator runs (every layer was online before it started)."""
        wait_for(lambda: self.pid("device-sim-s0"), timeout, "fogline up to start the simulator")
        port = int((self.run / "broker.port").read_text())
        self.watcher = Watcher("127.0.0.1", port)

    def kill9_and_wait_restart(self, name: str, timeout: float = 20.0) -> float:
        """SIGKILL `name` by its pid file and wait for the supervisor's restart; returns the
        seconds from the kill until a new live pid was written."""
        old = self.pid(name)
        assert old is not None, f"{name} is not running"
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()

        def new_pid() -> int | None:
            pid = self.pid(name)
            return pid if pid is not None and pid != old else None

        wait_for(new_pid, timeout, f"the supervisor to restart {name}")
        return time.monotonic() - t0

    def finish(self, timeout: float = 120.0) -> tuple[int, str]:
        """Wait for `fogline up` to end; return its exit status and its stderr log."""
        try:
            self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"fogline up did not end within {timeout}s: {self.log()[-3000:]}")
        return self.proc.returncode, self.log()

    def log(self) -> str:
        """What `fogline up` printed on stderr so far."""
        self._log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        """Make sure nothing is left running (a failed test must not leak a pipeline)."""
        if self.watcher is not None:
            self.watcher.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGINT)  # the second one stops at once
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.run.exists():
            for pid_file in self.run.glob("*.pid"):
                pid = read_pid(self.run, pid_file.stem)
                if pid is not None and pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def fogline_up(tmp_path: Path) -> Iterator[Callable[..., UpRun]]:
    """Factory: `fogline_up(*args, env=None)` starts `fogline up` in `tmp_path / "data"`."""
    runs: list[UpRun] = []

    def start(*args: str, env: dict[str, str] | None = None) -> UpRun:
        run = UpRun(tmp_path / "data", *args, env=env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


# --------------------------------------------------------------------------- by hand


class Hand:
    """The four processes started one by one against a `Broker` (like the README's manual run),
    so a test can kill the broker, stop a layer for a while or give one process its own
    environment. Logs go to `data/logs/<name>.log`."""

    def __init__(self, broker: Broker, data: Path) -> None:
        self.broker = broker
        self.data = data
        (data / "logs").mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.watcher = Watcher(broker.host, broker.port)

    def start(
        self, name: str, module: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `python -m module` as `name` (e.g. `edge-e0`)."""
        argv = [
            sys.executable, "-m", module, "--broker-port", str(self.broker.port),
            "--data-dir", str(self.data), "--metrics-interval", "0.3",
            "--shutdown-timeout", "8", *args,
        ]  # fmt: skip
        self.argv[name] = (argv, env or {})
        return self._spawn(name)

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        argv, env = self.argv[name]
        with (self.data / "logs" / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        self.procs[name] = proc
        return proc

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start `name` again with the same command line and environment."""
        assert self.procs[name].poll() is not None, f"{name} is still running"
        return self._spawn(name)

    def start_layers(
        self,
        edges: list[str],
        *,
        edge_args: tuple[str, ...] = (),
        fog_args: tuple[str, ...] = (),
        env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """Cloud `c0`, fog `f0` and the edges, and wait until they are online."""
        env = env or {}
        self.start("cloud-c0", "cloud_sink", "--id", "c0", env=env.get("cloud-c0"))
        self.start(
            "fog-f0", "fog_aggregator", "--id", "f0", "--cloud-id", "c0", *fog_args,
            env=env.get("fog-f0"),
        )  # fmt: skip
        for e in edges:
            self.start(
                f"edge-{e}", "edge_agent", "--id", e, "--fog-id", "f0", *edge_args,
                env=env.get(f"edge-{e}"),
            )  # fmt: skip
        who = [("cloud", "c0"), ("fog", "f0"), *[("edge", e) for e in edges]]
        try:
            self.watcher.wait_online(who)
        except pytest.fail.Exception:
            late = [f"{r}-{i}" for r, i in who if self.watcher.state(r, i) != "online"]
            for name in late:
                if self.alive(name):
                    self.procs[name].send_signal(signal.SIGUSR1)  # its stacks, into its log
            time.sleep(1.0)
            logs = "\n".join(f"--- {name}:\n{self.log(name, 4000)}" for name in late)
            pytest.fail(f"not online after 30s: {late}\n{logs}")

    def start_sim(self, devices: int, edges: int, duration: float, *args: str) -> None:
        """Simulator `s0`."""
        self.start(
            "device-sim-s0", "device_sim", "--id", "s0", "--devices", str(devices),
            "--edges", str(edges), "--duration", str(duration), *args,
        )  # fmt: skip

    def pid(self, name: str) -> int:
        """The pid of `name`."""
        return self.procs[name].pid

    def alive(self, name: str) -> bool:
        """Whether `name` runs."""
        return self.procs[name].poll() is None

    def term(self, name: str, timeout: float = 20.0) -> int:
        """SIGTERM `name` and wait for it; fail the test when it does not stop in time."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the stacks of its threads, into its log
            time.sleep(1.0)
            proc.kill()
            proc.wait()
            pytest.fail(
                f"{name} did not stop within {timeout}s after SIGTERM: {self.log(name, 8000)}"
            )

    def log(self, name: str, tail: int = 3000) -> str:
        """The last `tail` characters of `name`'s log."""
        path = self.data / "logs" / f"{name}.log"
        return path.read_text()[-tail:] if path.exists() else ""

    def ledger_by_edge(self) -> dict[str, int]:
        """Readings produced per edge, from the simulator's ledger."""
        path = self.data / "device-sim-s0" / "ledger.db"
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return dict(conn.execute("SELECT edge, sum(produced) FROM ledger GROUP BY edge"))
        finally:
            conn.close()

    def finish(self, edges: list[str], sim_timeout: float = 60.0) -> None:
        """Like `fogline up`'s shutdown: wait for the simulator to end, for the edges to take
        every reading in the ledger, then stop edges, fog and cloud in that order."""
        sim = self.procs["device-sim-s0"]
        try:
            sim.wait(timeout=sim_timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the simulator did not end in {sim_timeout}s: {self.log('device-sim-s0')}")
        target = self.ledger_by_edge()
        wait_for(
            lambda: all(
                (self.watcher.gauge("edge", e, "position") or 0) >= target.get(e, 0) for e in edges
            ),
            30,
            f"the edges to take every reading of the ledger {target}",
        )
        for e in edges:
            self.term(f"edge-{e}")
        self.term("fog-f0")
        self.term("cloud-c0")

    def close(self) -> None:
        """Stop whatever still runs (a failed test must not leak processes)."""
        self.watcher.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- accounting


Span = tuple[int, int]


def _union(spans: list[Span]) -> list[Span]:
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def _size(spans: list[Span]) -> int:
    return sum(b - a + 1 for a, b in spans)


@dataclass
class DeviceAccount:
    """One device: readings produced, covered by stored records, reported dropped (not covered)."""

    produced: int
    covered: int
    dropped: int
    outside: int  # readings the stores cover or drop that the ledger does not list


def account(data: Path) -> dict[str, DeviceAccount]:
    """Per device, computed here from the ledger and the cloud store (not by `fogline report`)."""
    ledger = sqlite3.connect(f"file:{data / 'device-sim-s0' / 'ledger.db'}?mode=ro", uri=True)
    produced = dict(ledger.execute("SELECT device, produced FROM ledger"))
    ledger.close()
    cloud = sqlite3.connect(f"file:{data / 'cloud-c0' / 'cloud.db'}?mode=ro", uri=True)
    cov: dict[str, list[Span]] = defaultdict(list)
    drop: dict[str, list[Span]] = defaultdict(list)
    for table in ("summaries", "events"):
        for device, first, last in cloud.execute(f"SELECT device, first, last FROM {table}"):
            cov[device].append((first, last))
    for device, first, last in cloud.execute("SELECT device, first, last FROM drop_ranges"):
        drop[device].append((first, last))
    cloud.close()
    out = {}
    for device in sorted(set(produced) | set(cov) | set(drop)):
        made = produced.get(device, 0)
        covered = _union(cov[device])
        both = _union(covered + drop[device])
        inside = _union([(max(a, 0), min(b, made - 1)) for a, b in both if a < made])
        out[device] = DeviceAccount(
            produced=made,
            covered=_size(covered),
            dropped=_size(both) - _size(covered),
            outside=_size(both) - _size(inside),
        )
    return out


def assert_every_device_accounted(data: Path) -> dict[str, DeviceAccount]:
    """For every device: covered + dropped == produced, and nothing beyond what was produced."""
    acc = account(data)
    bad = {
        d: a
        for d, a in acc.items()
        if a.covered + a.dropped != a.produced or a.outside or a.produced == 0
    }
    assert not bad, f"devices not accounted for exactly: {dict(list(bad.items())[:10])}"
    return acc


def cloud_rows(data: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on the cloud store (read-only)."""
    conn = sqlite3.connect(f"file:{data / 'cloud-c0' / 'cloud.db'}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def drop_kinds(data: Path, reason: str) -> dict[str, int]:
    """Records evicted with `reason`, by kind, summed over the stored drop records."""
    total: dict[str, int] = defaultdict(int)
    for (kinds,) in cloud_rows(data, "SELECT kinds FROM drops WHERE reason = ?", reason):
        for kind, n in json.loads(kinds).items():
            total[kind] += n
    return dict(total)


def find_faketime() -> str | None:
    """The libfaketime preload library, when installed."""
    for lib in FAKETIME_LIBS:
        if Path(lib).is_file():
            return lib
    return None
