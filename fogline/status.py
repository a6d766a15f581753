"""`fogline status`: a live dashboard of a running pipeline, fed only by its status and metrics
topics (retained `status/{role}/{id}`, periodic `metrics/{role}/{id}`).

`Tracker` is the pure core (no broker, no clock): it keeps each process's retained status and its
recent metrics samples and turns them into a snapshot with rates. `StatusMonitor` feeds it from
MQTT, `render()` draws a snapshot with rich, and `run()` is the command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from fogline.codec import decode
from fogline.errors import DecodeError, FoglineError
from fogline.monitor import Monitor
from fogline.topics import DEFAULT_ROOT, Topics

ROLES = ("device-sim", "edge", "fog", "cloud")
# The counter that says how many readings a layer has handled.
READINGS = {
    "device-sim": "readings",
    "edge": "readings_in",
    "fog": "readings",
    "cloud": "stored.readings",
}
OUTBOX_ROLES = ("edge", "fog")
OUTBOX_GAUGES = ("outbox_records", "outbox_bytes", "outbox_age")
RATE_WINDOW = 10.0  # seconds of samples (process uptime) a rate is measured over
DEFAULT_INTERVAL = 2.0  # metrics interval assumed until two samples show the real one
STALE_AFTER = (
    5.0  # seconds without metrics (at least 3 intervals) before an online process is stale
)


class StatusError(FoglineError):
    """The dashboard cannot follow the pipeline: the broker at `address` cannot be reached."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(message)
        self.address = address


@dataclass
class Sample:
    """One metrics message: when it came (our clock), the process's uptime and its figures."""

    at: float
    uptime: float
    counters: dict[str, float]
    gauges: dict[str, Any]


@dataclass
class Proc:
    """What is known of one process."""

    role: str
    ident: str
    state: str = "unknown"
    status: dict[str, Any] = field(default_factory=dict)
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=64))
    restarts_seen: int = 0
    first_seen: float = 0.0


def _numbers(d: Any) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in d.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def counter_rate(samples: list[Sample], name: str) -> float | None:
    """Per-second growth of counter `name` over `samples` (oldest first, one incarnation of the
    process); a counter that went down started again from 0 and counts from there.

    Until the samples span half of `RATE_WINDOW`, too little has been seen for a rate: the
    average since the process started (counter / uptime) stands in. Counters grow in steps (a
    simulator round, a summary interval), so the growth is then measured between the first and
    the last sample where the counter moved; once it has not moved for twice its usual step
    time (or moved too little to tell), the plain average over the samples is used, which falls
    to 0.
    """
    if not samples:
        return None
    up = [s.uptime for s in samples]
    span = up[-1] - up[0]
    if span < RATE_WINDOW / 2:
        return samples[-1].counters.get(name, 0.0) / up[-1] if up[-1] > 0 else None
    grown = [0.0]
    for x, y in itertools.pairwise(s.counters.get(name, 0.0) for s in samples):
        grown.append(grown[-1] + (y - x if y >= x else y))
    plain = grown[-1] / span
    moved = [i for i in range(1, len(samples)) if grown[i] != grown[i - 1]]
    if len(moved) < 2:
        return plain
    first, last = moved[0], moved[-1]
    active = up[last] - up[first]
    if active < RATE_WINDOW / 2 or up[-1] - up[last] > 2 * active / (len(moved) - 1):
        return plain
    return (grown[last] - grown[first]) / active


