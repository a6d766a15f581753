"""`fogline query`: read-only questions to the cloud stores of a data dir (`cloud-*/cloud.db`)
and to PostgreSQL stores named by URL (`--store`).

Each query is a function `(data_dir, filters) -> rows` (a list of flat dicts) with its column
order in `COLUMNS`; `format_rows()` prints rows as an aligned table, JSON or CSV. The CLI only
parses flags and turns `QueryError` into a message and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from fogline.cloudstores import Reader, StoreReadError, is_url, open_reader, sqlite_stores
from fogline.errors import FoglineError
from fogline.report import Span, read_ledgers, size, subtract, union

DEFAULT_LIMIT = 50
_EVENT_COLUMNS = (
    "ts", "device", "edge", "kind", "first", "last", "status", "fault", "confidence",
    "hours_to_failure", "recommendation", "score", "threshold", "escalated", "verdict_by",
    "unconfirmed", "model", "repeats", "field", "value", "baseline", "z", "src", "seq", "stored",
)  # fmt: skip
_SUMMARY_COLUMNS = (
    "device", "edge", "first", "last", "count", "t0", "t1", "events", "fields", "min", "mean",
    "max", "std", "src", "seq", "stored",
)  # fmt: skip
_ROLLUP_COLUMNS = (
    "fog", "edge", "t0", "t1", "readings", "summaries", "events", "dropped", "devices", "src",
    "seq", "stored",
)  # fmt: skip
_ROLLOUT_COLUMNS = (
    "ts",
    "fog",
    "name",
    "version",
    "event",
    "edge",
    "detail",
    "src",
    "seq",
    "stored",
)
# Columns of each query, in order (JSON and CSV carry all of them).
COLUMNS: dict[str, tuple[str, ...]] = {
    "at-risk": (
        "device", "edge", "fault", "confidence", "hours_to_failure", "recommendation",
        "warnings", "repeats", "first_warning", "last_warning", "last_seen", "model",
    ),
    "events": _EVENT_COLUMNS,
    "summaries": _SUMMARY_COLUMNS,
    "coverage": ("device", "edge", "produced", "covered", "dropped", "unaccounted", "duplicates"),
    "rollups": _ROLLUP_COLUMNS,
    "rollouts": _ROLLOUT_COLUMNS,
}  # fmt: skip
# The narrower choice of the aligned table (`what` and `score` merge the two kinds of event).
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": (
        "ts", "device", "edge", "kind", "first", "last", "what", "score", "confidence",
        "hours_to_failure", "recommendation", "verdict_by", "model",
    ),
    "summaries": ("device", "edge", "first", "last", "count", "t0", "t1", "events", "stored"),
    "rollups": (
        "fog", "edge", "t0", "t1", "readings", "summaries", "events", "dropped", "devices",
    ),
    "rollouts": ("ts", "fog", "name", "version", "event", "edge", "detail"),
}  # fmt: skip
# Columns holding Unix times, shown as local date and time in the table.
TIME_COLUMNS = frozenset(("ts", "t0", "t1", "stored", "first_warning", "last_warning", "last_seen"))


class QueryError(FoglineError):
    """A query cannot be answered (no data dir, no cloud store, a bad filter); `path` if any."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------- reading the stores


def cloud_stores(data_dir: Path) -> list[Path]:
    """The SQLite cloud stores under `data_dir`; raises `QueryError` if there is none."""
    if not data_dir.is_dir():
        raise QueryError(f"no data dir at {data_dir}", data_dir)
    found = sqlite_stores(data_dir)
    if not found:
        raise QueryError(f"no cloud store (cloud-*/cloud.db) under {data_dir}", data_dir)
    return found


def store_locations(data_dir: Path, stores: Sequence[str] = ()) -> list[Path | str]:
    """The SQLite cloud stores under `data_dir`, then the PostgreSQL `stores` (URLs); with
    URLs the data dir may hold no store (or not exist). Raises `QueryError` if there is none."""
    for url in stores:
        if not is_url(url):
            raise QueryError(f"--store {url!r} is not a postgresql:// URL")
    if not stores:
        return list(cloud_stores(data_dir))
    return [*sqlite_stores(data_dir), *stores]


