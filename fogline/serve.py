"""`fogline serve`: browse the cloud stores of a data dir in Datasette, read-only.

`metadata()` is the pure core: the title, descriptions and units of every table and column of the
cloud store, and the canned queries an operator starts from (devices at risk, the last hour of
warnings, coverage per device, rollups per site). `run()` opens every `cloud-*/cloud.db` in
immutable mode and serves it with Datasette in this process (uvicorn) until Ctrl-C or SIGTERM.
Datasette is imported only when the command runs, so the rest of `fogline` starts without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
import sys
import webbrowser
from pathlib import Path
from typing import Any

from fogline import __version__
from fogline.errors import FoglineError
from fogline.query import cloud_stores

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
# A slow canned query over a large store should answer, not time out at Datasette's 1 s.
SQL_TIME_LIMIT_MS = 5000


class ServeError(FoglineError):
    """`fogline serve` cannot start: a refused host, a missing store, a port in use."""


# --------------------------------------------------------------------------- the metadata

_TIME = "Unix seconds"
_SIM_TIME = (
    "Unix seconds; in a simulation the simulated clock, which runs time_scale times faster than "
    "the wall clock"
)
_STREAM = {
    "src": "Custody stream the record came in: the fog that forwarded it",
    "seq": "Custody sequence number of the record in its stream",
}
_RANGE = {
    "device": "Device id (d00000, ...)",
    "first": "Number of the first reading covered (readings of a device are numbered from 0)",
    "last": "Number of the last reading covered (inclusive)",
}
_STORED = {"stored": f"When the cloud sink stored the record ({_TIME}, wall clock)"}

# table -> (title, description, {column: description}, {column: unit})
TABLES: dict[str, tuple[str, str, dict[str, str], dict[str, str]]] = {
    "summaries": (
        "Summaries",
        "Per device and summary interval, what the edge saw: the readings covered and, per "
        "field, min, mean, max and standard deviation.",
        {
            **_STREAM,
            "edge": "Edge that made the summary",
            **_RANGE,
            "count": "Readings covered (last - first + 1)",
            "t0": f"Time of the first reading ({_SIM_TIME})",
            "t1": f"Time of the last reading ({_SIM_TIME})",
            "fields": "Field names, a JSON list (vib_rms, vib_peak, ...)",
            "min": "Per field the smallest reading, a JSON list in the order of fields",
            "mean": "Per field the mean reading, a JSON list in the order of fields",
            "max": "Per field the largest reading, a JSON list in the order of fields",
            "std": "Per field the standard deviation, a JSON list in the order of fields",
            "events": "Abnormal windows inside the summary",
            **_STORED,
        },
        {"count": "readings", "events": "windows"},
    ),
    "events": (
        "Events",
        "Windows the edge judged abnormal: z-score events (kind zscore) and model decisions "
        "(kind model) with fault class, confidence, predicted hours to failure and who decided.",
        {
            **_STREAM,
            "edge": "Edge that judged the window",
            **_RANGE,
            "count": "Readings in the window",
            "ts": f"Time of the window's last reading ({_SIM_TIME})",
            "kind": "zscore (the z-score rule) or model (the TFLite models)",
            "field": "zscore: the field with the largest |z|",
            "value": "zscore: the window mean of that field (in the field's unit)",
            "baseline": "zscore: the device's running (EWMA) baseline of that field",
            "z": "zscore: the z-score of the window mean",
            **_STORED,
            "status": "model: warning (or normal)",
            "score": "model: anomaly score, the autoencoder's mean squared reconstruction error",
            "threshold": "model: the anomaly score at or above which a window is a warning",
            "fault": "model: the fault class (null: the warning rests on the anomaly score)",
            "confidence": "model: the classifier's confidence, its largest softmax probability",
            "hours_to_failure": "model: predicted hours to failure (null for sensor faults)",
            "recommendation": "model: what to do, e.g. Schedule maintenance within 5 h",
            "escalated": "model: 1 when the edge asked the fog's classifier for a verdict",
            "verdict_by": "model: whose verdict was used, edge or fog",
            "unconfirmed": "model: 1 when the fog was asked but did not answer in time",
            "model": "model: name@version of the classifier whose verdict was used",
            "evidence": "model: the window's features (float32: mean, std, min, max per field)",
            "repeats": "model: warnings of the same fault counted but not sent before this one",
        },
        {"count": "readings", "hours_to_failure": "h", "repeats": "warnings"},
    ),
    "drops": (
        "Drops",
        "Drop notices: readings or records that could not be delivered, with the reason.",
        {
            **_STREAM,
            "origin": "Edge or fog that dropped them",
            "reason": "gap, non_finite, expired or outbox_full",
            "records": "Records evicted (0 for readings that never became records)",
            "kinds": "Records evicted per kind, a JSON object",
            "ts": f"When the drop was noticed ({_TIME})",
            **_STORED,
        },
        {"records": "records"},
    ),
    "drop_ranges": (
        "Dropped reading ranges",
        "The readings each drop notice names, one row per device and range.",
        {**_STREAM, **_RANGE, "reason": "The drop's reason"},
        {},
    ),
    "rollups": (
        "Rollups",
        "Per fog and edge (site) and rollup period, what the edge delivered to the fog.",
        {
            **_STREAM,
            "fog": "Fog that made the rollup",
            "edge": "Edge (site) it is about",
            "t0": f"Start of the period ({_TIME}, wall clock)",
            "t1": f"End of the period ({_TIME}, wall clock)",
            "readings": "Readings in the summaries the edge delivered in the period",
            "summaries": "Summaries delivered in the period",
            "events": "Events delivered in the period",
            "dropped": "Readings reported dropped in the period",
            "devices": "Devices the edge delivered records of",
            **_STORED,
        },
        {"readings": "readings", "summaries": "records", "events": "records"},
    ),
    "model_events": (
        "Model rollouts",
        "Every step of the fogs' model rollouts and every edge's answer to a model update.",
        {
            **_STREAM,
            "fog": "Fog that rolls the model out",
            "name": "Edge model (anomaly, classifier, failure)",
            "version": "Model version the step is about",
            "event": "canary, installed, rejected, promoted, rolled_back, retrained or "
            "not_published",
            "edge": "Edge that answered (installed, rejected); empty for the fog's own steps",
            "detail": "Why: the canaries, a rejection's reason, a rollback's or a gate's reason",
            "ts": f"When the fog recorded it ({_TIME}, wall clock)",
            **_STORED,
        },
        {},
    ),
    "rejected": (
        "Rejected records",
        "Records the cloud sink refused (acknowledged, not stored), with the reason.",
        {
            **_STREAM,
            "kind": "The record's kind",
            "reason": "Why it was refused",
            "body": "The record's body as JSON (first 2,000 characters)",
            **_STORED,
        },
        {},
    ),
    "inbox": (
        "Custody inbox",
        "Per incoming stream, which sequence numbers the sink has applied (deduplication).",
        {
            "stream": "The sender's id (a fog)",
            "hwm": "Every seq up to this one was applied (-1: none yet)",
            "ranges": "Applied seq ranges above hwm, a JSON list of [lo, hi]",
            "records": "Records applied",
            "duplicates": "Redelivered records recognised and skipped",
        },
        {},
    ),
    "schema_migrations": (
        "Schema migrations",
        "Which migrations of the store's schema have been applied.",
        {"component": "Who owns the schema (cloud)", "version": "Migrations applied"},
        {},
    ),
}

_AT_RISK_SQL = """\
WITH w AS (
  SELECT device, edge, ts, fault, confidence, hours_to_failure AS htf, recommendation, model,
    row_number() OVER (PARTITION BY device ORDER BY ts DESC, src DESC, seq DESC) AS nth,
    count(*) OVER (PARTITION BY device) AS n,
    sum(coalesce(repeats, 0)) OVER (PARTITION BY device) AS rep,
    min(ts) OVER (PARTITION BY device) AS ts0,
    max(ts) OVER (PARTITION BY device) AS ts1
  FROM events WHERE kind = 'model' AND status = 'warning'
)
SELECT device, edge, coalesce(fault, 'anomaly') AS fault, round(confidence, 3) AS confidence,
  round(htf, 2) AS hours_to_failure, recommendation, n AS warnings, rep AS repeats,
  datetime(ts0, 'unixepoch', 'localtime') AS first_warning,
  datetime(ts1, 'unixepoch', 'localtime') AS last_warning,
  datetime(max(ts1, coalesce((SELECT max(t1) FROM summaries s WHERE s.device = w.device), ts1)),
    'unixepoch', 'localtime') AS last_seen,
  model
