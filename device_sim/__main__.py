"""`device-sim`: run one device-sim process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from device_sim.sim import DeviceSim, SimConfig
from fogline.service import main as run_service


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `device-sim` command."""
    return run_service(
        DeviceSim, SimConfig, argv, prog="device-sim",
        description="Simulated machines publishing packed telemetry batches over MQTT.",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
