"""`device-sim`: run simulated devices that publish telemetry."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from device_sim.sim import DeviceSim, SimConfig
from fogline.config import parse
from fogline.service import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `device-sim` command."""
    cfg = parse(
        SimConfig,
        argv,
        prog="device-sim",
        description="Simulated machines publishing packed telemetry batches over MQTT.",
        section="device-sim",
    )
    setup_logging(cfg.log_level)
    return DeviceSim(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
