"""`python -m bench`: run named benchmarks, print a table, update BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fogline.broker import Broker
from fogline.codec import Telemetry, encode_telemetry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "BENCHMARKS.md"
FIELDS = ("vib_rms", "temp_bearing", "temp_motor", "current", "pressure")


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
    devices: int, rate: float, samples: int, duration: float, edges: int
) -> dict[str, Any]:
    """One `fogline up` run; readings/s through the edge decision with every reading accounted."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "fogline.cli", "up", "--json", "--data-dir", tmp,
             "--devices", str(devices), "--edges", str(edges), "--rate", str(rate),
             "--samples-per-message", str(samples), "--duration", str(duration)],
            capture_output=True, text=True, timeout=duration * 6 + 120,
        )  # fmt: skip
        rep = json.loads((Path(tmp) / "report.json").read_text())
    t = rep["timing"]
    span = t["devices_ran"] + t["edges_caught_up_after"]
    return {
        "devices": devices,
        "asked": devices * rate,
        "produced": rep["produced"],
        "readings_per_s": rep["produced"] / span,
        "caught_up_after": t["edges_caught_up_after"],
        "unaccounted": rep["unaccounted"],
        "duplicates": rep["duplicates"],
        "exit": proc.returncode,
        # Sustained: every reading accounted, the rate asked for was delivered (a simulator or
        # broker that falls behind stretches the run), and the edges kept pace.
        "sustained": rep["unaccounted"] == 0
        and rep["duplicates"] == 0
        and rep["produced"] / span >= 0.95 * devices * rate
        and t["edges_caught_up_after"] < 2.0,
    }


def e2e(quick: bool) -> dict[str, Any]:
    """Sustained end-to-end readings/s against the raw broker ceiling for the same messages."""
    samples, duration = 10, (10.0 if quick else 20.0)
    base = raw_broker(samples, messages=50_000 if quick else 200_000, repeats=3)
    ladder = [20.0, 50.0] if quick else [20.0, 40.0, 60.0, 80.0]
    runs = []
    for rate in ladder:
        tries = []
        for _ in range(1 if quick else 3):
            r = pipeline(1000, rate, samples, duration, edges=2)
            tries.append(r)
            print(
                f"  1000 devices x {rate:g}/s: {r['readings_per_s']:,.0f} readings/s, "
                f"edges caught up {r['caught_up_after']:.1f}s after the devices stopped, "
                f"unaccounted {r['unaccounted']}, sustained {r['sustained']}",
                flush=True,
            )
        # The median run by throughput stands for the rate (the machine is noisy).
        tries.sort(key=lambda r: r["readings_per_s"])
        median = dict(tries[len(tries) // 2])
        median["tries"] = [round(t["readings_per_s"]) for t in tries]
        runs.append(median)
    ok = [r for r in runs if r["sustained"]]
    best = max(ok, key=lambda r: r["readings_per_s"]) if ok else None
    return {"baseline": base, "runs": runs, "best": best, "samples": samples, "duration": duration}


def machine() -> str:
    """One line of machine facts."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()
    mosq_v = mosq[0] if mosq else "mosquitto ?"
    if shutil.which("mosquitto") is None:
        mosq_v = subprocess.run(
            ["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {mosq_v}"


def render_e2e(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for the end-to-end benchmark."""
    b = res["baseline"]
    lines = [
        "## e2e: sustained readings/s, device -> edge -> fog -> cloud",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}",
        "",
        f"Baseline (same run): the raw broker carrying the same {b['payload_bytes']}-byte "
        f"telemetry message ({res['samples']} readings) from `mosquitto_pub` to `mosquitto_sub` "
        "at QoS 1: "
        f"median {b['msgs_per_s']:,.0f} msg/s = {b['readings_per_s']:,.0f} readings/s "
        f"(runs: {', '.join(f'{r:,}' for r in b['runs'])} msg/s).",
        "",
        "| devices | asked readings/s | produced | through edge decision, readings/s | "
        "edges caught up after stop | unaccounted | duplicates | share of raw broker | sustained "
        "| all runs, readings/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['devices']:,} | {r['asked']:,.0f} | {r['produced']:,} | "
            f"{r['readings_per_s']:,.0f} | {r['caught_up_after']:.1f} s | {r['unaccounted']} | "
            f"{r['duplicates']} | "
            f"{r['readings_per_s'] / b['readings_per_s']:.0%} | "
            f"{'yes' if r['sustained'] else 'no'} | {', '.join(f'{x:,}' for x in r['tries'])} |"
        )
    best = res["best"]
    lines.append("")
    if best:
        lines.append(
            "Sustained (every reading accounted, at least 95% of the asked rate delivered, edges "
            "within 2 s of the devices): "
            f"**{best['readings_per_s']:,.0f} readings/s**, "
            f"{best['readings_per_s'] / b['readings_per_s']:.0%} of the raw broker's ceiling for "
            "the same messages. Each row is the median of its runs by throughput; a run lasts "
            f"{res['duration']:g} s of telemetry, 2 edges, {res['samples']} readings per message."
        )
    else:
        lines.append("No run was sustained (see the table).")
    return "\n".join(lines) + "\n"


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
    p.add_argument("names", nargs="*", default=["e2e"], help="benchmarks to run (available: e2e)")
    p.add_argument(
        "--quick", action="store_true", help="shorter runs (smoke test of the benchmark)"
    )
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    command = "python -m bench " + " ".join([*args.names, *(["--quick"] if args.quick else [])])
    for name in args.names:
        if name != "e2e":
            p.error(f"unknown benchmark {name!r} (available: e2e)")
        print("e2e: raw broker baseline, then the pipeline at increasing rates", flush=True)
        res = e2e(args.quick)
        body = render_e2e(res, command)
        print(body)
        if not args.no_write:
            update_results("e2e", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