class Tracker:
    """The latest status and recent metrics of every process, and snapshots of them (pure)."""

    def __init__(self) -> None:
        self.procs: dict[tuple[str, str], Proc] = {}
        self._lock = threading.Lock()

    def _proc(self, role: str, ident: str, now: float) -> Proc:
        return self.procs.setdefault((role, ident), Proc(role, ident, first_seen=now))

    def on_status(self, role: str, ident: str, body: dict[str, Any], now: float) -> None:
        """A (retained) status message arrived at `now`."""
        with self._lock:
            p = self._proc(role, ident, now)
            old = p.status.get("started")
            if old is not None and body.get("started") not in (None, old):
                p.samples.clear()  # a new incarnation: its counters start again from 0
                p.restarts_seen += 1
            p.status = dict(body)
            p.state = str(body.get("state", "unknown"))

    def on_metrics(self, role: str, ident: str, body: dict[str, Any], now: float) -> None:
        """A metrics message arrived at `now`."""
        uptime = body.get("uptime")
        uptime = float(uptime) if isinstance(uptime, int | float) else 0.0
        gauges = body.get("gauges")
        sample = Sample(now, uptime, _numbers(body.get("counters")), dict(gauges or {}))
        with self._lock:
            p = self._proc(role, ident, now)
            if p.samples and uptime < p.samples[-1].uptime:
                p.samples.clear()  # restarted (uptime went back): rates restart with it
                p.restarts_seen += 1
            p.samples.append(sample)
            while len(p.samples) > 2 and uptime - p.samples[1].uptime >= RATE_WINDOW:
                p.samples.popleft()

    def snapshot(self, now: float) -> dict[str, Any]:
        """Every process (flow order) with its state, metrics age, figures and rates, and the
        totals per layer."""
        with self._lock:
            procs = [self._describe(p, now) for p in self.procs.values()]
        order = {r: i for i, r in enumerate(ROLES)}
        procs.sort(key=lambda p: (order.get(p["role"], len(ROLES)), p["role"], p["id"]))
        layers = {role: _layer(role, [p for p in procs if p["role"] == role]) for role in ROLES}
        return {"ts": now, "processes": procs, "layers": layers}

    def _describe(self, p: Proc, now: float) -> dict[str, Any]:
        samples = list(p.samples)
        last = samples[-1] if samples else None
        age = now - last.at if last else None
        interval = DEFAULT_INTERVAL
        if len(samples) >= 2:
            interval = (samples[-1].uptime - samples[0].uptime) / (len(samples) - 1)
        silent = age if age is not None else now - p.first_seen
        stale = p.state == "online" and silent > max(STALE_AFTER, 3 * interval)
        live = p.state == "online" and not stale
        counters = last.counters if last else {}
        rates: dict[str, float] = {}
        if live:
            for name in counters:
                r = counter_rate(samples, name)
                if r is not None:
                    rates[name] = round(r, 3)
        readings = READINGS.get(p.role)
        gauges = last.gauges if last else {}
        return {
            "role": p.role,
            "id": p.ident,
            "state": p.state,
            "stale": stale,
            "pid": p.status.get("pid"),
            "version": p.status.get("version"),
            "started": p.status.get("started"),
            "uptime": round(last.uptime, 3) if last else None,
            "metrics_age": round(age, 3) if age is not None else None,
            "restarts_seen": p.restarts_seen,
            "counters": {k: _int_if_whole(v) for k, v in sorted(counters.items())},
            "gauges": dict(sorted(gauges.items())),
            "rates": dict(sorted(rates.items())),
            "readings": _int_if_whole(counters.get(readings, 0.0)) if readings else None,
            "readings_per_s": rates.get(readings) if readings else None,
            "models": _models(p.status, gauges),
            "rollouts": _rollouts(p.status),
        }


def _rollouts(status: dict[str, Any]) -> dict[str, Any]:
    """A fog's model rollouts from its status: per model the version, state, canaries, reason
    and each edge's last answer."""
    given = status.get("rollouts")
    return dict(given) if isinstance(given, dict) else {}