FROM w WHERE nth = 1
ORDER BY htf IS NULL, htf, n DESC, device"""

_LAST_HOUR_SQL = """\
SELECT datetime(stored, 'unixepoch', 'localtime') AS stored_at, device, edge, kind,
  CASE WHEN kind = 'model' THEN coalesce(fault, 'anomaly') ELSE field END AS what,
  round(CASE WHEN kind = 'model' THEN score ELSE z END, 3) AS score,
  round(threshold, 3) AS threshold, round(confidence, 3) AS confidence,
  round(hours_to_failure, 2) AS hours_to_failure, recommendation, escalated, verdict_by, model,
  datetime(ts, 'unixepoch', 'localtime') AS window_end, first, last
FROM events
WHERE (kind = 'zscore' OR status = 'warning')
  AND stored >= CAST(strftime('%s', 'now') AS REAL)
    - 3600 * coalesce(CAST(nullif(:hours, '') AS REAL), 1)
ORDER BY stored DESC, device, first"""

_DROP_REASONS = ("gap", "non_finite", "expired", "outbox_full")
_COVERAGE_SQL = (
    """\
WITH s AS (
  SELECT device, min(edge) AS edge, count(*) AS n, sum(count) AS summarised,
    max(last) AS top, max(t1) AS t
  FROM summaries GROUP BY device
), d AS (
  SELECT device, sum(last - first + 1) AS dropped, max(last) AS top,
"""
    + "".join(
        f"    sum(CASE WHEN reason = '{r}' THEN last - first + 1 ELSE 0 END) AS {r},\n"
        for r in _DROP_REASONS
    )
    + """\
    sum(CASE WHEN reason NOT IN ("""
    + ", ".join(f"'{r}'" for r in _DROP_REASONS)
    + """) THEN last - first + 1 ELSE 0 END) AS other
  FROM drop_ranges GROUP BY device
), c AS (
  SELECT device, s.edge, coalesce(s.n, 0) AS summaries, coalesce(s.summarised, 0) AS summarised,
    coalesce(d.dropped, 0) AS dropped, """
    + ", ".join(f"coalesce(d.{r}, 0) AS {r}" for r in (*_DROP_REASONS, "other"))
    + """,
    max(coalesce(s.top, -1), coalesce(d.top, -1)) + 1 AS seen, s.t
  FROM (SELECT device FROM summaries UNION SELECT device FROM drop_ranges)
    LEFT JOIN s USING (device) LEFT JOIN d USING (device)
)
SELECT device, edge, summaries, seen AS readings_seen, summarised, dropped, """
    + ", ".join(f"{r} AS dropped_{r}" for r in (*_DROP_REASONS, "other"))
    + """,
  seen - summarised - dropped AS not_accounted,
  round(100.0 * summarised / max(seen, 1), 1) AS coverage_pct,
  datetime(t, 'unixepoch', 'localtime') AS last_summary
