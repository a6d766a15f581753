"""`cloud-sink`: run one cloud-sink process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cloud_sink.sink import CloudSink, SinkConfig
from fogline.service import main as run_service


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cloud-sink` command."""
    return run_service(
        CloudSink, SinkConfig, argv, prog="cloud-sink",
        description="Cloud sink: stores every fog record exactly once (SQLite or PostgreSQL).",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