@contextmanager
def _read_only(location: Path | str) -> Iterator[Reader]:
    path = location if isinstance(location, Path) else None
    try:
        with open_reader(location) as reader:
            yield reader
    except StoreReadError as exc:
        raise QueryError(str(exc), path) from exc


def _select(
    data_dir: Path, sql: str, params: tuple[Any, ...] = (), stores: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """`sql` on every cloud store of `data_dir` and on `stores`, rows of all of them."""
    out: list[dict[str, Any]] = []
    for location in store_locations(data_dir, stores):
        with _read_only(location) as reader:
            out += reader.select(sql, params)
    return out


def _limited(
    rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], limit: int | None
) -> list[dict[str, Any]]:
    rows.sort(key=key)
    return rows[:limit] if limit else rows


def _newest(*cols: str) -> Callable[[dict[str, Any]], Any]:
    """Sort key: newest first by `cols` (missing values last), then device/edge and `first`."""

    def key(r: dict[str, Any]) -> Any:
        return (
            *(-(r[c] if r.get(c) is not None else float("-inf")) for c in cols),
            r.get("device") or r.get("edge") or "",
            -(r.get("first") or 0),
            r.get("src") or "",
            r.get("seq") or 0,
        )

    return key


# --------------------------------------------------------------------------- the queries


