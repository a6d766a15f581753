"""`python -m bench`: run named benchmarks, print a table, update BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import brokers, latency, nodered, ota, sinks
from bench import models as models_bench
from bench.common import heading, judge_up_run
from fogline.broker import Broker
from fogline.codec import Telemetry, encode_telemetry
from fogline.progress import bar

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "BENCHMARKS.md"
from device_sim.physics import FIELDS  # noqa: E402


def _telemetry_payload(samples: int) -> bytes:
    values = np.random.default_rng(0).normal(size=(samples, len(FIELDS))).astype(np.float32)
    tele = Telemetry(device="d00000", first=0, t0=time.time(), dt=0.1, fields=FIELDS, values=values)
    return encode_telemetry(tele, seq=0, ts=time.time())


def raw_broker(samples: int, messages: int, repeats: int) -> dict[str, Any]:
    """The broker's own ceiling for telemetry messages: mosquitto_pub -> mosquitto_sub, QoS 1."""
    payload = _telemetry_payload(samples)
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payload.bin"
        path.write_bytes(payload)
        with Broker(data_dir=Path(tmp) / "broker") as broker:
            for _ in range(repeats):
                port = str(broker.port)
                sub = subprocess.Popen(
                    [
                        "mosquitto_sub",
                        "-p",
                        port,
                        "-q",
                        "1",
                        "-t",
                        "bench/raw",
                        "-C",
                        str(messages),
                    ],
                    stdout=subprocess.DEVNULL,
                )
                time.sleep(0.3)
                t0 = time.perf_counter()
                subprocess.run(
                    ["mosquitto_pub", "-p", port, "-q", "1", "-t", "bench/raw", "-f", str(path),
                     "--repeat", str(messages)],
                    check=True,
                )  # fmt: skip
                sub.wait(timeout=300)
                rates.append(messages / (time.perf_counter() - t0))
    msg_rate = statistics.median(rates)
    return {
        "payload_bytes": len(payload),
        "msgs_per_s": msg_rate,
        "readings_per_s": msg_rate * samples,
        "runs": [round(r) for r in rates],
    }


