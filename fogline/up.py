"""`fogline up`: the whole pipeline on one machine, supervised, with live progress and a report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fogline import keys, signing
from fogline.broker import Broker
from fogline.errors import ConfigError
from fogline.fleet import Site, split_sites
from fogline.monitor import Monitor
from fogline.nats import NatsBroker
from fogline.progress import bar
from fogline.report import build_report, format_report
from fogline.security import apply_client_security, client_flags
from fogline.sites import site_broker
from fogline.supervisor import Supervisor
from fogline.topics import Topics

log = logging.getLogger(__name__)

SIM, FOG, CLOUD = "s0", "f0", "c0"
CHILD_METRICS_INTERVAL = 0.5
EDGE_CATCH_UP = 20.0
MONITOR = "monitor-up"
RENEW_BEFORE = dt.timedelta(days=1)
BROKERS = ("mosquitto", "nats")
TOPOLOGIES = ("single", "sites")
DEFAULT_SITES = 2


def say(*parts: str, end: str = "\n") -> None:
    """Progress and notices go to stderr, so stdout carries only the report."""
    print(*parts, end=end, file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `fogline up`."""
    p.add_argument("--devices", type=int, default=20, help="simulated devices (default: 20)")
    p.add_argument("--edges", type=int, default=1, help="edge agents (default: 1)")
    p.add_argument(
        "--duration", type=float, default=60.0,
        help="seconds of telemetry; 0 runs until Ctrl-C (default: 60)",
    )  # fmt: skip
    p.add_argument(
        "--data-dir", type=Path, default=Path(".fogline/data"),
        help="folder for all state: broker, databases, logs, pid files (default: .fogline/data)",
    )  # fmt: skip
    p.add_argument("--rate", type=float, default=10.0, help="readings/s per device (default: 10)")
    p.add_argument(
        "--samples-per-message", type=int, default=10,
        help="readings per telemetry message (default: 10)",
    )  # fmt: skip
    p.add_argument(
        "--time-scale", type=float, default=60.0,
        help="simulated seconds per wall-clock second: faults develop over simulated hours "
        "(default: 60)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="simulator seed (default: 1)")
    p.add_argument(
        "--clean", action="store_true", help="delete the data dir first (a fresh deployment)"
    )
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    # Extra flags for the processes (set by `fogline simulate` from a scenario).
    p.set_defaults(sim_extra=[], edge_extra=[], fog_extra=[])
    p.add_argument(
        "--shutdown-timeout", type=float, default=15.0,
        help="seconds each layer may take to deliver what it holds when stopping (default: 15)",
    )  # fmt: skip
    p.add_argument(
        "--secure", action="store_true",
        help="TLS broker with a password and ACL per process; keys in DATA_DIR/keys",
    )  # fmt: skip
    p.add_argument(
        "--broker", choices=BROKERS, default=None,
        help="the MQTT broker to start: mosquitto, or nats (nats-server's MQTT listener with "
        "JetStream) (default: mosquitto)",
    )  # fmt: skip
    p.add_argument(
        "--broker-host", default=None,
        help="host of an already running MQTT broker to use instead of starting one "
        "(with --broker-port; default: 127.0.0.1)",
    )  # fmt: skip
    p.add_argument(
        "--broker-port", type=int, default=None,
        help="port of an already running MQTT broker to use; no broker is started or stopped",
    )  # fmt: skip
    p.add_argument(
        "--topology", choices=TOPOLOGIES, default="single",
        help="single: one broker for every process; sites: one Mosquitto per site (its fog, "
        "edges and simulator) bridged to a cloud Mosquitto (the cloud sink) (default: single)",
    )  # fmt: skip
    p.add_argument(
        "--sites", type=int, default=None,
        help=f"with --topology sites: how many sites share the edges and devices "
        f"(default: {DEFAULT_SITES})",
    )  # fmt: skip


def check_broker_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the broker flags of `fogline up`, or None."""
    kind = getattr(args, "broker", None)
    port = getattr(args, "broker_port", None)
    secure = bool(getattr(args, "secure", False))
    if getattr(args, "broker_host", None) is not None and port is None:
        return "--broker-host needs --broker-port (the port of the running broker)"
    if port is not None:
        if not 1 <= port <= 65535:
            return f"--broker-port {port} is not a TCP port"
        if kind is not None:
            return "--broker names a broker to start; with --broker-port none is started"
        if secure:
            return "--secure starts its own broker with a login per process; drop --broker-port"
    if kind == "nats" and secure:
        return (
            "--secure is for Mosquitto only (its TLS listener, password file and ACL are "
            "rendered from mosquitto/secure.conf.tmpl); use --broker mosquitto"
        )
    return None


def check_topology_args(args: argparse.Namespace) -> str | None:
    """What is wrong with `--topology` and `--sites` (and the flags they exclude), or None."""
    sites = getattr(args, "sites", None)
    if getattr(args, "topology", None) != "sites":
        return "--sites needs --topology sites" if sites is not None else None
    if getattr(args, "secure", False):
        return (
            "--topology sites does not support --secure: the bridges would need a TLS login of "
            "their own on the cloud broker; use --topology single"
        )
    if getattr(args, "broker_port", None) is not None:
        return (
            "--topology sites starts its own brokers (one per site and the cloud's); "
            "drop --broker-port"
        )
    if getattr(args, "broker", None) not in (None, "mosquitto"):
        return (
            "--topology sites bridges Mosquitto brokers (mosquitto/site.conf.tmpl); "
            "use --broker mosquitto"
        )
    count = DEFAULT_SITES if sites is None else sites
    try:
        split_sites(args.devices, args.edges, count)
    except ValueError as exc:
        return f"--topology sites --sites {count}: {exc}"
    return None


def topology_sites(args: argparse.Namespace) -> list[Site]:
    """The sites of a run: one holding every edge and device unless `--topology sites`."""
    if getattr(args, "topology", None) == "sites":
        count = getattr(args, "sites", None)
        return split_sites(args.devices, args.edges, DEFAULT_SITES if count is None else count)
    return [Site(index=0, first_edge=0, edges=args.edges, first_device=0, devices=args.devices)]


def prepare_keys(folder: Path, names: list[str]) -> None:
    """Make the CA if needed, and issue the broker and `names` unless valid for a day more."""
    keys.init(folder)
    soon = dt.datetime.now(dt.UTC) + RENEW_BEFORE
    for name in [keys.BROKER, *names]:
        role = keys.role_from_name(name)
        try:
            cred = keys.credential(folder, name)
            if cred.role == role and cred.not_after > soon and cred.password_file.is_file():
                continue
        except keys.KeysError:
            pass
        keys.issue(folder, name, role=role)
        log.info("issued %s (%s) in %s", name, role, folder)


class Pipeline:
    """Broker(s) + cloud sink + fog(s) + edges + simulator(s) under one supervisor.

    `--topology single`: one broker for everything. `--topology sites`: the cloud sink on a cloud
    broker, each site's fog, edges and simulator on the site's broker, bridged to the cloud's.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_dir: Path = args.data_dir.resolve()
        self.topics = Topics()
        self.secure = bool(getattr(args, "secure", False))
        self.keys_dir = self.data_dir / "keys"
        problem = check_broker_args(args)
        if problem:
            raise ConfigError("broker", problem)
        problem = check_topology_args(args)
        if problem:
            raise ConfigError("topology", problem)
        self.bridged = getattr(args, "topology", None) == "sites"
        self.sites = topology_sites(args)
        self.edges = [e for site in self.sites for e in site.edge_ids]
        #: The broker of each site by site name (`--topology sites`; started by `start`).
        self.site_brokers: dict[str, Broker] = {}
        kind = getattr(args, "broker", None) or "mosquitto"
        #: None when the processes use an already running broker (`--broker-port`).
        self.broker: Broker | None
        if getattr(args, "broker_port", None) is not None:
            self.broker = None
        elif kind == "nats":
            self.broker = NatsBroker(data_dir=self.data_dir / "broker")
        elif self.secure:
            prepare_keys(self.keys_dir, [f"cloud-{CLOUD}", f"fog-{FOG}", f"device-sim-{SIM}",
                                         *[f"edge-{e}" for e in self.edges], MONITOR])  # fmt: skip
            self.broker = Broker(
                data_dir=self.data_dir / "broker",
                template="secure",
                extra={"keys_dir": str(self.keys_dir), "topic_root": self.topics.root},
            )
        else:
            self.broker = Broker(data_dir=self.data_dir / "broker")
        self.sup = Supervisor(run_dir=self.data_dir / "run", log_dir=self.data_dir / "logs")
        self.stop_requested = threading.Event()
        self.fast_stop = threading.Event()
        self.monitor: Monitor | None = None
        self.timing: dict[str, float] = {}
        self._t0 = 0.0

    @property
    def broker_host(self) -> str:
        """The host the processes connect to."""
        if self.broker is None:
            return str(self.args.broker_host or "127.0.0.1")
        return self.broker.host

    @property
    def broker_port(self) -> int:
        """The MQTT port the processes connect to (known once the broker has started)."""
        return int(self.args.broker_port) if self.broker is None else self.broker.port

    @property
    def broker_url(self) -> str:
        """`mqtt://host:port` of the broker in use."""
        if self.broker is not None:
            return self.broker.url
        host = f"[{self.broker_host}]" if ":" in self.broker_host else self.broker_host
        return f"mqtt://{host}:{self.broker_port}"

    def _address(self, site: Site | None) -> tuple[str, int]:
        """Host and port of the broker the processes of `site` use (the cloud's for None)."""
        broker = self.site_brokers.get(site.name) if site is not None else None
        if broker is None:
            return self.broker_host, self.broker_port
        return broker.host, broker.port

    def _argv(self, module: str, ident: str, *extra: str, site: Site | None = None) -> list[str]:
        host, port = self._address(site)
        return [
            sys.executable, "-m", module, "--id", ident, "--broker-host", host,
            "--broker-port", str(port), "--topic-root", self.topics.root,
            "--data-dir", str(self.data_dir),
            "--metrics-interval", str(CHILD_METRICS_INTERVAL),
            "--shutdown-timeout", str(self.args.shutdown_timeout), *self._login(module, ident),
            *extra,
        ]  # fmt: skip

    def _login(self, module: str, ident: str) -> list[str]:
        """TLS and login flags of a process in secure mode (file paths, never a password)."""
        if not self.secure:
            return []
        role = {"cloud_sink": "cloud", "fog_aggregator": "fog", "edge_agent": "edge"}.get(
            module, "device-sim"
        )
        cred = keys.credential(self.keys_dir, f"{role}-{ident}")
        return client_flags(cred, self.keys_dir / "ca.crt")

    def _model_updates(self, fog: str = FOG) -> tuple[list[str], list[str]]:
        """Flags that let `fog` sign model updates and the edges check them: the root signing
        key and a delegation for the fog in DATA_DIR/keys, made on first use."""
        keys.init(self.keys_dir)
        try:
            _, delegation = signing.load_signer(self.keys_dir, fog)
            fresh = delegation.expires > time.time() + 86400
        except keys.KeysError:
            fresh = False
        if not fresh:
            root = signing.load_root_private(self.keys_dir / "signing.key")
            key, delegation = signing.delegate(
                root, fog, sites=["*"], models=["*"], expires=time.time() + 90 * 86400
            )
            signing.write_signer(self.keys_dir, fog, key, delegation)
        return (
            ["--signing-dir", str(self.keys_dir)],
            ["--ota-root-key", str(self.keys_dir / "signing.pub")],
        )

    def start(self) -> None:
        """Start the broker(s) (unless one is given), then the layers from the cloud down."""
        run = self.data_dir / "run"
        run.mkdir(parents=True, exist_ok=True)
        if self.broker is not None:
            self.broker.start()
            (run / "broker.pid").write_text(f"{self.broker.pid}\n")
        (run / "broker.port").write_text(f"{self.broker_port}\n")
        if self.bridged:
            # After the cloud broker, so that each bridge connects at once.
            for site in self.sites:
                broker = self.site_brokers[site.name] = site_broker(
                    data_dir=self.data_dir, site=site, cloud_host=self.broker_host,
                    cloud_port=self.broker_port, topics=self.topics,
                )  # fmt: skip
                broker.start()
                (run / f"broker-{site.name}.pid").write_text(f"{broker.pid}\n")
                (run / f"broker-{site.name}.port").write_text(f"{broker.port}\n")
        # On the cloud broker: with sites, the bridges bring every process's status and metrics.
        monitor = Monitor(host=self.broker_host, port=self.broker_port, topics=self.topics)
        if self.secure:
            me = keys.credential(self.keys_dir, MONITOR)
            apply_client_security(
                monitor.client, ca=self.keys_dir / "ca.crt", cert=me.cert, key=me.key,
                username=me.name, password_file=me.password_file,
            )  # fmt: skip
        self.monitor = monitor.start()
        a = self.args
        self.sup.add(f"cloud-{CLOUD}", self._argv("cloud_sink", CLOUD))
        fog_extra = getattr(self.args, "fog_extra", [])
        for site in self.sites:
            ota_fog, ota_edge = self._model_updates(site.fog)
            self.sup.add(
                f"fog-{site.fog}",
                self._argv(
                    "fog_aggregator", site.fog, "--cloud-id", CLOUD, *ota_fog, *fog_extra,
                    site=site,
                ),
            )  # fmt: skip
            for e in site.edge_ids:
                self.sup.add(
                    f"edge-{e}",
                    self._argv(
                        "edge_agent", e, "--fog-id", site.fog, *ota_edge, *self.args.edge_extra,
                        site=site,
                    ),
                )  # fmt: skip
        self._wait_online(
            [("cloud", CLOUD), *[("fog", s.fog) for s in self.sites],
             *[("edge", e) for e in self.edges]]
        )  # fmt: skip
        for site in self.sites:
            # A site's simulator serves the site's block of the fleet: devices keep their
            # numbers (and machines) whichever simulator runs them.
            block = (
                ["--first-device", str(site.first_device), "--first-edge", str(site.first_edge)]
                if self.bridged
                else []
            )
            self.sup.add(
                f"device-sim-{site.sim}",
                self._argv(
                    "device_sim", site.sim, "--devices", str(site.devices),
                    "--edges", str(site.edges), *block,
                    "--rate", str(a.rate), "--samples-per-message", str(a.samples_per_message),
                    "--time-scale", str(a.time_scale), "--seed", str(a.seed),
                    *a.sim_extra, site=site,
                ),
            )  # fmt: skip
        if self.bridged:
            where = "; ".join(
                f"{s.name} {self.site_brokers[s.name].url} ({s.fog}, {s.edges} edges, "
                f"{s.devices} devices)"
                for s in self.sites
            )
            say(
                f"fogline up: cloud broker {self.broker_url}, {len(self.sites)} sites bridged to "
                f"it: {where}; data in {self.data_dir}"
            )
            return
        say(
            f"fogline up: {self._broker_name()} {self.broker_url}, {a.devices} devices, "
            f"{len(self.edges)} edges; data in {self.data_dir}"
        )

    def _broker_name(self) -> str:
        if self.broker is None:
            return "external broker"
        return "NATS broker" if isinstance(self.broker, NatsBroker) else "broker"

    def _wait_online(self, who: list[tuple[str, str]], timeout: float = 20.0) -> None:
        """Wait until every listed process reports `online` (receivers subscribe before data)."""
        assert self.monitor is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            seen = self.monitor.snapshot()
            if all(seen.get(k) is not None and seen[k].state == "online" for k in who):
                return
            for note in self.sup.poll():
                say(f"\nfogline up: {note}")
            time.sleep(0.05)
        missing = [f"{r}-{i}" for r, i in who if self.monitor.snapshot().get((r, i)) is None]
        if missing:
            log.warning(
                "not online after %.0fs: %s (see %s)",
                timeout,
                ", ".join(missing),
                self.data_dir / "logs",
            )

    def run(self) -> dict[str, Any]:
        """Run for the duration (or until Ctrl-C), stop in order and return the report."""
        try:
            self.start()
        except BaseException:
            # A broker or process that failed to start: stop whatever did start.
            self.fast_stop.set()
            self.shutdown()
            raise
        t0 = time.monotonic()
        self._t0 = t0
        progress = Progress(self.monitor, self.sup, self.args.duration)  # type: ignore[arg-type]
        try:
            while not self.stop_requested.is_set():
                if self.args.duration and time.monotonic() - t0 >= self.args.duration:
                    break
                for note in self.sup.poll():
                    progress.note(note)
                progress.tick(time.monotonic() - t0)
                self.stop_requested.wait(0.2)
        finally:
            progress.end()
            self.shutdown()
        return build_report(self.data_dir)

    def _ledger_by_edge(self) -> dict[str, int]:
        """Readings produced per edge, from the ledgers of this run's simulators."""
        out: dict[str, int] = {}
        for site in self.sites:
            path = self.data_dir / f"device-sim-{site.sim}" / "ledger.db"
            if not path.exists():
                continue
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                for edge, n in conn.execute("SELECT edge, sum(produced) FROM ledger GROUP BY edge"):
                    out[edge] = out.get(edge, 0) + int(n)
            finally:
                conn.close()
        return out

    def _wait_edges_caught_up(self) -> None:
        """After the simulator stops, wait until every edge has taken every reading produced."""
        assert self.monitor is not None
        target = self._ledger_by_edge()
        deadline = time.monotonic() + EDGE_CATCH_UP
        while time.monotonic() < deadline and not self.fast_stop.is_set():
            behind = {
                e: n for e, n in target.items()
                if (self.monitor.gauge("edge", e, "position") or 0) < n
            }  # fmt: skip
            if not behind:
                return
            for note in self.sup.poll():
                say(f"fogline up: {note}")
            time.sleep(0.1)
        log.warning("edges still behind the ledger after %.0fs: %s", EDGE_CATCH_UP, behind)

    def shutdown(self) -> None:
        """Stop in order: devices, then each layer once it has delivered what it holds."""
        t = self.args.shutdown_timeout + 5.0
        sim = [n for n in self.sup.children if n.startswith("device-sim-")]
        edges = [n for n in self.sup.children if n.startswith("edge-")]
        fogs = [n for n in self.sup.children if n.startswith("fog-")]
        cloud = [n for n in self.sup.children if n.startswith("cloud-")]
        try:
            if self.fast_stop.is_set():
                self.sup.stop_all(timeout=5.0)
            else:
                say("fogline up: stopping devices")
                self.sup.stop(sim, timeout=t)
                stopped = time.monotonic()
                self._wait_edges_caught_up()
                self.timing = {
                    "devices_ran": round(stopped - self._t0, 3),
                    "edges_caught_up_after": round(time.monotonic() - stopped, 3),
                }
                say("fogline up: draining edges -> fog -> cloud")
                self.sup.stop(edges, timeout=t)
                self.sup.stop(fogs, timeout=t)
                self.sup.stop(cloud, timeout=t)
        finally:
            if self.monitor is not None:
                self.monitor.stop()
            for broker in self.site_brokers.values():
                broker.stop()
            if self.broker is not None:
                self.broker.stop()
            names = ["broker", *[f"broker-{site}" for site in self.site_brokers]]
            for name in names:
                for suffix in (".pid", ".port"):
                    (self.data_dir / "run" / f"{name}{suffix}").unlink(missing_ok=True)


class Progress:
    """One live line: readings/s per layer, outbox backlog, restarts."""

    def __init__(self, monitor: Monitor, sup: Supervisor, duration: float = 0.0) -> None:
        self.monitor = monitor
        self.sup = sup
        self.duration = duration
        self.tty = sys.stderr.isatty()
        self.last: tuple[float, list[float]] | None = None
        self.seen: dict[tuple[str, str], tuple[float, float]] = {}
        self.next_print = 0.0
        self.width = 0

    def _totals(self) -> list[float]:
        """Cumulative totals per layer; a restarted process's counters start again at 0."""
        keys = [("device-sim", "readings"), ("edge", "readings_in"), ("fog", "readings"),
                ("cloud", "stored.readings")]  # fmt: skip
        out = []
        for role, counter in keys:
            total = 0.0
            for ident, value in self.monitor.counters(role, counter).items():
                prev_raw, prev_sum = self.seen.get((role, ident), (0.0, 0.0))
                grown = value - prev_raw if value >= prev_raw else value
                self.seen[(role, ident)] = (value, prev_sum + grown)
                total += prev_sum + grown
            out.append(total)
        return out

    def tick(self, elapsed: float) -> None:
        """Refresh the line (every second on a terminal, every 5 s otherwise)."""
        if elapsed < self.next_print:
            return
        self.next_print = elapsed + (1.0 if self.tty else 5.0)
        now, totals = time.monotonic(), self._totals()
        if self.last is None:
            self.last = (now, totals)
            return
        dt = max(1e-6, now - self.last[0])
        rates = [(b - a) / dt for a, b in zip(self.last[1], totals, strict=True)]
        self.last = (now, totals)
        backlog = int(
            self.monitor.total("edge", "outbox_records", gauge=True)
            + self.monitor.total("fog", "outbox_records", gauge=True)
        )
        restarts = sum(self.sup.restarts().values())
        done = bar(elapsed, self.duration, 12) + " " if self.duration else ""
        line = (
            f"{done}[{elapsed:5.0f}s] readings/s  device {rates[0]:7.0f}  edge {rates[1]:7.0f}  "
            f"fog {rates[2]:7.0f}  cloud {rates[3]:7.0f} | backlog {backlog} records"
            f" | stored {int(totals[3])} | restarts {restarts}"
        )
        if self.tty:
            say("\r" + line.ljust(self.width), end="")
            self.width = len(line)
        else:
            say(line)

    def note(self, text: str) -> None:
        """Print a one-off message without garbling the live line."""
        say(("\n" if self.tty and self.width else "") + f"fogline up: {text}")
        self.width = 0

    def end(self) -> None:
        """Finish the live line."""
        if self.tty and self.width:
            say()


def run(args: argparse.Namespace, *, quiet: bool = False) -> int:
    """Entry of `fogline up`; returns the exit status (1 when readings are unaccounted).

    With `quiet` the report is only written to `report.json`, not printed.
    """
    if args.devices < 1 or args.edges < 1 or args.duration < 0:
        print("fogline up: --devices and --edges must be >= 1, --duration >= 0", file=sys.stderr)
        return 2
    problem = check_broker_args(args) or check_topology_args(args)
    if problem:
        print(f"fogline up: {problem}", file=sys.stderr)
        return 2
    if args.clean and args.data_dir.exists():
        shutil.rmtree(args.data_dir)
    pipeline = Pipeline(args)

    def on_signal(signum: int, _frame: Any) -> None:
        if pipeline.stop_requested.is_set():
            pipeline.fast_stop.set()
            say("\nfogline up: stopping now")
        else:
            pipeline.stop_requested.set()
            say("\nfogline up: stopping in order (Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rep = pipeline.run()
    restarts = pipeline.sup.restarts()
    rep["restarts"] = restarts
    rep["timing"] = pipeline.timing
    if args.json and not quiet:
        print(json.dumps(rep, indent=2))
    elif not quiet:
        print(format_report(rep))
        if restarts:
            print("restarts     " + ", ".join(f"{k} {v}" for k, v in restarts.items()))
    (args.data_dir / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    return 0 if rep["unaccounted"] == 0 else 1