def at_risk(data_dir: Path, *, stores: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Devices with model warnings: the latest warning's fault, confidence, predicted hours to
    failure and recommendation, how many warnings, and when the device was last seen; soonest
    predicted failure first (devices without a prediction last, most warnings first)."""
    warnings = _select(
        data_dir,
        "SELECT device, edge, ts, fault, confidence, hours_to_failure, recommendation, repeats,"
        " model, src, seq FROM events WHERE kind = 'model' AND status = 'warning'",
        stores=stores,
    )
    seen: dict[str, float] = {}
    for r in _select(
        data_dir,
        "SELECT device, max(t) AS t FROM (SELECT device, t1 AS t FROM summaries"
        " UNION ALL SELECT device, ts AS t FROM events) AS seen GROUP BY device",
        stores=stores,
    ):
        if r["t"] is not None:
            seen[r["device"]] = max(seen.get(r["device"], r["t"]), r["t"])
    by_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in warnings:
        by_device[w["device"]].append(w)
    rows = []
    for device, ws in by_device.items():
        ws.sort(key=lambda w: (w["ts"] or 0.0, w["src"], w["seq"]))
        latest = ws[-1]
        times = [w["ts"] for w in ws if w["ts"] is not None]
        rows.append(
            {
                "device": device,
                "edge": latest["edge"],
                "fault": latest["fault"],
                "confidence": latest["confidence"],
                "hours_to_failure": latest["hours_to_failure"],
                "recommendation": latest["recommendation"],
                "warnings": len(ws),
                "repeats": sum(w["repeats"] or 0 for w in ws),
                "first_warning": min(times) if times else None,
                "last_warning": max(times) if times else None,
                "last_seen": seen.get(device),
                "model": latest["model"],
            }
        )
    rows.sort(
        key=lambda r: (
            r["hours_to_failure"] is None,
            r["hours_to_failure"] or 0.0,
            -r["warnings"],
            r["device"],
        )
    )
    return rows


def events(
    data_dir: Path,
    *,
    device: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int | None = DEFAULT_LIMIT,
    stores: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Stored events (z-score and model), newest first by `ts`, filtered by device and by
    `since <= ts <= until`; at most `limit` (None or 0: all)."""
    if since is not None and until is not None and since > until:
        raise QueryError("--since is after --until")
    where, params = _where(device=device, since=since, until=until)
    cols = ", ".join(c for c in _EVENT_COLUMNS)
    # `IS NULL` first: PostgreSQL would put rows without a time first in DESC order.
    sql = f"SELECT {cols} FROM events{where} ORDER BY ts IS NULL, ts DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = _select(data_dir, sql, params, stores)
    for r in rows:
        r["escalated"] = None if r["escalated"] is None else bool(r["escalated"])
        r["unconfirmed"] = None if r["unconfirmed"] is None else bool(r["unconfirmed"])
    return _limited(rows, _newest("ts"), limit)


def summaries(
    data_dir: Path,
    *,
    device: str | None = None,
    limit: int | None = DEFAULT_LIMIT,
    stores: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Stored summaries, newest first (by the time of their last reading), for one device or
    all; `fields`, `min`, `mean`, `max` and `std` are lists; at most `limit` (None or 0: all)."""
    where, params = _where(device=device)
    sql = f"SELECT {', '.join(_SUMMARY_COLUMNS)} FROM summaries{where}"
    sql += " ORDER BY t1 IS NULL, t1 DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = _select(data_dir, sql, params, stores)
    for r in rows:
        for k in ("fields", "min", "mean", "max", "std"):
            r[k] = json.loads(r[k]) if r[k] else None
    return _limited(rows, _newest("t1"), limit)


def rollups(
    data_dir: Path,
    *,
    edge: str | None = None,
    limit: int | None = DEFAULT_LIMIT,
    stores: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Stored per-edge rollups of the fogs, newest period first; at most `limit` (None or 0:
    all)."""
    where, params = ("", ()) if edge is None else (" WHERE edge = ?", (edge,))
    sql = f"SELECT {', '.join(_ROLLUP_COLUMNS)} FROM rollups{where} ORDER BY t1 IS NULL, t1 DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    return _limited(_select(data_dir, sql, params, stores), _newest("t1"), limit)


def rollouts(
    data_dir: Path,
    *,
    name: str | None = None,
    edge: str | None = None,
    limit: int | None = DEFAULT_LIMIT,
    stores: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Model rollout history (every fog's steps and every edge's install answers), newest first;
    empty for a store written before model rollouts existed."""
    conds, params = [], []
    for cond, value in (("name = ?", name), ("edge = ?", edge)):
        if value is not None:
            conds.append(cond)
            params.append(value)
    where = " WHERE " + " AND ".join(conds) if conds else ""
    out: list[dict[str, Any]] = []
    for location in store_locations(data_dir, stores):
        with _read_only(location) as reader:
            if reader.has_table("model_events"):
                sql = f"SELECT {', '.join(_ROLLOUT_COLUMNS)} FROM model_events{where}"
                out += reader.select(sql, tuple(params))
    return _limited(out, _newest("ts", "seq"), limit)


def _where(
    *, device: str | None = None, since: float | None = None, until: float | None = None
) -> tuple[str, tuple[Any, ...]]:
    conds, params = [], []
    for cond, value in (("device = ?", device), ("ts >= ?", since), ("ts <= ?", until)):
        if value is not None:
            conds.append(cond)
            params.append(value)
    return (" WHERE " + " AND ".join(conds) if conds else ""), tuple(params)


def coverage(
    data_dir: Path, *, device: str | None = None, stores: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Custody accounting per device, as `fogline report` does it for the whole data dir:
    produced (ledgers), covered (union of stored summaries and events), dropped by reason (not
    covered, reasons in alphabetical order, a reading counts once), unaccounted and duplicates.
    Columns `dropped.<reason>` follow `dropped` for every reason in the stores."""
    ledger, _ = read_ledgers(data_dir)
    where, params = _where(device=device)
    summary_spans: dict[str, list[Span]] = defaultdict(list)
    event_spans: dict[str, list[Span]] = defaultdict(list)
    drop_spans: dict[str, dict[str, list[Span]]] = defaultdict(lambda: defaultdict(list))
    extra_events: dict[str, int] = defaultdict(int)
    edges: dict[str, str] = {}
    for r in _select(
        data_dir, f"SELECT device, edge, first, last FROM summaries{where}", params, stores
    ):
        summary_spans[r["device"]].append((r["first"], r["last"]))
        edges.setdefault(r["device"], r["edge"])
    for r in _select(
        data_dir,
        f"SELECT device, first, last, count(*) AS n FROM events{where}"
        " GROUP BY device, first, last",
        params,
        stores,
    ):
        event_spans[r["device"]].append((r["first"], r["last"]))
        extra_events[r["device"]] += r["n"] - 1
    reasons: set[str] = set()
    for r in _select(
        data_dir, f"SELECT device, first, last, reason FROM drop_ranges{where}", params, stores
    ):
        drop_spans[r["device"]][r["reason"]].append((r["first"], r["last"]))
        reasons.add(r["reason"])
    devices = set(summary_spans) | set(event_spans) | set(drop_spans)
    devices |= set(ledger) if device is None else ({device} & set(ledger))
    rows = []
    for dev in sorted(devices):
        made = ledger.get(dev, ("", 0))[1]
        merged = union(summary_spans.get(dev, []))
        taken = union([*merged, *event_spans.get(dev, [])])
        n_cov = size(taken)
        lost_by: dict[str, int] = dict.fromkeys(sorted(reasons), 0)
        for reason in sorted(drop_spans.get(dev, {})):
            lost = subtract(union(drop_spans[dev][reason]), taken)
            lost_by[reason] = size(lost)
            taken = union([*taken, *lost])
        n_drop = sum(lost_by.values())
        overlap = sum(b - a + 1 for a, b in summary_spans.get(dev, [])) - size(merged)
        rows.append(
            {
                "device": dev,
                "edge": ledger[dev][0] if dev in ledger else edges.get(dev),
                "produced": made,
                "covered": n_cov,
                "dropped": n_drop,
                **{f"dropped.{k}": v for k, v in lost_by.items()},
                "unaccounted": made - n_cov - n_drop,
                "duplicates": overlap + extra_events.get(dev, 0),
            }
        )
    return rows


# --------------------------------------------------------------------------- timestamps


_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, now: float) -> float:
    """A timestamp as Unix seconds: a number (Unix seconds), ISO 8601 (`2024-06-01T12:00`, local
    time unless it names a zone) or a duration before `now` (`90s`, `15m`, `2h`, `1d`)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = _AGO.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise QueryError(
            f"bad timestamp {text!r}: give Unix seconds, ISO 8601 (2024-06-01T12:00:00) "
            "or a time ago (30s, 15m, 2h, 1d)"
        ) from exc


# --------------------------------------------------------------------------- output


def _columns(query: str, rows: list[dict[str, Any]]) -> list[str]:
    cols = list(COLUMNS[query])
    extra = [k for r in rows for k in r if k not in cols]
    if query == "coverage":  # the `dropped.<reason>` columns go right after `dropped`
        at = cols.index("dropped") + 1
        cols[at:at] = list(dict.fromkeys(extra))
    return cols


def _cell(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if col in TIME_COLUMNS and isinstance(v, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if isinstance(v, list):
        return ",".join(_cell("", x) for x in v)
    return str(v)


def _table_row(query: str, r: dict[str, Any]) -> dict[str, Any]:
    if query == "at-risk":  # no fault class: the warning rests on the anomaly score
        return {**r, "fault": r["fault"] or "anomaly"}
    if query != "events":
        return r
    model = r["kind"] == "model"
    return {
        **r,
        "what": (r["fault"] or "anomaly") if model else r["field"],
        "score": r["score"] if model else r["z"],
    }


def format_table(query: str, rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table (numbers right-aligned, times as local date and time)."""
    cols = list(TABLE_COLUMNS.get(query, ())) or _columns(query, rows)
    cells = [[_cell(c, _table_row(query, r).get(c)) for c in cols] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    numeric = [
        c not in TIME_COLUMNS
        and all(isinstance(r[c], int | float) for r in rows if r.get(c) is not None)
        for c in cols
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(cols), *(line(row) for row in cells)])


def format_rows(query: str, rows: list[dict[str, Any]], fmt: str) -> str:
    """Rows of `query` as `table`, `json` (a list of objects, every column) or `csv` (a header
    and every column; lists as JSON)."""
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in _columns(query, rows)} for r in rows], indent=2)
    if fmt == "csv":
        cols = _columns(query, rows)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow(
                "" if r.get(c) is None else json.dumps(r[c]) if isinstance(r[c], list) else r[c]
                for c in cols
            )
        return buf.getvalue().rstrip("\n")
    return format_table(query, rows)