FROM c ORDER BY coverage_pct, device"""
)

_ROLLUPS_SQL = """\
SELECT fog, edge AS site, count(*) AS rollups, sum(readings) AS readings,
  sum(summaries) AS summaries, sum(events) AS events, sum(dropped) AS dropped,
  max(devices) AS devices,
  round(sum(readings) / nullif(max(t1) - min(t0), 0), 1) AS readings_per_s,
  datetime(min(t0), 'unixepoch', 'localtime') AS since,
  datetime(max(t1), 'unixepoch', 'localtime') AS until
FROM rollups GROUP BY fog, edge ORDER BY fog, edge"""

# name -> (title, description, sql)
QUERIES: dict[str, tuple[str, str, str]] = {
    "at_risk": (
        "Devices at risk",
        "Devices with model warnings, soonest predicted failure first (devices without a "
        "prediction, e.g. sensor faults, last; then most warnings first). Fault, confidence, "
        "hours to failure, recommendation and model are those of the device's latest warning; "
        "fault 'anomaly' means the warning rests on the anomaly score alone. Times are local.",
        _AT_RISK_SQL,
    ),
    "last_hour_warnings": (
        "Warnings of the last hour",
        "Events (model warnings and z-score events) the cloud stored in the last hour before "
        "now (wall clock, by the stored time), newest first. Give hours to look further back. "
        "what is the fault (or the z-score rule's field), score the anomaly score (or the z).",
        _LAST_HOUR_SQL,
    ),
    "coverage_per_device": (
        "Coverage per device",
        "Per device, readings up to the highest one the cloud has heard of (readings_seen), "
        "those in stored summaries and those reported dropped by reason; not_accounted are "
        "neither (in flight, or lost). Lowest coverage first. Overlapping summaries count twice "
        "here; `fogline query coverage` gives the exact accounting against the ledgers.",
        _COVERAGE_SQL,
    ),
    "rollups_per_site": (
        "Rollups per site",
        "Per fog and edge (site): the fog's rollups added up: readings, summaries, events and "
        "readings dropped that the edge delivered, the most devices in one period, and the "
        "average readings per second over the whole span.",
        _ROLLUPS_SQL,
    ),
}


def database_name(store: Path) -> str:
    """The name a cloud store is served under: its folder, e.g. `cloud-c0`."""
    return store.parent.name


def metadata(databases: list[str], *, data_dir: Path | None = None) -> dict[str, Any]:
    """Datasette metadata for cloud stores served as `databases`: titles, descriptions and
    units of every table and column, facets, and the canned queries."""
    # Units go into the descriptions, not into Datasette's `units` key: that renders them with
    # SI prefixes (0.7 h becomes "700 mh"), which reads worse than the plain number.
    tables: dict[str, dict[str, Any]] = {
        name: {
            "title": title,
            "description": description,
            "columns": {
                col: f"{text} [{units[col]}]" if col in units else text
                for col, text in columns.items()
            },
        }
        for name, (title, description, columns, units) in TABLES.items()
    }
    tables["events"] |= {"sort_desc": "ts", "facets": ["kind", "fault", "edge", "model"]}
    tables["summaries"] |= {"sort_desc": "t1", "facets": ["edge"]}
    tables["rollups"] |= {"sort_desc": "t1", "facets": ["edge"]}
    tables["drops"] |= {"sort_desc": "ts", "facets": ["reason", "origin"]}
    tables["model_events"] |= {"sort_desc": "ts", "facets": ["name", "event", "edge"]}
    where = f" of {data_dir}" if data_dir is not None else ""
    return {
        "title": "fogline cloud store",
        "description": f"The records the cloud sink stored{where}, read-only (immutable). Start "
        "with a canned query: devices at risk, warnings of the last hour, coverage per device, "
        "rollups per site.",
        "source": f"fogline {__version__}",
        "databases": {
            db: {
                "description": "One cloud sink's store: summaries, events, drops, rollups and "
                "model rollout steps forwarded by the fogs, and the custody inbox.",
                "tables": tables,
                "queries": {
                    # The SQL is one click away ("show"): the rows are what an operator wants.
                    name: {"title": title, "description": desc, "sql": sql, "hide_sql": True}
                    for name, (title, desc, sql) in QUERIES.items()
                },
            }
            for db in databases
        },
    }


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (`localhost` or a loopback address)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `fogline serve`."""
    p.add_argument(
        "--data-dir", type=Path, default=Path(".fogline/data"),
        help="the deployment's data dir; its cloud-*/cloud.db are served (default: .fogline/data)",
    )  # fmt: skip
    p.add_argument(
        "--host", default=DEFAULT_HOST,
        help=f"address to listen on (default: {DEFAULT_HOST}); other than loopback needs --public",
    )  # fmt: skip
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT,
        help=f"TCP port (default: {DEFAULT_PORT}; 0 picks a free one)",
    )  # fmt: skip
    p.add_argument("--open", action="store_true", help="open the page in a web browser")
    p.add_argument(
        "--public", action="store_true",
        help="allow a --host that is not loopback: anyone who can reach it can read the data",
    )  # fmt: skip