def pipeline(
    devices: int, rate: float, samples: int, duration: float, edges: int, *extra: str
) -> dict[str, Any]:
    """One `fogline up` run; readings/s through the edge decision with every reading accounted."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "fogline.cli", "up", "--json", "--data-dir", tmp,
             "--devices", str(devices), "--edges", str(edges), "--rate", str(rate),
             "--samples-per-message", str(samples), "--duration", str(duration), *extra],
            capture_output=True, text=True, timeout=duration * 6 + 120,
        )  # fmt: skip
        rep = json.loads((Path(tmp) / "report.json").read_text())
    return {**judge_up_run(rep, devices, rate), "exit": proc.returncode}


#: (devices, readings per message, asked readings/s per device) of each e2e series. Small
#: messages show the per-message cost; devices that batch 50 readings per message (a 100 Hz
#: sensor sending twice a second) show the readings/s the pipeline sustains.
E2E_SERIES = (
    (1000, 10, (20.0, 60.0, 80.0, 100.0)),
    (1000, 50, (100.0, 200.0, 300.0, 400.0)),
    (10_000, 50, (10.0, 20.0, 30.0)),
)
E2E_QUICK = ((1000, 10, (20.0, 50.0)), (1000, 50, (100.0,)))


def e2e(quick: bool) -> dict[str, Any]:
    """Sustained end-to-end readings/s against the raw broker ceiling for the same messages."""
    duration = 10.0 if quick else 20.0
    series = E2E_QUICK if quick else E2E_SERIES
    repeats = 1 if quick else 3
    base = {
        samples: raw_broker(samples, messages=50_000 if quick else 200_000, repeats=3)
        for samples in sorted({s for _d, s, _l in series})
    }
    total = sum(len(ladder) for *_x, ladder in series) * repeats
    runs: list[dict[str, Any]] = []
    for devices, samples, ladder in series:
        for rate in ladder:
            tries = []
            for _ in range(repeats):
                r = pipeline(devices, rate, samples, duration, edges=2)
                r["samples"] = samples
                tries.append(r)
                print(
                    f"  {bar(len(runs) * repeats + len(tries), total, 12)} {devices} devices x "
                    f"{rate:g}/s, {samples} per message: {r['readings_per_s']:,.0f} readings/s, "
                    f"edges caught up {r['caught_up_after']:.1f}s after the devices stopped, "
                    f"unaccounted {r['unaccounted']}, sustained {r['sustained']}",
                    flush=True,
                )
            # The median run by throughput stands for the rate (the machine is noisy).
            tries.sort(key=lambda r: r["readings_per_s"])
            median = dict(tries[len(tries) // 2])
            median["tries"] = [round(t["readings_per_s"]) for t in tries]
            runs.append(median)
    best = []  # per series: its highest sustained run, or None
    for devices, samples, _ladder in series:
        ok = [
            r for r in runs if r["sustained"] and (r["devices"], r["samples"]) == (devices, samples)
        ]
        top = max(ok, key=lambda r: r["readings_per_s"]) if ok else None
        best.append({"devices": devices, "samples": samples, "run": top})
    return {"baseline": {str(k): v for k, v in base.items()}, "runs": runs, "best": best,
            "duration": duration}  # fmt: skip


def sim_throughput(quick: bool) -> dict[str, Any]:
    """One simulator process: readings/s generated and published, CPU, against the raw broker."""
    duration = 8.0 if quick else 15.0
    runs = []
    for devices, rate in [(1000, 10.0), (10_000, 10.0)]:
        with tempfile.TemporaryDirectory() as tmp, Broker(data_dir=Path(tmp) / "broker") as broker:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "device_sim", "--broker-port", str(broker.port),
                 "--data-dir", tmp, "--devices", str(devices), "--rate", str(rate),
                 "--duration", str(duration), "--log-level", "WARNING"],
                check=True,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            conn = sqlite3.connect(Path(tmp) / "device-sim-s0" / "ledger.db")
            produced, messages = conn.execute(
                "SELECT sum(produced), sum(messages) FROM ledger"
            ).fetchone()
            conn.close()
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        runs.append({
            "devices": devices, "asked": devices * rate, "generated": produced / duration,
            # Published = acknowledged by the broker: the process exits only after every PUBACK.
            "published": produced / wall, "messages_per_s": messages / wall,
            "cpu_s_per_s": cpu / wall, "cpu_s_per_million": cpu / produced * 1e6,
        })  # fmt: skip
        print(f"  sim {devices} devices: {runs[-1]}", flush=True)
    sample = raw_broker(10, messages=50_000, repeats=3)
    return {"runs": runs, "baseline": sample, "duration": duration}


def render_sim(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for the simulator benchmark."""
    b = res["baseline"]
    lines = [
        *heading("sim: one simulator process, readings/s generated and published", command),
        f"Baseline (same run): raw broker, `mosquitto_pub` -> `mosquitto_sub` at QoS 1 with a "
        f"{b['payload_bytes']}-byte telemetry message: {b['msgs_per_s']:,.0f} msg/s (median of 3).",
        "",
        "| devices | asked readings/s | generated readings/s | published (acked) readings/s | "
        "messages/s | share of raw broker msg/s | CPU s per s | CPU s per million readings |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['devices']:,} | {r['asked']:,.0f} | {r['generated']:,.0f} | "
            f"{r['published']:,.0f} | {r['messages_per_s']:,.0f} | "
            f"{r['messages_per_s'] / b['msgs_per_s']:.0%} | {r['cpu_s_per_s']:.2f} | "
            f"{r['cpu_s_per_million']:.1f} |"
        )
    lines += [
        "",
        f"Each run: {res['duration']:g} s, 10 readings per message, 7 fields, QoS 1, no subscriber "
        "(the broker acknowledges and discards). Published counts end when the last PUBACK is in.",
    ]
    return "\n".join(lines) + "\n"