# --------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The subcommands and flags of `fogline query`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", type=Path, default=Path(".fogline/data"),
        help="the deployment's data dir; its cloud-*/cloud.db are read (default: .fogline/data)",
    )  # fmt: skip
    common.add_argument(
        "--store", action="append", default=[], metavar="URL",
        help="also read this PostgreSQL store (a cloud sink's postgresql:// store); repeatable",
    )  # fmt: skip
    out = common.add_mutually_exclusive_group()
    out.add_argument("--json", dest="format", action="store_const", const="json", help="print JSON")
    out.add_argument("--csv", dest="format", action="store_const", const="csv", help="print CSV")
    common.set_defaults(format="table")
    limit = argparse.ArgumentParser(add_help=False)
    limit.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT,
        help=f"at most N rows, newest first; 0 for all (default: {DEFAULT_LIMIT})",
    )  # fmt: skip
    sub = p.add_subparsers(dest="query", required=True, metavar="QUERY")
    s = sub.add_parser(
        "at-risk",
        parents=[common],
        help="devices with model warnings, soonest predicted failure first",
        description="Devices with warnings (model events): latest fault, confidence, predicted "
        "hours to failure, recommendation, number of warnings, last seen.",
    )
    s = sub.add_parser(
        "events",
        parents=[common, limit],
        help="stored events (z-score and model) of a device or a time range",
        description="Stored events, newest first. TS is Unix seconds, ISO 8601 (local time "
        "unless it names a zone) or a time ago (30s, 15m, 2h, 1d).",
    )
    s.add_argument("--device", help="only this device")
    s.add_argument("--since", metavar="TS", help="only events at or after TS")
    s.add_argument("--until", metavar="TS", help="only events at or before TS")
    s = sub.add_parser(
        "summaries", parents=[common, limit], help="stored per-device summaries, newest first"
    )
    s.add_argument("--device", help="only this device")
    s = sub.add_parser(
        "coverage",
        parents=[common],
        help="custody accounting per device: produced, covered, dropped by reason, unaccounted",
    )
    s.add_argument("--device", help="only this device")
    s = sub.add_parser(
        "rollups", parents=[common, limit], help="stored per-edge rollups of the fogs, newest first"
    )
    s.add_argument("--edge", help="only this edge")
    s = sub.add_parser(
        "rollouts",
        parents=[common, limit],
        help="model rollout history: canaries, installs, rejections, promotions, rollbacks",
        description="Every step of the fogs' model rollouts and every edge's answer, newest "
        "first: canary, installed, rejected (with the reason), promoted, rolled_back, retrained, "
        "not_published.",
    )
    s.add_argument("--name", help="only this model (anomaly, classifier, failure)")
    s.add_argument("--edge", help="only the answers of this edge")


