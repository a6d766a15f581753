"""`fogline simulate`: run a scenario through the real pipeline and judge it, or export
labelled training windows from the scenario's fleet without running the pipeline."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fogline import up
from fogline.evaluate import bandwidth, evaluate, format_evaluation, load_events, load_truth
from fogline.features import feature_names, window_features
from fogline.report import build_report, read_ledgers
from fogline.scenario import Scenario, builtin_names, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `fogline simulate`."""
    p.add_argument(
        "scenario", nargs="?",
        help=f"a scenario TOML file or a built-in name ({', '.join(builtin_names())})",
    )  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the built-in scenarios and exit")
    p.add_argument(
        "--data-dir", type=Path, default=None,
        help="folder for the run's state (default: .fogline/simulate/<scenario>, cleaned first)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    p.add_argument("--duration", type=float, help="override the scenario's wall-clock seconds")
    p.add_argument("--devices", type=int, help="override the scenario's number of devices")
    p.add_argument(
        "--detector", choices=("models", "zscore"),
        help="override how the edges judge windows (default: the scenario's, else models)",
    )  # fmt: skip
    p.add_argument(
        "--export-windows", type=Path, metavar="FILE",
        help="write labelled windows (features, fault kind, hours to failure) of the scenario's "
        "fleet to FILE (.npz) instead of running the pipeline",
    )  # fmt: skip
    p.add_argument(
        "--window", type=int, default=20, help="readings per exported window (default: 20)"
    )


def _scenario(args: argparse.Namespace) -> Scenario:
    sc = load(args.scenario)
    changes: dict[str, Any] = {}
    if args.duration is not None:
        changes["duration"] = args.duration
    if args.devices is not None:
        changes["devices"] = args.devices
    if args.detector is not None:
        changes["edge"] = {**sc.edge, "detector": args.detector}
    if changes:
        sc = Scenario(**{**sc.__dict__, **changes})
    return sc


def run(args: argparse.Namespace) -> int:
    """Entry of `fogline simulate`."""
    if args.list:
        for name in builtin_names():
            print(f"{name:<10} {load(name).description}")
        return 0
    if not args.scenario:
        print("fogline simulate: give a scenario (--list shows the built-in ones)", file=sys.stderr)
        return 2
    sc = _scenario(args)
    if args.export_windows is not None:
        return export_windows(sc, args.export_windows, window=args.window)
    data_dir = args.data_dir or Path(".fogline/simulate") / sc.name
    up_args = argparse.Namespace(
        devices=sc.devices, edges=sc.edges, duration=sc.duration, data_dir=data_dir,
        rate=sc.rate, samples_per_message=sc.samples_per_message, time_scale=sc.time_scale,
        seed=sc.seed, clean=True, json=False, shutdown_timeout=15.0,
        sim_extra=sc.sim_args(), edge_extra=sc.edge_args(), fog_extra=sc.fog_args(),
    )  # fmt: skip
    up.say(f"fogline simulate: scenario {sc.name}: {sc.description}")
    status = up.run(up_args, quiet=True)
    ev = evaluation(data_dir, sc.name)
    (data_dir / "evaluation.json").write_text(json.dumps(ev, indent=2) + "\n")
    print(json.dumps(ev, indent=2) if args.json else format_evaluation(ev))
    return status


def evaluation(data_dir: Path, name: str) -> dict[str, Any]:
    """The evaluation of a finished run in `data_dir`."""
    rep = build_report(data_dir)
    truths, dt = load_truth(data_dir)
    produced = {d: v[1] for d, v in read_ledgers(data_dir)[0].items()}
    ev = evaluate(truths, load_events(data_dir), produced, dt)
    return {"scenario": name, **ev, "bandwidth": bandwidth(rep), "custody": rep}


def export_windows(sc: Scenario, path: Path, *, window: int) -> int:
    """Write the scenario fleet's labelled windows to an .npz file; reproducible from the seed."""
    from device_sim.physics import FAULT_KINDS, FIELDS, FaultMix, Fleet

    mix = FaultMix(rates=sc.fault_rates, horizon_h=sc.fault_horizon_h, wear_hours=sc.wear_hours)
    fleet = Fleet(n=sc.devices, first=0, seed=sc.seed, mix=mix, ambient_offset=sc.ambient_offset)
    dt = sc.time_scale / sc.rate
    count = int(sc.duration * sc.rate) // window
    kinds = ["normal", *FAULT_KINDS]
    feats, labels, hours, devices, firsts = [], [], [], [], []
    t0 = time.monotonic()
    for w in range(count):
        t = w * window * dt
        values = fleet.sample(t, dt, window)
        t_end = t + (window - 1) * dt
        active = fleet.active(t_end)
        feats.append(window_features(values))
        labels.append(np.array([kinds.index(k or "normal") for k in active], dtype=np.int16))
        hours.append(fleet.hours_to_failure(t_end).astype(np.float32))
        devices.append(np.arange(sc.devices, dtype=np.int32))
        firsts.append(np.full(sc.devices, w * window, dtype=np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        X=np.concatenate(feats) if feats else np.zeros((0, 4 * len(FIELDS)), np.float32),
        kind=np.concatenate(labels) if labels else np.zeros(0, np.int16),
        hours_to_failure=np.concatenate(hours) if hours else np.zeros(0, np.float32),
        device=np.concatenate(devices) if devices else np.zeros(0, np.int32),
        first=np.concatenate(firsts) if firsts else np.zeros(0, np.int64),
        feature_names=np.array(feature_names(FIELDS)),
        kind_names=np.array(kinds),
        meta=np.array(
            json.dumps({"scenario": sc.name, "seed": sc.seed, "window": window, "dt": dt})
        ),
    )
    n = count * sc.devices
    print(
        f"fogline simulate: wrote {n:,} windows of {window} readings ({sc.devices} devices x "
        f"{count}) to {path} in {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
    )
    return 0
