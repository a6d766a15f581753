"""`latency`: device publish -> edge decision and device publish -> cloud commit, in HDR
histograms, at 50 % and 90 % of the sustained maximum.

Each process keeps its own HDR histogram and ships it in its metrics (`fogline.latency`); the
benchmark listens to the metrics topics during a `fogline up` run and merges the last histogram
of every edge (decisions) and of the cloud sink (commits of events). The maximum is the best
sustained rate of a short ladder measured in the same run. Every process shares this machine's
clock, so publish and commit times compare directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.common import heading, judge_up_run
from fogline.codec import DecodeError, decode
from fogline.latency import Latency
from fogline.progress import bar

DEVICES, EDGES = 1000, 2
#: (readings per message, ladder of readings/s per device for the sustained maximum)
SERIES = ((10, (20.0, 60.0, 80.0, 100.0)), (50, (100.0, 200.0, 300.0, 400.0)))
QUICK = ((10, (20.0, 40.0)), (50, (100.0,)))
KINDS = (("decision", "edge"), ("commit", "cloud"))


class _Metrics:
    """The last metrics gauges of every process of a broker (reconnecting until stopped)."""

    def __init__(self, port_file: Path) -> None:
        self.last: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._port_file = port_file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self._port_file.exists():
            time.sleep(0.1)
        if self._stop.is_set():
            return
        port = int(self._port_file.read_text())
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-latency")
        client.on_connect = lambda c, *_: c.subscribe("fl/v1/metrics/#", qos=0)
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 1)
        client.connect_async("127.0.0.1", port)
        client.loop_start()
        self._stop.wait()
        client.loop_stop()
        client.disconnect()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            env = decode(bytes(msg.payload), expect="metrics")
        except DecodeError:
            return
        role, ident = msg.topic.split("/")[-2:]
        with self._lock:
            self.last[(role, ident)] = dict(env.body.get("gauges") or {})

    def stop(self) -> dict[tuple[str, str], dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            return dict(self.last)


def one_run(rate: float, duration: float, samples: int) -> dict[str, Any]:
    """`fogline up` at `rate` readings/s per device; its report and merged latency histograms."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        metrics = _Metrics(data / "run" / "broker.port")
        proc = subprocess.run(
            [sys.executable, "-m", "fogline.cli", "up", "--json", "--data-dir", tmp,
             "--devices", str(DEVICES), "--edges", str(EDGES), "--rate", str(rate),
             "--samples-per-message", str(samples), "--duration", str(duration)],
            capture_output=True, text=True, timeout=duration * 6 + 120,
        )  # fmt: skip
        last = metrics.stop()
        rep = json.loads((data / "report.json").read_text())
    out = {**judge_up_run(rep, DEVICES, rate), "exit": proc.returncode}
    for kind, role in KINDS:
        encoded = [
            g[f"latency.{kind}"]
            for (r, _), g in last.items()
            if r == role and isinstance(g.get(f"latency.{kind}"), str)
        ]
        hist = Latency.merged(encoded)
        out[kind] = {
            "count": hist.count,
            **{k: hist.percentile_ms(p) for k, p in (("p50", 50), ("p99", 99), ("p999", 99.9))},
        }
    return out


def run(quick: bool) -> dict[str, Any]:
    """Per series: a short ladder for the sustained maximum, then 50 % and 90 % of it."""
    duration = 10.0 if quick else 20.0
    series = []
    for samples, ladder in QUICK if quick else SERIES:
        probes = []
        for i, rate in enumerate(ladder):
            r = one_run(rate, duration, samples)
            probes.append(r)
            print(
                f"  {bar(i + 1, len(ladder), 12)} {samples} per message, {r['asked']:,.0f} asked: "
                f"{r['readings_per_s']:,.0f} readings/s, sustained {r['sustained']}",
                flush=True,
            )
        ok = [r for r in probes if r["sustained"]]
        best = max(
            (r["readings_per_s"] for r in ok), default=min(r["readings_per_s"] for r in probes)
        )
        loads = []
        for share in (0.5, 0.9):
            r = one_run(best * share / DEVICES, duration, samples)
            r["share"] = share
            loads.append(r)
            print(
                f"  {samples} per message, {share:.0%} of {best:,.0f}: decision p99 "
                f"{r['decision']['p99']:.1f} ms, commit p99 {r['commit']['p99']:.1f} ms, "
                f"unaccounted {r['unaccounted']}",
                flush=True,
            )
        series.append({"samples": samples, "max": best, "probes": probes, "loads": loads})
    return {"series": series, "duration": duration}


def render(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section of the latencies."""
    lines = [
        *heading("latency: device publish -> edge decision and -> cloud commit", command),
        f"{DEVICES:,} devices, {EDGES} edges, {res['duration']:g} s per run. The load is a share "
        "of the sustained maximum measured in the same run by a short ladder with the same "
        "message size. Decision = the window's score is known at the edge (every window); "
        "commit = the cloud store committed the event (warnings only). HDR histograms merged "
        "over the edges.",
        "",
        "| readings per message | sustained maximum, readings/s | load | readings/s | decision "
        "p50 / p99 / p99.9 ms (windows) | commit p50 / p99 / p99.9 ms (events) | unaccounted |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for ser in res["series"]:
        for r in ser["loads"]:
            d, c = r["decision"], r["commit"]
            lines.append(
                f"| {ser['samples']} | {ser['max']:,.0f} | {r['share']:.0%} | "
                f"{r['readings_per_s']:,.0f} | {d['p50']:.1f} / {d['p99']:.1f} / "
                f"{d['p999']:.1f} ({d['count']:,}) | {c['p50']:.1f} / {c['p99']:.1f} / "
                f"{c['p999']:.1f} ({c['count']:,}) | {r['unaccounted']} |"
            )
    lines += [
        "",
        "Goals: decision p99 <= 20 ms and commit p99 <= 1 s at 50 % load.",
        "",
    ]
    return "\n".join(lines)