def rows_for(args: argparse.Namespace, *, now: float) -> list[dict[str, Any]]:
    """Run the query the parsed flags ask for."""
    if getattr(args, "limit", 0) < 0:
        raise QueryError("--limit must be >= 0")
    q = args.query
    st = args.store
    if q == "at-risk":
        return at_risk(args.data_dir, stores=st)
    if q == "events":
        since = None if args.since is None else parse_time(args.since, now=now)
        until = None if args.until is None else parse_time(args.until, now=now)
        return events(
            args.data_dir, device=args.device, since=since, until=until, limit=args.limit,
            stores=st,
        )  # fmt: skip
    if q == "summaries":
        return summaries(args.data_dir, device=args.device, limit=args.limit, stores=st)
    if q == "coverage":
        return coverage(args.data_dir, device=args.device, stores=st)
    if q == "rollups":
        return rollups(args.data_dir, edge=args.edge, limit=args.limit, stores=st)
    if q == "rollouts":
        return rollouts(args.data_dir, name=args.name, edge=args.edge, limit=args.limit, stores=st)
    raise QueryError(f"unknown query {q!r}")


def run(args: argparse.Namespace) -> int:
    """Entry of `fogline query`; exit status 2 with a message when it cannot be answered."""
    try:
        rows = rows_for(args, now=time.time())
    except QueryError as exc:
        print(f"fogline query {args.query}: error: {exc}", file=sys.stderr)
        return 2
    if rows or args.format != "table":
        print(format_rows(args.query, rows, args.format))
    else:
        print(f"fogline query {args.query}: no rows", file=sys.stderr)
    limit = getattr(args, "limit", 0)
    if args.format == "table" and limit and len(rows) == limit:
        print(f"(the newest {limit} rows; --limit 0 shows all)", file=sys.stderr)
    return 0
