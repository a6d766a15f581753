"""`brokers`: the same pipeline and load on NATS's MQTT listener against Mosquitto, in one run.

Each run is `fogline up --broker {mosquitto,nats} --json` with 1,000 devices and 2 edges; the
two brokers alternate at every rate (the first one at a rate changes from rate to rate), so a
slow spell of the shared machine does not fall on one broker only. Mosquitto is the baseline.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import heading
from fogline.nats import find_nats_server, server_version
from fogline.progress import bar

BROKERS = ("mosquitto", "nats")
DEVICES = 1000
EDGES = 2
SAMPLES = 10


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process, from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(broker: str, rate: float, duration: float) -> dict[str, Any]:
    """One `fogline up --broker BROKER`: readings/s end to end, custody, CPU of all and broker."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        up = subprocess.Popen(
            [sys.executable, "-m", "fogline.cli", "up", "--json", "--data-dir", tmp,
             "--broker", broker, "--devices", str(DEVICES), "--edges", str(EDGES),
             "--rate", str(rate), "--samples-per-message", str(SAMPLES),
             "--duration", str(duration)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        broker_cpu = 0.0
        pid_file = data / "run" / "broker.pid"
        try:
            # The broker's CPU: the last sample before it stops (it is not our child).
            end = time.monotonic() + duration * 6 + 120
            while up.poll() is None and time.monotonic() < end:
                try:
                    pid = int(pid_file.read_text())
                except (OSError, ValueError):
                    pid = 0
                cpu = _cpu_seconds(pid) if pid else None
                broker_cpu = cpu if cpu is not None else broker_cpu
                time.sleep(0.2)
            up.wait(timeout=60)
        finally:
            if up.poll() is None:
                up.terminate()
                up.wait(timeout=60)
        rep = json.loads((data / "report.json").read_text())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_all = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    t = rep["timing"]
    span = t["devices_ran"] + t["edges_caught_up_after"]
    produced = max(1, rep["produced"])
    return {
        "broker": broker,
        "asked": DEVICES * rate,
        "produced": rep["produced"],
        "readings_per_s": rep["produced"] / span,
        "caught_up_after": t["edges_caught_up_after"],
        "unaccounted": rep["unaccounted"],
        "duplicates": rep["duplicates"],
        "dropped": sum(rep["dropped"].values()),
        "exit": up.returncode,
        "cpu_s_per_million": cpu_all / produced * 1e6,
        "broker_cpu_s_per_million": broker_cpu / produced * 1e6,
        # The same rule as the e2e benchmark: every reading accounted, the asked rate delivered
        # (a broker that falls behind stretches the run) and the edges kept pace.
        "sustained": rep["unaccounted"] == 0
        and rep["duplicates"] == 0
        and rep["produced"] / span >= 0.95 * DEVICES * rate
        and t["edges_caught_up_after"] < 2.0,
    }


def run(quick: bool) -> dict[str, Any]:
    """Both brokers at each rate of a ladder, alternating which one goes first."""
    find_nats_server()  # a clear error (what to install) before any run
    duration = 10.0 if quick else 20.0
    ladder = [20.0, 40.0] if quick else [20.0, 40.0, 60.0]
    runs: list[dict[str, Any]] = []
    total = len(ladder) * len(BROKERS)
    for i, rate in enumerate(ladder):
        order = BROKERS if i % 2 == 0 else tuple(reversed(BROKERS))
        for broker in order:
            r = one_run(broker, rate, duration)
            runs.append(r)
            print(
                f"  {bar(len(runs), total, 12)} {broker:<9} {DEVICES} devices x {rate:g}/s: "
                f"{r['readings_per_s']:,.0f} readings/s, unaccounted {r['unaccounted']}, "
                f"duplicates {r['duplicates']}, CPU {r['cpu_s_per_million']:.1f} s/M "
                f"(broker {r['broker_cpu_s_per_million']:.1f}), sustained {r['sustained']}",
                flush=True,
            )
    version = server_version(find_nats_server())
    return {
        "runs": runs,
        "duration": duration,
        "nats_version": ".".join(map(str, version)) if version else "?",
    }


def render(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section comparing the brokers."""
    by = {(r["broker"], r["asked"]): r for r in res["runs"]}
    asked = sorted({r["asked"] for r in res["runs"]})
    lines = [
        *heading(
            "brokers: the pipeline on NATS (MQTT listener, JetStream) against Mosquitto",
            command,
            f", nats-server {res['nats_version']}",
        ),
        "| asked readings/s | broker | produced | through edge decision, readings/s | vs "
        "Mosquitto | edges caught up after stop | unaccounted | duplicates | dropped | "
        "CPU s per million readings (all) | of which the broker | sustained |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for a in asked:
        base = by.get(("mosquitto", a))
        for broker in BROKERS:
            r = by.get((broker, a))
            if r is None:
                continue
            ratio = f"{r['readings_per_s'] / base['readings_per_s']:.2f}" if base else "-"
            lines.append(
                f"| {a:,.0f} | {broker} | {r['produced']:,} | {r['readings_per_s']:,.0f} | "
                f"{ratio} | {r['caught_up_after']:.1f} s | {r['unaccounted']} | "
                f"{r['duplicates']} | {r['dropped']} | {r['cpu_s_per_million']:.1f} | "
                f"{r['broker_cpu_s_per_million']:.1f} | {'yes' if r['sustained'] else 'no'} |"
            )

    def best(broker: str) -> str:
        ok = [r for r in res["runs"] if r["broker"] == broker and r["sustained"]]
        if not ok:
            return f"{broker}: no rate sustained"
        top = max(ok, key=lambda r: r["readings_per_s"])
        return f"{broker} **{top['readings_per_s']:,.0f} readings/s**"

    lines += [
        "",
        f"Highest sustained rate (every reading accounted, at least 95% of the asked rate "
        f"delivered, edges within 2 s of the devices): {best('mosquitto')}; {best('nats')}.",
        "",
        f"Each row is one `fogline up --broker BROKER` run: {DEVICES:,} devices, {EDGES} edges, "
        f"{SAMPLES} readings per message, {res['duration']:g} s of telemetry, the brokers "
        "alternating. CPU (all) is every process of the run including the broker; the broker's "
        "share is its last /proc sample before it stopped. NATS stores every QoS 1 message for "
        "a subscriber in a JetStream file stream (`$MQTT_msgs`) before it acknowledges it.",
    ]
    return "\n".join(lines) + "\n"
