"""Process logging: plain text or JSON lines, and the correlation id that follows a record.

A custody record's correlation id (`cid`) is `<edge>:<kind>:<device>:<first>-<last>`: it is read
from the record body, which the edge writes once and the fog forwards unchanged, so each layer
derives the same id without a byte on the wire (an explicit `cid` in a body wins). Each layer logs
one DEBUG line per record with it (also as the JSON field `cid`): one `grep` over the three logs
shows the record's path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from fogline.custody import coverage

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def record_cid(kind: str, body: dict[str, Any]) -> str | None:
    """The correlation id of a record: stable (no seq, no clock) and unique per edge, kind and
    reading range; None for records that cover no readings (rollups)."""
    given = body.get("cid")
    if isinstance(given, str):
        return given
    origin = body.get("edge", body.get("origin"))
    device, first, last = coverage(body)
    if device is None:
        # Drop notices name their readings in `ranges` instead.
        ranges = body.get("ranges")
        if not (isinstance(ranges, list) and ranges and isinstance(ranges[0], list)):
            return None
        if len(ranges[0]) != 3:
            return None
        device, first, last = ranges[0]
    if not isinstance(origin, str):
        return None
    return f"{origin}:{kind}:{device}:{first}-{last}"


def log_records(
    logger: logging.Logger, what: str, records: Iterable[tuple[str, dict[str, Any]]]
) -> None:
    """One DEBUG line per record that has a `cid`: `<what> <kind> cid=<cid>`.

    Callers check `logger.isEnabledFor(logging.DEBUG)` first so the hot path stays cheap.
    """
    for kind, body in records:
        cid = record_cid(kind, body)
        if cid is not None:
            logger.debug("%s %s cid=%s", what, kind, cid, extra={"cid": cid})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, role, id, and cid when set."""

    def __init__(self, *, role: str | None = None, ident: str | None = None) -> None:
        super().__init__()
        self.role = role
        self.ident = ident

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.role is not None:
            line["role"] = self.role
        if self.ident is not None:
            line["id"] = self.ident
        cid = getattr(record, "cid", None)
        if cid is not None:
            line["cid"] = cid
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(
    level: str, fmt: str = "text", *, role: str | None = None, ident: str | None = None
) -> None:
    """Configure process logging once: `text` (timestamps, logger names) or `json` lines."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role=role, ident=ident))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
