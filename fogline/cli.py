"""The `fogline` command: run the pipeline, report on it, manage a broker."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fogline import __version__, keys, query, serve, simulate, status, up
from fogline.broker import Broker
from fogline.cloudstores import StoreReadError, is_url
from fogline.errors import FoglineError
from fogline.models import build as models_build
from fogline.models import inspect as models_inspect
from fogline.models import push as models_push
from fogline.report import build_report, format_report


def _report(args: argparse.Namespace) -> int:
    if not args.data_dir.is_dir():
        print(f"fogline report: no data dir at {args.data_dir}", file=sys.stderr)
        return 2
    bad = [url for url in args.store if not is_url(url)]
    if bad:
        print(f"fogline report: --store {bad[0]!r} is not a postgresql:// URL", file=sys.stderr)
        return 2
    try:
        rep = build_report(args.data_dir, args.store)
    except StoreReadError as exc:
        print(f"fogline report: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    if args.html is not None:
        from fogline.html_report import write_html  # matplotlib is loaded only when asked for

        write_html(args.data_dir, args.html, report=rep, stores=args.store)
        print(f"fogline report: wrote {args.html}", file=sys.stderr)
    return 0 if rep["unaccounted"] == 0 else 1


def _broker(args: argparse.Namespace) -> int:
    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    broker = Broker(data_dir=args.data_dir / "broker", port=args.port or None).start()
    print(
        f"fogline broker: Mosquitto at {broker.url} (log {broker.log_path}); Ctrl-C stops it",
        flush=True,
    )
    try:
        while broker.is_running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def _add(
    sub: Any, name: str, module: Any, *, help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand whose module gives `add_arguments(parser)` and `run(args) -> int`."""
    s: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    module.add_arguments(s)
    s.set_defaults(func=module.run)
    return s


def parser() -> argparse.ArgumentParser:
    """The argument parser of `fogline` and its subcommands."""
    p = argparse.ArgumentParser(prog="fogline", description="fogline: an MQTT fog-layer pipeline.")
    p.add_argument("--version", action="version", version=f"fogline {__version__}")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add(
        sub,
        "up",
        up,
        help="run broker, cloud sink, fog, edges and devices; then report",
        description="Start the whole pipeline on this machine, supervise it, show live "
        "progress, stop it in order and print the end-to-end report.",
    )

    _add(
        sub,
        "simulate",
        simulate,
        help="run a scenario through the pipeline and evaluate detection against ground truth",
        description="Run a scenario (built-in name or TOML file) through the real pipeline and "
        "print an evaluation against the simulator's ground truth; or export labelled training "
        "windows with --export-windows. Exit status 1 when readings are unaccounted.",
    )

    s = sub.add_parser(
        "report",
        help="end-to-end accounting of a data dir",
        description="Account for every reading: produced (simulator ledgers) against covered "
        "and dropped (cloud stores: DATA_DIR/cloud-*/cloud.db and --store URLs). Exit status 1 "
        "when readings are unaccounted, 2 when a store cannot be read.",
    )
    s.add_argument(
        "--data-dir", type=Path, default=Path(".fogline/data"), help="the deployment's data dir"
    )
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument(
        "--store", action="append", default=[], metavar="URL",
        help="also read this PostgreSQL store (a cloud sink's postgresql:// store); repeatable",
    )  # fmt: skip
    s.add_argument(
        "--html", type=Path, metavar="OUT", default=None,
        help="also write a self-contained HTML page with figures to OUT",
    )  # fmt: skip
    s.set_defaults(func=_report)

    _add(
        sub,
        "status",
        status,
        help="live dashboard of a running pipeline from its status and metrics topics",
        description="Follow the retained status and the metrics of every process on a broker: "
        "states, readings/s per layer, outbox backlog, rejects and drops, edge decisions. "
        "--once --json prints one snapshot; exit status 2 when the broker cannot be reached.",
    )

    _add(
        sub,
        "query",
        query,
        help="query the cloud store of a data dir: at-risk, events, summaries, coverage, rollups",
        description="Read-only queries over DATA_DIR/cloud-*/cloud.db and PostgreSQL stores "
        "(--store URL), printed as an aligned table, JSON or CSV. Exit status 2 when there is "
        "no data dir or cloud store, a store cannot be read, or a flag is bad.",
    )

    _add(
        sub,
        "serve",
        serve,
        help="browse the cloud store of a data dir in Datasette (read-only, loopback)",
        description="Serve DATA_DIR/cloud-*/cloud.db with Datasette in immutable mode, with "
        "table and column descriptions and canned queries (devices at risk, warnings of the "
        "last hour, coverage per device, rollups per site). Ctrl-C stops it. Exit status 2 "
        "for a non-loopback --host without --public, or no cloud store.",
    )

    s = sub.add_parser(
        "broker",
        help="run a Mosquitto from the mosquitto/ templates in the foreground",
        description="Render mosquitto/dev.conf.tmpl into DATA_DIR/broker and run it.",
    )
    s.add_argument(
        "--data-dir", type=Path, default=Path(".fogline/data"), help="the deployment's data dir"
    )
    s.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    s.set_defaults(func=_broker)

    _add(
        sub,
        "keys",
        keys,
        help="make the project CA and issue TLS certificates, keys and passwords",
        description="Manage the key folder of a deployment (default DATA_DIR/keys): init makes "
        "the project CA and the root signing key, issue makes a certificate, key and password "
        "for the broker or a process, list shows them with their expiry, devices makes the "
        "devices' AEAD keys for sealed telemetry.",
    )

    s = sub.add_parser(
        "models",
        help="build the edge and fog models, inspect a .tflite file, push one to the edges",
        description="Train the anomaly, classifier, failure and fog_classifier models from a "
        "scenario's simulated fleet and write them as .tflite (build), show what a .tflite "
        "file holds (inspect), or hand one to a fog for a signed canary rollout (push).",
    )
    models = s.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    _add(
        models,
        "build",
        models_build,
        help="train and write the four models, reproducibly from a seed",
        description="Export labelled windows of the scenario's fleet, split the devices "
        "70/15/15, train the four models, check the numpy executor against the runtime, "
        "validate and write <name>.tflite with metadata. Exit status 1 when a gate refuses.",
    )
    _add(
        models,
        "inspect",
        models_inspect,
        help="show ops, tensors, quantisation, signatures and metadata of a .tflite file",
        description="Validate a .tflite file and print what it holds. Exit status 2 when the "
        "validator rejects it, with the reason.",
    )
    _add(
        models,
        "push",
        models_push,
        help="queue a model at a fog, which signs it and rolls it out (canary first)",
        description="Validate a .tflite file and put it into the fog's incoming/ folder; the "
        "fog gives it the next version, signs the manifest and rolls it out to a canary share "
        "of its edges, then promotes it or rolls it back. Exit status 2 when refused.",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fogline` command."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="fogline: %(levelname)s %(message)s"
    )
    try:
        return int(args.func(args))
    except FoglineError as exc:
        print(f"fogline {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
