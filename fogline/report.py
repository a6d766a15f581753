"""End-to-end accounting: what the simulators produced against what the cloud stored or was told
was dropped. `unaccounted` = produced - covered - dropped, and must be 0."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fogline.cloudstores import label, open_reader, sqlite_stores

Span = tuple[int, int]


def union(spans: Iterable[Span]) -> list[Span]:
    """Merge inclusive `(first, last)` spans into disjoint sorted spans."""
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def size(spans: Iterable[Span]) -> int:
    """Number of integers in disjoint inclusive spans."""
    return sum(b - a + 1 for a, b in spans)


def subtract(spans: list[Span], minus: list[Span]) -> list[Span]:
    """Disjoint sorted `spans` minus disjoint sorted `minus`."""
    out: list[Span] = []
    j = 0
    for lo, hi in spans:
        cur = lo
        while j < len(minus) and minus[j][1] < cur:
            j += 1
        k = j
        while k < len(minus) and minus[k][0] <= hi:
            if minus[k][0] > cur:
                out.append((cur, minus[k][0] - 1))
            cur = max(cur, minus[k][1] + 1)
            k += 1
        if cur <= hi:
            out.append((cur, hi))
    return out


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _sent_bytes(paths: Iterable[Path]) -> int:
    total = 0
    for path in paths:
        conn = _read_only(path)
        try:
            row = conn.execute("SELECT value FROM outbox_meta WHERE key = 'sent_bytes'").fetchone()
            total += int(row[0]) if row else 0
        except sqlite3.OperationalError:
            pass  # a process that never sent anything has no outbox yet
        finally:
            conn.close()
    return total


def read_ledgers(data_dir: Path) -> tuple[dict[str, tuple[str, int]], int]:
    """Every simulator ledger (`device-sim-*/ledger.db`): device -> (edge, produced), and the
    telemetry bytes they published in all."""
    out: dict[str, tuple[str, int]] = {}
    total = 0
    for path in sorted(data_dir.glob("device-sim-*/ledger.db")):
        conn = _read_only(path)
        try:
            for device, edge, produced in conn.execute("SELECT device, edge, produced FROM ledger"):
                out[device] = (edge, produced)
            total += conn.execute("SELECT value FROM ledger_totals WHERE key = 'bytes'").fetchone()[
                0
            ]
        finally:
            conn.close()
    return out, total


def build_report(data_dir: Path, stores: Sequence[str] = ()) -> dict[str, Any]:
    """Account for every reading produced under `data_dir` (simulator ledgers + cloud stores),
    reading also the PostgreSQL `stores` (URLs); raises `StoreReadError` for an unreadable one."""
    ledger, ledger_bytes = read_ledgers(data_dir)
    covered_spans: dict[str, list[Span]] = defaultdict(list)
    summary_spans: dict[str, list[Span]] = defaultdict(list)
    drop_spans: dict[str, dict[str, list[Span]]] = defaultdict(lambda: defaultdict(list))
    events = duplicate_events = rejected = 0
    locations: list[Path | str] = [*sqlite_stores(data_dir), *stores]
    for location in locations:
        with open_reader(location) as db:
            for r in db.select("SELECT device, first, last FROM summaries"):
                summary_spans[r["device"]].append((r["first"], r["last"]))
            for r in db.select(
                "SELECT device, first, last, count(*) AS n FROM events GROUP BY device, first, last"
            ):
                covered_spans[r["device"]].append((r["first"], r["last"]))
                events += r["n"]
                duplicate_events += r["n"] - 1
            for r in db.select("SELECT device, first, last, reason FROM drop_ranges"):
                drop_spans[r["device"]][r["reason"]].append((r["first"], r["last"]))
            rejected += db.select("SELECT count(*) AS n FROM rejected")[0]["n"]

    produced = covered = dropped_total = duplicates = 0
    dropped: dict[str, int] = defaultdict(int)
    losses = []
    devices = sorted(set(ledger) | set(summary_spans) | set(covered_spans) | set(drop_spans))
    for device in devices:
        made = ledger.get(device, ("", 0))[1]
        spans = summary_spans.get(device, [])
        merged = union(spans)
        duplicates += sum(b - a + 1 for a, b in spans) - size(merged)
        cov = union([*merged, *covered_spans.get(device, [])])
        n_cov = size(cov)
        n_drop = 0
        taken = cov
        for reason in sorted(drop_spans.get(device, {})):
            lost = subtract(union(drop_spans[device][reason]), taken)
            dropped[reason] += size(lost)
            n_drop += size(lost)
            taken = union([*taken, *lost])
        produced += made
        covered += n_cov
        dropped_total += n_drop
        if made - n_cov - n_drop:
            losses.append({"device": device, "produced": made, "covered": n_cov, "dropped": n_drop})
    return {
        "produced": produced,
        "covered": covered,
        "dropped": dict(sorted(dropped.items())),
        "unaccounted": produced - covered - dropped_total,
        "duplicates": duplicates + duplicate_events,
        "devices": len(ledger),
        "events": events,
        "rejected_records": rejected,
        "bytes": {
            "device_edge": ledger_bytes,
            "edge_fog": _sent_bytes(data_dir.glob("edge-*/edge.db")),
            "fog_cloud": _sent_bytes(data_dir.glob("fog-*/fog.db")),
        },
        "stores": [label(loc) for loc in locations],
        "unaccounted_devices": losses[:20],
    }


def format_report(rep: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    b = rep["bytes"]
    dropped = ", ".join(f"{k} {v}" for k, v in rep["dropped"].items()) or "none"
    lines = [
        f"devices      {rep['devices']}",
        f"produced     {rep['produced']} readings",
        f"covered      {rep['covered']} (stored summaries and events)",
        f"dropped      {sum(rep['dropped'].values())} ({dropped})",
        f"unaccounted  {rep['unaccounted']}",
        f"duplicates   {rep['duplicates']}",
        f"events       {rep['events']}",
        f"rejected     {rep['rejected_records']} records",
        f"bytes        device->edge {b['device_edge']}, edge->fog {b['edge_fog']}, "
        f"fog->cloud {b['fog_cloud']}",
    ]
    for loss in rep["unaccounted_devices"]:
        lines.append(f"  loss: {loss}")
    verdict = "OK: every reading is accounted for" if rep["unaccounted"] == 0 else "LOSS"
    if rep["produced"] == 0 and rep["unaccounted"] == 0:
        verdict = "nothing produced yet"
    return "\n".join([*lines, verdict])
