"""`fog-aggregator`: run a fog aggregator."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fog_aggregator.aggregator import FogAggregator, FogConfig
from fogline.config import parse
from fogline.service import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fog-aggregator` command."""
    cfg = parse(
        FogConfig,
        argv,
        prog="fog-aggregator",
        description="Fog aggregator: forwards edge records to the cloud, adds rollups.",
        section="fog-aggregator",
    )
    setup_logging(cfg.log_level)
    return FogAggregator(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