def evaluation(quick: bool) -> dict[str, Any]:
    """The edge's decisions on a scenario: the models against the z-score rule, same run."""
    name = "quick" if quick else "factory"
    out = {}
    for detector in ("models", "zscore"):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "fogline.cli", "simulate", name, "--json",
                 "--detector", detector, "--data-dir", tmp],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
        if proc.returncode not in (0, 1):
            raise RuntimeError(proc.stderr[-2000:])
        out[detector] = json.loads(proc.stdout)
        print(f"  {detector}: {len(out[detector]['faults'])} fault kinds judged", flush=True)
    return out


def render_evaluation(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section comparing the two edge detectors on one scenario."""
    m, z = res["models"], res["zscore"]

    def num(x: Any, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    lines = [
        *heading(f"evaluation: the edge's decisions on the `{m['scenario']}` scenario", command),
        "Both runs use the same "
        "scenario and seed; `models` is the default edge (built-in TFLite models, escalation to "
        "the fog), `zscore` the window-mean z-score rule against an EWMA baseline.",
        "",
        "| fault kind | devices | recall models | recall z-score | delay models (sim h) | "
        "delay z-score (sim h) | precision of the models' events naming it |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, r in m["faults"].items():
        rz = z["faults"].get(kind, {})
        p = m["precision"].get(kind, {})
        lines.append(
            f"| {kind} | {r['devices']} | {r['recall']:.2f} | {num(rz.get('recall'))} | "
            f"{num(r['mean_delay_h'])} | {num(rz.get('mean_delay_h'))} | "
            f"{num(p.get('precision'))} ({p.get('events', 0)} events) |"
        )

    def overall(ev: dict[str, Any]) -> str:
        n = ev["events"]
        return f"{(n - ev['false_alarms']) / n:.2f} over {n} events" if n else "-"

    rows = [
        ("events that reach into a fault (of any kind)", overall(m), overall(z)),
        ("false alarms per device-hour", num(m["false_alarms_per_device_hour"], "{:.4f}"),
         num(z["false_alarms_per_device_hour"], "{:.4f}")),
        ("failure prediction MAE (h)", num(m["failure_prediction_mae_h"]),
         num(z["failure_prediction_mae_h"])),
        ("escalation rate (share of events)", num(m["escalation_rate"]), num(z["escalation_rate"])),
        ("bytes device -> edge", f"{m['bandwidth']['device_edge']:,}",
         f"{z['bandwidth']['device_edge']:,}"),
        ("bandwidth reduction device -> cloud",
         f"{m['bandwidth']['end_to_end_reduction']:.1f}x",
         f"{z['bandwidth']['end_to_end_reduction']:.1f}x"),
        ("custody: unaccounted / duplicates",
         f"{m['custody']['unaccounted']} / {m['custody']['duplicates']}",
         f"{z['custody']['unaccounted']} / {z['custody']['duplicates']}"),
    ]  # fmt: skip
    lines += ["", "| | models | z-score |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [
        "",
        f"{m['simulated_hours']:.1f} simulated hours. Recall counts a device as detected when an "
        "event reaches into its fault; precision per kind counts events that name that kind "
        "and hit a fault of that kind (see `fogline/evaluate.py`).",
    ]
    return "\n".join(lines) + "\n"


def security(quick: bool) -> dict[str, Any]:
    """What TLS + per-client logins and sealed telemetry cost, against plain, in one run."""
    from fogline import aead

    duration = 10.0 if quick else 20.0
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "secure": []}
    for _ in range(1 if quick else 3):
        for mode in ("plain", "secure"):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            extra = ("--secure",) if mode == "secure" else ()
            r = pipeline(1000, 40.0, 10, duration, 2, *extra)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            r["cpu_s_per_million"] = cpu / r["produced"] * 1e6
            runs[mode].append(r)
            cost = r["cpu_s_per_million"]
            print(
                f"  {mode}: {r['readings_per_s']:,.0f} readings/s, {cost:.1f} CPU s/M", flush=True
            )
    median = {
        mode: {
            k: statistics.median(r[k] for r in rs)
            for k in ("readings_per_s", "cpu_s_per_million", "unaccounted")
        }
        for mode, rs in runs.items()
    }
    return {"median": median, "runs": runs, "aead": aead.bench_cost(), "duration": duration}


def render_security(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for the security costs."""
    p, s, a = res["median"]["plain"], res["median"]["secure"], res["aead"]
    return "\n".join([
        *heading("security: cost of TLS + logins and of sealed telemetry", command),
        "| pipeline, 1,000 devices x 40 readings/s, 2 edges | plain (baseline) | `--secure` (TLS, "
        "per-client logins, ACL) | ratio |",
        "|---|---:|---:|---:|",
        f"| readings/s through the edge decision | {p['readings_per_s']:,.0f} | "
        f"{s['readings_per_s']:,.0f} | {s['readings_per_s'] / p['readings_per_s']:.2f} |",
        f"| CPU s per million readings (all processes and the broker) | "
        f"{p['cpu_s_per_million']:.1f} | {s['cpu_s_per_million']:.1f} | "
        f"{s['cpu_s_per_million'] / p['cpu_s_per_million']:.2f} |",
        f"| unaccounted | {p['unaccounted']:.0f} | {s['unaccounted']:.0f} | |",
        "",
        f"Medians of {len(res['runs']['plain'])} runs each, {res['duration']:g} s of telemetry, "
        "plain and secure runs alternating.",
        "",
        "Sealed telemetry (ChaCha20-Poly1305), per message of 10 x 7 float32, median of 7 x 2,000: "
        f"encode {a['encode_us']:.1f} us, encode + seal {a['encode_seal_us']:.1f} us "
        f"(x{a['seal_ratio']:.2f}); decode {a['decode_us']:.1f} us, open + decode "
        f"{a['open_decode_us']:.1f} us (x{a['open_ratio']:.2f}).",
    ]) + "\n"  # fmt: skip


def _proc_usage(pid: int) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds) of a running process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def footprint(quick: bool) -> dict[str, Any]:
    """RSS and CPU seconds per million readings of each process, 1,000 devices."""
    duration = 10.0 if quick else 30.0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        up = subprocess.Popen(
            [sys.executable, "-m", "fogline.cli", "up", "--data-dir", tmp, "--devices", "1000",
             "--edges", "1", "--rate", "10", "--duration", str(duration)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        peak: dict[str, float] = {}
        last: dict[str, tuple[float, float]] = {}
        t_end = time.monotonic() + duration + 30
        while up.poll() is None and time.monotonic() < t_end:
            for pid_file in (data / "run").glob("*.pid") if (data / "run").exists() else []:
                name = pid_file.stem
                try:
                    rss, cpu = _proc_usage(int(pid_file.read_text()))
                except (OSError, ValueError):
                    continue
                peak[name] = max(peak.get(name, 0.0), rss)
                last[name] = (rss, cpu)
            time.sleep(0.2)
        up.wait(timeout=120)
        rep = json.loads((data / "report.json").read_text())
    produced = rep["produced"]
    rows = {
        name: {"peak_rss_mib": peak[name], "cpu_s_per_million": last[name][1] / produced * 1e6}
        for name in sorted(peak)
    }
    return {"processes": rows, "produced": produced, "duration": duration,
            "unaccounted": rep["unaccounted"], "limits": edge_limits()}  # fmt: skip


def edge_limits() -> dict[str, float]:
    """The edge agent's resource limits in `deploy/kubernetes` (MiB, cores)."""
    import yaml  # kubernetes-validate's dependency: the manifests are only read here

    doc = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "edge-agent-e0.yaml").read_text())
    docs = doc if isinstance(doc, list) else [doc]
    for d in docs:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            limits = c.get("resources", {}).get("limits", {})
            if "memory" in limits and "cpu" in limits:
                mem, cpu = str(limits["memory"]), str(limits["cpu"])
                mib = float(mem.removesuffix("Mi")) if mem.endswith("Mi") else float(mem) / 2**20
                cores = float(cpu.removesuffix("m")) / 1000 if cpu.endswith("m") else float(cpu)
                return {"memory_mib": mib, "cpu_cores": cores}
    raise ValueError("no edge-agent container with memory and cpu limits in the manifest")