def _check_host(host: str, public: bool) -> None:
    if not is_loopback(host) and not public:
        raise ServeError(
            f"--host {host} is not a loopback address: anyone who can reach it could read the "
            "stores; add --public if that is what you want (or use --host 127.0.0.1)"
        )


def _unflushed_wal(store: Path) -> int:
    wal = store.with_name(store.name + "-wal")
    return wal.stat().st_size if wal.is_file() else 0


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port`, so that a port in use is a clean error, not uvicorn's exit."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


async def _serve(ds: Any, names: list[str], sock: socket.socket, open_browser: bool) -> None:
    import uvicorn

    await ds.invoke_startup()
    for name, db in ds.databases.items():
        if db.is_memory:
            continue
        try:
            await db.execute("SELECT count(*) FROM sqlite_master")
        except Exception as exc:  # sqlite3 errors arrive wrapped by Datasette
            raise ServeError(f"cannot read {db.path} ({name}): {exc}") from exc
    config = uvicorn.Config(ds.app(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/"
        print(
            f"fogline serve: Datasette at {url} ({', '.join(names)}, read-only); Ctrl-C stops it",
            flush=True,
        )
        if open_browser and not webbrowser.open(url):
            print(f"fogline serve: no web browser found; open {url}", file=sys.stderr)
    await task


def run(args: argparse.Namespace) -> int:
    """Entry of `fogline serve`; exit status 2 with a message when it cannot start."""
    _check_host(args.host, args.public)
    stores = cloud_stores(args.data_dir)
    try:
        from datasette.app import Datasette
        from datasette.database import Database
    except ImportError as exc:
        raise ServeError(f"needs Datasette: pip install 'datasette>=0.65,<1' ({exc})") from exc
    if args.public and not is_loopback(args.host):
        print(
            f"fogline serve: listening on {args.host}: anyone who can reach it can read the data",
            file=sys.stderr,
        )
    for store in stores:
        if size := _unflushed_wal(store):
            print(
                f"fogline serve: {store} has {size} bytes in its write-ahead log (a sink is "
                "running, or was not stopped cleanly): immutable mode does not show them",
                file=sys.stderr,
            )
    names = [database_name(s) for s in stores]
    ds = Datasette(
        [],
        metadata=metadata(names, data_dir=args.data_dir),
        settings={"sql_time_limit_ms": SQL_TIME_LIMIT_MS},
        version_note=f"fogline {__version__}",
    )
    for store, name in zip(stores, names, strict=True):
        ds.add_database(Database(ds, path=str(store.resolve()), is_mutable=False), name=name)

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to this handler.
    signal.signal(signal.SIGTERM, on_term)
    sock = _listen(args.host, args.port)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(ds, names, sock, args.open))
    except SystemExit as exc:  # uvicorn's way of saying it could not start
        raise ServeError(f"the server did not start (uvicorn exit status {exc.code})") from exc
    finally:
        sock.close()
    print("fogline serve: stopped", file=sys.stderr)
    return 0
