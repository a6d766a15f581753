"""`peer`: Node-RED doing the edge's filter job, against the raw broker and the fogline edge.

Node-RED (installed on first use into ~/.cache/fogline/node-red) runs headless on loopback with
`bench/nodered/flows.json`: MQTT in (the telemetry filter) -> a function node -> MQTT out. The
function node has no msgpack decoder by default, so it reads the readings straight from the raw
buffer (the last key of a telemetry message is `data`, float32 little-endian) and forwards the
message if any |value| exceeds a threshold. The payload is identical for every message of a burst,
so the threshold is set below its largest |value|: every message is forwarded and counted.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from bench.blast import blast
from bench.common import heading
from fogline.broker import Broker, find_free_port
from fogline.codec import Telemetry, decode, encode_telemetry

HERE = Path(__file__).resolve().parent / "nodered"
CACHE = Path(os.environ.get("FOGLINE_CACHE", Path.home() / ".cache" / "fogline")) / "node-red"
SAMPLES = 10
TOPIC_IN = "fl/v1/dev/peer/+/tele"
THRESHOLD = 1.0


def _fields() -> tuple[str, ...]:
    from device_sim.physics import FIELDS

    return tuple(FIELDS)


def _payload(device: str = "d00000", first: int = 0) -> tuple[bytes, np.ndarray]:
    fields = _fields()
    values = np.random.default_rng(0).normal(size=(SAMPLES, len(fields))).astype(np.float32)
    tele = Telemetry(device=device, first=first, t0=time.time(), dt=0.1, fields=fields,
                     values=values)  # fmt: skip
    return encode_telemetry(tele, seq=first, ts=time.time()), values


def ensure_node_red() -> Path:
    """The path of Node-RED's red.js, installing Node-RED into the cache on first use."""
    red = CACHE / "node_modules" / "node-red" / "red.js"
    if red.exists():
        return red
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise RuntimeError("the peer benchmark needs Node.js and npm on PATH")
    CACHE.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "package.json", CACHE / "package.json")
    print(f"  installing Node-RED into {CACHE} (first use)...", flush=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--omit=dev"], cwd=CACHE,
                   check=True, stdout=subprocess.DEVNULL, timeout=600)  # fmt: skip
    if not red.exists():
        raise RuntimeError(f"npm install did not produce {red}")
    return red


def _stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop one process we started: SIGTERM, then SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _spawn(stack: ExitStack, args: list[str], **kw: Any) -> subprocess.Popen[Any]:
    proc = subprocess.Popen(args, **kw)
    stack.callback(_stop, proc)
    return proc


def _burst(port: int, qos: int, topic_pub: str, topic_sub: str, path: Path, n: int,
           idle: float = 5.0) -> tuple[int, float]:  # fmt: skip
    """Publish `n` copies of a file with mosquitto_pub, count what arrives on `topic_sub`.

    Returns (received, seconds from the publisher's start to the last arrival)."""
    with ExitStack() as stack:
        sub = _spawn(stack, ["mosquitto_sub", "-p", str(port), "-q", str(qos), "-t", topic_sub,
                             "-C", str(n), "-F", "x"], stdout=subprocess.PIPE)  # fmt: skip
        time.sleep(0.3)
        t0 = time.perf_counter()
        pub = _spawn(stack, ["mosquitto_pub", "-p", str(port), "-q", str(qos), "-t", topic_pub,
                             "-f", str(path), "--repeat", str(n)])  # fmt: skip
        assert sub.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(sub.stdout, selectors.EVENT_READ)
        got, last = 0, t0
        fd = sub.stdout.fileno()
        while got < n:
            if not sel.select(timeout=idle):
                break  # nothing for `idle` seconds: the rest was lost (QoS 0) or never comes
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            got += chunk.count(b"\n")
            last = time.perf_counter()
        sel.close()
        pub.wait(timeout=60)
    return got, last - t0