def _int_if_whole(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def _models(status: dict[str, Any], gauges: dict[str, Any]) -> dict[str, str]:
    """Model names a process reports, if any: a `models` map in its status, or string gauges
    named `model.<name>`."""
    out: dict[str, str] = {}
    given = status.get("models")
    if isinstance(given, dict):
        out |= {str(k): str(v) for k, v in given.items()}
    for k, v in gauges.items():
        if k.startswith("model.") and isinstance(v, str):
            out[k.removeprefix("model.")] = v
    return out


def _by_prefix(procs: list[dict[str, Any]], part: str, prefix: str) -> dict[str, float | int]:
    out: dict[str, float] = {}
    for p in procs:
        for k, v in p[part].items():
            if k.startswith(prefix) and isinstance(v, int | float) and not isinstance(v, bool):
                key = k.removeprefix(prefix)
                out[key] = out.get(key, 0.0) + float(v)
    return {k: _int_if_whole(v) for k, v in sorted(out.items())}


def _layer(role: str, procs: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of one layer over its processes."""
    rates = [p["readings_per_s"] for p in procs if p["readings_per_s"] is not None]
    out: dict[str, Any] = {
        "processes": len(procs),
        "online": sum(1 for p in procs if p["state"] == "online"),
        "readings": sum(p["readings"] or 0 for p in procs),
        "readings_per_s": round(sum(rates), 3) if rates else None,
        "rejected": _by_prefix(procs, "counters", "rejected."),
        "evicted": _by_prefix(procs, "counters", "evicted."),
    }
    if role in OUTBOX_ROLES:  # what the online processes hold (None when none is online)
        live = [p["gauges"] for p in procs if p["state"] == "online"]
        for name in ("outbox_records", "outbox_bytes"):
            out[name] = sum(int(g.get(name, 0)) for g in live) if live else None
        out["outbox_age"] = max(float(g.get("outbox_age", 0)) for g in live) if live else None
    if role == "edge":
        out["warnings"] = sum(int(p["counters"].get("records.event", 0)) for p in procs)
        out["decisions"] = _by_prefix(procs, "gauges", "decisions.")
    if role == "fog":
        out["escalations"] = _by_prefix(procs, "counters", "escalations.")
    if role == "cloud":
        out["stored"] = _by_prefix(procs, "counters", "stored.")
    return out


# --------------------------------------------------------------------------- MQTT


class StatusMonitor(Monitor):
    """A `Monitor` that also feeds a `Tracker` and knows whether it is connected."""

    def __init__(self, *, host: str, port: int, topics: Topics) -> None:
        super().__init__(host=host, port=port, topics=topics)
        self.address = f"{host}:{port}"
        self.tracker = Tracker()
        self.connected = threading.Event()
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client: mqtt.Client, *rest: Any) -> None:
        super()._on_connect(client, *rest)
        self.connected.set()

    def _on_disconnect(self, *_: Any) -> None:
        self.connected.clear()

    def _on_message(self, c: mqtt.Client, ud: Any, msg: mqtt.MQTTMessage) -> None:
        super()._on_message(c, ud, msg)
        parts = msg.topic.split("/")
        if len(parts) < 2:
            return
        role, ident = parts[-2], parts[-1]
        try:
            env = decode(bytes(msg.payload))
        except DecodeError:
            return
        if not isinstance(env.body, dict):
            return
        if env.kind == "status":
            self.tracker.on_status(role, ident, env.body, time.time())
        elif env.kind == "metrics":
            self.tracker.on_metrics(role, ident, env.body, time.time())


def check_reachable(host: str, port: int, timeout: float) -> None:
    """Raise `StatusError` unless something accepts TCP connections at `host:port`."""
    address = f"{host}:{port}"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StatusError(address, f"no MQTT broker reachable at {address} ({reason})") from exc


def collect(monitor: StatusMonitor, wait: float) -> dict[str, Any]:
    """Wait up to `wait` seconds for the retained status of every process and a metrics message
    from each online one, then return a snapshot."""
    deadline = time.monotonic() + wait
    if not monitor.connected.wait(max(0.0, wait)):
        raise StatusError(
            monitor.address, f"no MQTT connection to {monitor.address} within {wait:g}s"
        )
    settle = time.monotonic() + min(0.5, wait)  # retained statuses come right after subscribing
    while time.monotonic() < deadline:
        procs = monitor.tracker.snapshot(time.time())["processes"]
        ready = [p for p in procs if p["state"] == "online"]
        if (
            time.monotonic() >= settle
            and procs
            and all(p["metrics_age"] is not None for p in ready)
        ):
            break
        time.sleep(0.05)
    return monitor.tracker.snapshot(time.time())


# --------------------------------------------------------------------------- rendering


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _num(v: float | int | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M{unit}"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k{unit}"
    return f"{v:.0f}{unit}" if float(v).is_integer() or abs(v) >= 100 else f"{v:.1f}{unit}"


def _bytes(v: float | int | None) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if abs(v) < 1024:
            return f"{v:.0f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def _outbox(records: float | None, nbytes: float | None) -> str:
    return "-" if records is None else f"{_num(records)} / {_bytes(nbytes)}"


def _reasons(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_num(v)}" for k, v in d.items() if v) or "-"


STATE_STYLE = {"online": "green", "offline": "bold red", "stopped": "yellow", "unknown": "dim"}
DECISIONS = (
    ("scored", "scored"),
    ("held", "held"),
    ("repeats", "repeats"),
    ("escalated", "escalated"),
    ("answered", "answered"),
    ("unconfirmed", "unconfirmed"),
    ("over_budget", "over budget"),
    ("train_samples", "train"),
)


def _state(p: dict[str, Any]) -> Text:
    if p["stale"]:
        return Text("online, no metrics", style="bold red")
    text = Text(p["state"], style=STATE_STYLE.get(p["state"], ""))
    if p["restarts_seen"]:
        text.append(f", restarted {p['restarts_seen']}x", style="yellow")
    return text


# Shorter headers, and columns left out, when the terminal is narrow.
SHORT = {
    "readings/s": "rdg/s", "readings": "rdgs", "rejected": "rej", "evicted": "evict",
    "rejected, evicted": "rej, evict", "warnings sent": "warn", "escalated": "esc",
    "answered": "ans", "unconfirmed": "unconf", "over budget": "over", "repeats": "rep",
    "metrics": "seen", "online": "up",
}  # fmt: skip
NARROW_DROP = frozenset(("pid", "uptime", "held", "train"))
NARROW = 110  # terminal columns below which the dashboard is compact
LEFT = frozenset(("layer", "process", "state", "edge", "models", "rejected", "evicted",
                  "rejected, evicted", "fog", "model", "version", "canaries", "edges",
                  "reason"))  # fmt: skip


def _table(title: str, rows: list[dict[str, Any]], *, compact: bool) -> Table:
    """A table of `rows` (column -> cell, all rows with the same columns, in order)."""
    t = Table(
        title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False
    )
    cols = [c for c in rows[0] if not (compact and c in NARROW_DROP)]
    for col in cols:
        t.add_column(
            SHORT.get(col, col) if compact else col,
            justify="left" if col in LEFT else "right",
            no_wrap=col not in ("rejected", "evicted", "rejected, evicted"),
        )
    for row in rows:
        t.add_row(*(row[c] for c in cols))
    return t


def _layers_table(layers: dict[str, Any], *, compact: bool) -> Table:
    rows = []
    for role in ROLES:
        lay = layers[role]
        outbox = role in OUTBOX_ROLES
        rejected = _reasons(lay["rejected"])
        if role == "cloud" and lay["stored"].get("rejected"):
            rejected = f"{rejected}; records {_num(lay['stored']['rejected'])}"
        rows.append(
            {
                "layer": role,
                "online": f"{lay['online']}/{lay['processes']}",
                "readings/s": _num(lay["readings_per_s"]),
                "readings": _num(lay["readings"]),
                "outbox": _outbox(lay["outbox_records"], lay["outbox_bytes"]) if outbox else "",
                "oldest": _age(lay["outbox_age"]) if outbox else "",
                "rejected": rejected,
                "evicted": _reasons(lay["evicted"]) if outbox else "",
            }
        )
    return _table("layers", rows, compact=compact)


def _processes_table(procs: list[dict[str, Any]], *, compact: bool) -> Table:
    rows = []
    for p in procs:
        g = p["gauges"]
        outbox = p["role"] in OUTBOX_ROLES and bool(g) and p["state"] == "online"
        age = p["metrics_age"]
        bad = {k: v for k, v in p["counters"].items() if k.startswith(("rejected.", "evicted."))}
        rows.append(
            {
                "process": f"{p['role']}-{p['id']}",
                "state": _state(p),
                "pid": str(p["pid"] or "-"),
                "uptime": _age(p["uptime"]),
                "metrics": "-" if age is None else _age(age) + ("" if compact else " ago"),
                "readings/s": _num(p["readings_per_s"]) if p["state"] == "online" else "-",
                "outbox": _outbox(g.get("outbox_records"), g.get("outbox_bytes")) if outbox else "",
                "oldest": _age(g.get("outbox_age")) if outbox else "",
                "rejected, evicted": _reasons(bad),
            }
        )
    if not rows:
        rows = [{"process": "(nothing seen yet)"}]
    return _table("processes", rows, compact=compact)


def _edges_table(edges: list[dict[str, Any]], *, compact: bool) -> Table:
    models = any(p["models"] for p in edges)
    rows = []
    for p in edges:
        d = {k.removeprefix("decisions."): v for k, v in p["gauges"].items()}
        known = any(k.startswith("decisions.") for k in p["gauges"])
        row: dict[str, Any] = {"edge": p["id"]}
        if models:
            row["models"] = ", ".join(f"{k} {v}" for k, v in p["models"].items()) or "-"
        row["warnings sent"] = _num(p["counters"].get("records.event", 0))
        for key, header in DECISIONS:
            row[header] = _num(d.get(key, 0)) if known else "-"
        rows.append(row)
    return _table("edge decisions", rows, compact=compact)


def _rollouts_table(fogs: list[dict[str, Any]], *, compact: bool) -> Table:
    rows = []
    for p in fogs:
        for name, r in sorted(p["rollouts"].items()):
            if not isinstance(r, dict):
                continue
            given = r.get("edges")
            edges: dict[str, Any] = given if isinstance(given, dict) else {}
            answers = ", ".join(
                f"{e} v{a.get('version')} {a.get('status')}"
                + (f" ({a['reason']})" if a.get("reason") else "")
                for e, a in sorted(edges.items())
                if isinstance(a, dict)
            )
            rows.append(
                {
                    "fog": p["id"],
                    "model": name,
                    "version": f"v{r.get('version')}",
                    "state": str(r.get("state")),
                    "canaries": ", ".join(map(str, r.get("canaries") or [])) or "-",
                    "edges": answers or "-",
                    "reason": str(r.get("reason") or "-"),
                }
            )
    return _table("model rollouts", rows, compact=compact)


def render(
    snap: dict[str, Any], *, address: str = "", connected: bool = True, width: int = 120
) -> RenderableType:
    """The dashboard for one snapshot, for a terminal `width` columns wide."""
    compact = width < NARROW
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["ts"]))
    head = Text.assemble(
        ("fogline status", "bold"),
        f"  broker {address}  ",
        ("connected", "green") if connected else ("not connected, retrying", "bold red"),
        f"  {stamp}",
    )
    procs, layers = snap["processes"], snap["layers"]
    parts: list[RenderableType] = [
        head,
        _layers_table(layers, compact=compact),
        _processes_table(procs, compact=compact),
    ]
    edges = [p for p in procs if p["role"] == "edge"]
    if edges:
        parts.append(_edges_table(edges, compact=compact))
    rolling = [p for p in procs if p["role"] == "fog" and p["rollouts"]]
    if rolling:
        parts.append(_rollouts_table(rolling, compact=compact))
    warn = "warn = warnings sent" if compact else "warnings sent"
    foot = Text(
        f"readings/s over the last 10 s (the first 5 s: since each process started); {warn}: the "
        "edges' records.event counter",
        style="dim",
    )
    if layers["fog"]["escalations"]:
        foot.append(f"; fog escalations: {_reasons(layers['fog']['escalations'])}", style="dim")
    parts.append(foot)
    return Group(*parts)


# --------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `fogline status`."""
    p.add_argument(
        "--broker-host", default="127.0.0.1", help="MQTT broker host (default: 127.0.0.1)"
    )
    p.add_argument(
        "--broker-port", type=int, default=None,
        help="MQTT broker port (default: DATA_DIR/run/broker.port with --data-dir, else 1883)",
    )  # fmt: skip
    p.add_argument(
        "--data-dir", type=Path, default=None,
        help="a `fogline up` data dir: take the broker port from its run/broker.port",
    )  # fmt: skip
    p.add_argument(
        "--topic-root",
        default=DEFAULT_ROOT,
        help=f"prefix of every topic (default: {DEFAULT_ROOT})",
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument(
        "--json", action="store_true", help="print the snapshot as JSON (implies --once)"
    )
    p.add_argument(
        "--wait", type=float, default=3.0,
        help="seconds --once waits for statuses and metrics (default: 3)",
    )  # fmt: skip


def _port(args: argparse.Namespace) -> int:
    if args.broker_port is not None:
        return int(args.broker_port)
    if args.data_dir is not None:
        path = args.data_dir / "run" / "broker.port"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise StatusError(
                str(path), f"no broker port in {path} (is `fogline up` running there?)"
            ) from exc
    return 1883


def run(args: argparse.Namespace) -> int:
    """Entry of `fogline status`; exit status 2 when the broker cannot be reached."""
    if args.wait < 0:
        print("fogline status: --wait must be >= 0", file=sys.stderr)
        return 2
    try:
        port = _port(args)
        address = f"{args.broker_host}:{port}"
        check_reachable(args.broker_host, port, timeout=max(0.5, min(args.wait, 3.0)))
        monitor = StatusMonitor(host=args.broker_host, port=port, topics=Topics(args.topic_root))
    except StatusError as exc:
        print(f"fogline status: error: {exc}", file=sys.stderr)
        return 2
    monitor.start()
    try:
        if args.once or args.json:
            try:
                snap = collect(monitor, args.wait)
            except StatusError as exc:
                print(f"fogline status: error: {exc}", file=sys.stderr)
                return 2
            snap = {"broker": address, "topic_root": args.topic_root, **snap}
            if args.json:
                print(json.dumps(snap, indent=2))
            else:
                console = Console()
                console.print(render(snap, address=address, width=console.width))
            return 0
        return _live(monitor, address)
    finally:
        monitor.stop()


def _live(monitor: StatusMonitor, address: str) -> int:
    from rich.live import Live

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    console = Console()

    def frame() -> RenderableType:
        snap = monitor.tracker.snapshot(time.time())
        connected = monitor.connected.is_set()
        return render(snap, address=address, connected=connected, width=console.width)

    try:
        with Live(
            frame(), console=console, refresh_per_second=4, screen=True, redirect_stderr=False
        ) as live:
            while True:
                time.sleep(0.5)
                live.update(frame())
    except KeyboardInterrupt:
        pass
    return 0
