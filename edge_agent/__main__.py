"""`edge-agent`: run an edge agent."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from edge_agent.agent import EdgeAgent, EdgeConfig
from fogline.config import parse
from fogline.service import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge-agent` command."""
    cfg = parse(
        EdgeConfig,
        argv,
        prog="edge-agent",
        description="Edge agent: windows telemetry, decides per window, forwards what matters.",
        section="edge-agent",
    )
    setup_logging(cfg.log_level)
    return EdgeAgent(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
