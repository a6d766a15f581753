"""`edge-agent`: run one edge-agent process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from edge_agent.agent import EdgeAgent, EdgeConfig
from fogline.service import main as run_service


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge-agent` command."""
    return run_service(
        EdgeAgent, EdgeConfig, argv, prog="edge-agent",
        description="Edge agent: windows telemetry, decides per window, forwards what matters.",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
