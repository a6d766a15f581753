"""`fog-aggregator`: run one fog-aggregator process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fog_aggregator.aggregator import FogAggregator, FogConfig
from fogline.service import main as run_service


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fog-aggregator` command."""
    return run_service(
        FogAggregator, FogConfig, argv, prog="fog-aggregator",
        description="Fog aggregator: forwards edge records to the cloud, adds rollups.",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
