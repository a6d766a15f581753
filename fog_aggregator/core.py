"""The fog's pure core: which records it forwards and how it rolls them up per site (edge)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fogline.codec import Record

FORWARDED_KINDS = frozenset(("summary", "event", "drop"))
#: Records the fog keeps for itself: raw training samples stay in the region.
KEPT_KINDS = frozenset(("train",))


@dataclass(slots=True)
class SiteTally:
    """What one edge (site) delivered since the last rollup."""

    readings: int = 0
    summaries: int = 0
    events: int = 0
    dropped: int = 0
    devices: set[str] = field(default_factory=set)

    def add(self, rec: Record) -> None:
        """Count one record."""
        body = rec.body
        if rec.kind == "summary":
            self.summaries += 1
            count = body.get("count")
            self.readings += count if isinstance(count, int) else 0
        elif rec.kind == "event":
            self.events += 1
        elif rec.kind == "drop":
            for r in body.get("ranges") or []:
                if isinstance(r, list) and len(r) == 3 and all(isinstance(x, int) for x in r[1:]):
                    self.dropped += r[2] - r[1] + 1
        device = body.get("device")
        if isinstance(device, str):
            self.devices.add(device)


def split(records: list[Record]) -> tuple[list[Record], list[Record], list[Record]]:
    """Separate records to forward, records to keep at the fog, and records of unknown kind."""
    ok = [r for r in records if r.kind in FORWARDED_KINDS]
    kept = [r for r in records if r.kind in KEPT_KINDS]
    bad = [r for r in records if r.kind not in FORWARDED_KINDS | KEPT_KINDS]
    return ok, kept, bad


def tally(by_site: dict[str, list[Record]]) -> dict[str, SiteTally]:
    """Tally records per site."""
    out: dict[str, SiteTally] = defaultdict(SiteTally)
    for site, records in by_site.items():
        for rec in records:
            out[site].add(rec)
    return dict(out)


def rollup_body(fog: str, site: str, t0: float, t1: float, row: dict[str, Any]) -> dict[str, Any]:
    """The body of a `rollup` record for one site over [t0, t1)."""
    return {"fog": fog, "edge": site, "t0": t0, "t1": t1, **row}
