"""`cloud-sink`: run a cloud sink."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cloud_sink.sink import CloudSink, SinkConfig
from fogline.config import parse
from fogline.service import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cloud-sink` command."""
    cfg = parse(
        SinkConfig,
        argv,
        prog="cloud-sink",
        description="Cloud sink: stores every record from the fog in SQLite, exactly once.",
        section="cloud-sink",
    )
    setup_logging(cfg.log_level)
    return CloudSink(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