def render_footprint(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for the footprint benchmark."""
    lines = [
        *heading("footprint: memory and CPU per process, 1,000 devices", command),
        "| process | peak RSS (MiB) | CPU s per million readings |",
        "|---|---:|---:|",
    ]
    for name, r in res["processes"].items():
        lines.append(f"| {name} | {r['peak_rss_mib']:.1f} | {r['cpu_s_per_million']:.1f} |")
    lines += [
        "",
        f"`fogline up`, 1,000 devices x 10 readings/s, 1 edge (built-in models), "
        f"{res['duration']:g} s; {res['produced']:,} readings, unaccounted {res['unaccounted']}. "
        "CPU is the last sample before each process stopped (sampled every 0.2 s from /proc); "
        "the edge's share includes loading its models.",
    ]
    edge = next((r for n, r in res["processes"].items() if n.startswith("edge")), None)
    lim = res.get("limits")
    if edge is not None and lim:
        cores = edge["cpu_s_per_million"] * res["produced"] / 1e6 / res["duration"]
        lines += [
            "",
            f"Against the edge agent's limits in `deploy/kubernetes` ({lim['memory_mib']:.0f} MiB, "
            f"{lim['cpu_cores']:g} cores): peak RSS {edge['peak_rss_mib']:.0f} MiB = "
            f"{edge['peak_rss_mib'] / lim['memory_mib']:.0%} of the memory limit; "
            f"{cores:.2f} cores on average over the run = {cores / lim['cpu_cores']:.0%} of the "
            "CPU limit.",
        ]
    return "\n".join(lines) + "\n"


def render_e2e(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for the end-to-end benchmark."""
    base = res["baseline"]
    lines = [
        *heading("e2e: sustained readings/s, device -> edge -> fog -> cloud", command),
        "Baseline (same run): the raw broker carrying the same telemetry message from "
        "`mosquitto_pub` to `mosquitto_sub` at QoS 1: "
        + "; ".join(
            f"{k} readings ({b['payload_bytes']} bytes): median {b['msgs_per_s']:,.0f} msg/s = "
            f"{b['readings_per_s']:,.0f} readings/s (runs: {', '.join(f'{r:,}' for r in b['runs'])}"
            " msg/s)"
            for k, b in base.items()
        )
        + ".",
        "",
        "| devices | readings per message | asked readings/s | produced | through edge decision, "
        "readings/s | edges caught up after stop | unaccounted | duplicates | share of raw broker "
        "| sustained | behind | all runs, readings/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---|---:|",
    ]
    for r in res["runs"]:
        b = base[str(r["samples"])]
        lines.append(
            f"| {r['devices']:,} | {r['samples']} | {r['asked']:,.0f} | {r['produced']:,} | "
            f"{r['readings_per_s']:,.0f} | {r['caught_up_after']:.1f} s | {r['unaccounted']} | "
            f"{r['duplicates']} | "
            f"{r['readings_per_s'] / b['readings_per_s']:.0%} | "
            f"{'yes' if r['sustained'] else 'no'} | {_behind(r)} | "
            f"{', '.join(f'{x:,}' for x in r['tries'])} |"
        )
    lines += [
        "",
        "Sustained = every reading accounted, at least 95% of the asked rate delivered, edges "
        "within 2 s of the devices. Highest sustained rate per series:",
        "",
    ]
    for s in res["best"]:
        head = f"- {s['devices']:,} devices, {s['samples']} readings per message: "
        if s["run"] is None:
            lines.append(head + "none.")
            continue
        rate = s["run"]["readings_per_s"]
        lines.append(
            f"{head}**{rate:,.0f} readings/s** ({rate / s['samples']:,.0f} msg/s), "
            f"{rate / base[str(s['samples'])]['readings_per_s']:.0%} of the raw broker's "
            "ceiling for the same messages."
        )
    lines += [
        "",
        "Each row is the median of its runs by throughput; a run is one `fogline up` (one "
        f"simulator process, 2 edges, a fog, a cloud sink, Mosquitto) with {res['duration']:g} s "
        "of telemetry. 'behind' names what kept a run from its rate: the simulator (it took "
        "longer than asked to produce its readings while the edges kept up) or the edges (more "
        "than 2 s behind the devices at the end).",
    ]
    return "\n".join(lines) + "\n"


def _behind(r: dict[str, Any]) -> str:
    if r["sustained"]:
        return "-"
    if r["caught_up_after"] >= 2.0:
        return "edges"
    return "simulator" if r["unaccounted"] == 0 else "custody"


def update_results(section: str, body: str) -> None:
    """Replace (or add) one `## name` section of BENCHMARKS.md."""
    head = (
        "# Benchmarks\n\nFigures from `python -m bench` (or `make bench`). Each benchmark measures "
        "its baseline in the same run; this machine is shared and noisy, so compare ratios, "
        "not absolute numbers across runs.\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else head
    pattern = re.compile(rf"^## {re.escape(section)}:.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(body + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + body
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "names", nargs="*", default=list(BENCHMARKS),
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="shorter runs (smoke test of the benchmark)"
    )
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    command = "python -m bench " + " ".join([*args.names, *(["--quick"] if args.quick else [])])
    for name in args.names:
        if name not in BENCHMARKS:
            p.error(f"unknown benchmark {name!r} (available: {', '.join(BENCHMARKS)})")
    for name in args.names:
        about, measure, render = BENCHMARKS[name]
        print(f"{name}: {about}", flush=True)
        body = render(measure(args.quick), command)
        print(body)
        if not args.no_write:
            update_results(name, body)
    return 0


BENCHMARKS: dict[str, tuple[str, Any, Any]] = {
    "e2e": ("raw broker baseline, then the pipeline at increasing rates", e2e, render_e2e),
    "sim": ("one simulator process at 1,000 and 10,000 devices", sim_throughput, render_sim),
    "evaluation": (
        "the models and the z-score rule on the factory scenario",
        evaluation,
        render_evaluation,
    ),
    "peer": ("Node-RED doing the edge's filter job, against the edge", nodered.run, nodered.render),
    "footprint": ("RSS and CPU per process at 1,000 devices", footprint, render_footprint),
    "security": ("plain against --secure, and sealed telemetry", security, render_security),
    "models": (
        "inference cost, sizes and accuracy per flavour",
        models_bench.run,
        models_bench.render,
    ),
    "brokers": (
        "the pipeline on NATS's MQTT listener against Mosquitto, same load",
        brokers.run,
        brokers.render,
    ),
    "latency": (
        "device publish -> edge decision and -> cloud commit at 50 % and 90 % load",
        latency.run,
        latency.render,
    ),
    "ota": (
        "retraining, detection before and after it on a drifted site, rollout to 100 edges",
        ota.run,
        ota.render,
    ),
    "sinks": (
        "rows/s into the cloud store with 1 and 2 sink workers, SQLite and PostgreSQL",
        sinks.run,
        sinks.render,
    ),
}


if __name__ == "__main__":
    sys.exit(main())