def _wait_forwarding(port: int, path: Path, timeout: float = 60.0) -> None:
    """Wait until Node-RED is connected and forwards (probe messages until one comes through)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, _ = _burst(port, 1, "fl/v1/dev/peer/probe/tele", "fl/v1/bench/fwd", path, 1, idle=1.0)
        if got:
            time.sleep(0.5)  # the probe may be followed by a stray duplicate; let it pass
            return
    raise RuntimeError("Node-RED did not forward a probe message within 60 s")


def _node_red_runs(stack: ExitStack, red: Path, port: int, qos: int, path: Path, n: int,
                   repeats: int, tmp: Path) -> list[dict[str, Any]]:  # fmt: skip
    user = tmp / f"nr-userdir-q{qos}"
    user.mkdir()
    flow = (HERE / "flows.json").read_text()
    for key, val in {"__BROKER_PORT__": str(port), "__TOPIC_IN__": TOPIC_IN,
                     "__TOPIC_OUT__": "fl/v1/bench/fwd", "__QOS__": str(qos),
                     "__FLOATS__": str(SAMPLES * len(_fields())),
                     "__THRESHOLD__": repr(THRESHOLD)}.items():  # fmt: skip
        flow = flow.replace(key, val)
    (user / "flows.json").write_text(flow)
    shutil.copy(HERE / "settings.js", user / "settings.js")
    env = dict(os.environ, FOGLINE_NR_PORT=str(find_free_port()))
    log = (tmp / f"node-red-q{qos}.log").open("wb")
    stack.callback(log.close)
    proc = _spawn(stack, ["node", str(red), "--userDir", str(user), "--settings",
                          str(user / "settings.js"), "flows.json"],
                  stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        _wait_forwarding(port, path)
        runs = []
        for _ in range(repeats):
            got, secs = _burst(port, qos, "fl/v1/dev/peer/d00000/tele", "fl/v1/bench/fwd", path, n)
            runs.append({"received": got, "seconds": secs, "msgs_per_s": got / secs})
        return runs
    finally:
        _stop(proc)


class _EdgeWatch:
    """Follows the edge's metrics topic: the latest `readings_in` counter."""

    def __init__(self, port: int, name: str) -> None:
        self.readings_in = -1
        self.changed = threading.Condition()
        # One client id per watcher: two clients with the same id take the session from each
        # other in turn, and the counter would stop moving.
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-peer-watch-{name}"
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("fl/v1/metrics/edge/+", qos=0)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = decode(bytes(msg.payload), expect="metrics").body
        except Exception:
            return
        with self.changed:
            self.readings_in = int(body["counters"].get("readings_in", 0))
            self.changed.notify_all()

    def wait_for(self, target: int, timeout: float) -> float | None:
        """Block until readings_in >= target; returns perf_counter at that moment or None."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.readings_in < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)
        return time.perf_counter()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _distinct(device: str, n: int) -> list[tuple[str, bytes]]:
    """`n` telemetry messages of one device, readings numbered on (a replay would be refused)."""
    topic = f"fl/v1/dev/e0/{device}/tele"
    return [(topic, _payload(device, i * SAMPLES)[0]) for i in range(n)]


def _floor_runs(stack: ExitStack, port: int, qos: int, n: int, repeats: int,
                fogline: bool) -> list[dict[str, Any]]:  # fmt: skip
    """A bare paho subscriber in its own process (`bench.pahofloor`), fed like the edge."""
    runs = []
    for r in range(repeats):
        msgs = _distinct(f"floor{r}", n)
        args = [sys.executable, "-m", "bench.pahofloor", str(port), str(qos), str(n)]
        proc = _spawn(stack, args + (["--fogline"] if fogline else []),
                      stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the paho subscriber did not start")
        t0 = time.monotonic()
        pub_s = blast(port, msgs, qos, client_id=f"bench-floor-pub-q{qos}")
        got_s, last_s = proc.stdout.readline().split()
        proc.wait(timeout=30)
        got, secs = int(got_s), float(last_s) - t0
        runs.append({"received": got, "seconds": secs, "publisher_s": pub_s,
                     "msgs_per_s": got / secs})  # fmt: skip
    return runs


def _edge_runs(stack: ExitStack, port: int, qos: int, n: int, repeats: int,
               tmp: Path) -> list[dict[str, Any]]:  # fmt: skip
    data = tmp / f"edge-q{qos}"
    log = (tmp / f"edge-q{qos}.log").open("wb")
    stack.callback(log.close)
    watch = _EdgeWatch(port, f"q{qos}")
    proc = _spawn(stack, [sys.executable, "-m", "edge_agent", "--detector", "zscore",
                          "--broker-port", str(port), "--data-dir", str(data),
                          "--metrics-interval", "0.1", "--log-level", "WARNING"],
                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        if watch.wait_for(0, 60) is None:
            raise RuntimeError("the edge agent published no metrics within 60 s")
        runs = []
        for r in range(repeats):
            msgs = _distinct(f"q{qos}r{r}", n)
            base = watch.readings_in
            t0 = time.perf_counter()
            pub_s = blast(port, msgs, qos, client_id=f"bench-peer-pub-q{qos}")
            t1 = watch.wait_for(base + n * SAMPLES, 120)
            took = watch.readings_in - base
            if t1 is None:  # QoS 0 may lose messages: wait for the counter to settle
                t1 = time.perf_counter()
            secs = t1 - t0
            runs.append({"received": took // SAMPLES, "seconds": secs, "publisher_s": pub_s,
                         "msgs_per_s": took / SAMPLES / secs})  # fmt: skip
        return runs
    finally:
        _stop(proc, timeout=20)
        watch.close()


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["msgs_per_s"] for r in runs]
    return {
        "msgs_per_s": statistics.median(rates),
        "readings_per_s": statistics.median(rates) * SAMPLES,
        "runs": [round(x) for x in rates],
        "received": [r["received"] for r in runs],
    }


def run(quick: bool) -> dict[str, Any]:
    """Forwarded msg/s of Node-RED, raw broker and fogline edge at QoS 0 and 1 (median of 3)."""
    n = 20_000 if quick else 100_000
    repeats = 3
    red = ensure_node_red()
    node_v = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    nr_v = json.loads((red.parent / "package.json").read_text())["version"]
    payload, values = _payload()
    passes = bool((np.abs(values) > THRESHOLD).any())
    if not passes:
        raise RuntimeError("the benchmark payload would not pass the Node-RED threshold")
    res: dict[str, Any] = {"messages": n, "samples": SAMPLES, "payload_bytes": len(payload),
                           "node": node_v, "node_red": nr_v, "threshold": THRESHOLD,
                           "qos": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        path = tmp / "payload.bin"
        path.write_bytes(payload)
        broker = stack.enter_context(Broker(data_dir=tmp / "broker"))
        for qos in (0, 1):
            raw = []
            for _ in range(repeats):
                got, secs = _burst(broker.port, qos, "bench/raw", "bench/raw", path, n)
                raw.append({"received": got, "seconds": secs, "msgs_per_s": got / secs})
            nr = _node_red_runs(stack, red, broker.port, qos, path, n, repeats, tmp)
            edge = _edge_runs(stack, broker.port, qos, n, repeats, tmp)
            floor = _floor_runs(stack, broker.port, qos, n, repeats, fogline=False)
            floor_fl = _floor_runs(stack, broker.port, qos, n, repeats, fogline=True)
            q: dict[str, Any] = {
                "raw": _median(raw),
                "node_red": _median(nr),
                "edge": _median(edge),
                "paho": _median(floor),
                "paho_fogline": _median(floor_fl),
            }
            q["edge_publisher_s"] = [round(r["publisher_s"], 2) for r in edge]
            res["qos"][str(qos)] = q
            parts = [
                f"{k} {q[k]['msgs_per_s']:,.0f} msg/s (runs {q[k]['runs']}, "
                f"received {q[k]['received']} of {n})"
                for k in ("raw", "node_red", "edge", "paho", "paho_fogline")
            ]
            print(f"  QoS {qos}: " + ", ".join(parts), flush=True)
    print(_table(res), flush=True)
    return res


def _table(res: dict[str, Any]) -> str:
    lines = [
        "| QoS | raw broker msg/s | Node-RED forwarded msg/s | fogline edge ingested msg/s | "
        "edge readings/s | edge / Node-RED | Node-RED / raw | edge / raw | "
        "bare paho subscriber msg/s | same on fogline's client | edge / bare paho |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for qos, q in res["qos"].items():
        raw, nr, edge, paho, paho_fl = (
            q[k]["msgs_per_s"] for k in ("raw", "node_red", "edge", "paho", "paho_fogline")
        )
        lines.append(
            f"| {qos} | {raw:,.0f} | {nr:,.0f} | {edge:,.0f} | {edge * res['samples']:,.0f} | "
            f"{edge / nr:.2f} | {nr / raw:.0%} | {edge / raw:.0%} | {paho:,.0f} | "
            f"{paho_fl:,.0f} | {edge / paho:.2f} |"
        )
    return "\n".join(lines)


def render(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for the Node-RED peer comparison."""
    n = res["messages"]
    lines = [
        *heading(
            "peer: Node-RED doing the edge's filter job, against the fogline edge",
            command,
            f"; Node.js {res['node']}, Node-RED {res['node_red']}",
        ),
        _table(res),
        "",
        f"Each figure: median of 3 bursts of {n:,} telemetry messages of {res['payload_bytes']} "
        f"bytes ({res['samples']} readings x 7 fields, `fogline.codec.encode_telemetry`), timed "
        "from the publisher's start to the last message out; all in one run, one broker.",
        "",
        "- raw broker: `mosquitto_pub -f payload --repeat N` -> `mosquitto_sub -C N`, same QoS.",
        "- Node-RED: headless (`httpAdminRoot: false`, no credentials file, userDir in a temp "
        "folder), flow `bench/nodered/flows.json`: MQTT in (`fl/v1/dev/peer/+/tele`) -> function "
        "node -> MQTT out, counted by `mosquitto_sub`. Node-RED has no msgpack decoder by "
        "default, so the function node reads the 70 float32 readings straight from the raw "
        f"buffer (the payload's last bytes) and forwards if any |value| > {res['threshold']:g}. "
        "The burst's payloads are identical, so every message passes and is forwarded.",
        "- fogline edge: `python -m edge_agent --detector zscore`, ingest counted by its "
        "`readings_in` counter (metrics topic every 0.1 s). The edge does not forward per "
        "message: it decodes and validates each message, windows the readings, decides per "
        "window and sends summaries and events upstream. It gets the same number of messages of "
        "the same shape, but with readings numbered on (identical payloads would be rejected as "
        "replays after the first), encoded before the clock starts and written by "
        "`bench/blast.py` (MQTT packets prepared up front, large socket writes: a publisher "
        "that is not the bottleneck, as `mosquitto_pub` is for the others); publisher seconds "
        "per burst: "
        + "; ".join(f"QoS {k} {v['edge_publisher_s']}" for k, v in res["qos"].items())
        + ".",
        "",
        "- bare paho subscriber: `python -m bench.pahofloor` in its own process, one "
        "callback per message that only counts it (and sends its PUBACK at QoS 1), fed like "
        "the edge: what any Python receiver built on paho-mqtt can reach here, before doing "
        "anything with a message. 'fogline's client' is the same on `fogline.mqttclient` "
        "(socket read in blocks, PUBACKs in batches), the client the edge runs on.",
        "",
        "Messages received (of N) per run: "
        + "; ".join(
            f"QoS {k}: raw {v['raw']['received']}, Node-RED {v['node_red']['received']}, "
            f"edge {v['edge']['received']}, paho {v['paho']['received']}, "
            f"fogline's client {v['paho_fogline']['received']}"
            for k, v in res["qos"].items()
        )
        + ". At QoS 0 a loss ends the count after 5 s without messages.",
    ]
    return "\n".join(lines) + "\n"
