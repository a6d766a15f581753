"""The signal model of the simulated machines (pure numpy, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIELDS = ("vib_rms", "temp_bearing", "temp_motor", "current", "pressure")
# Nominal level, daily swing and noise of each field, in its unit (mm/s, degC, degC, A, bar).
_BASE = np.array([2.0, 55.0, 65.0, 12.0, 6.0], dtype=np.float64)
_SWING = np.array([0.3, 4.0, 5.0, 2.0, 0.2], dtype=np.float64)
_NOISE = np.array([0.05, 0.2, 0.2, 0.1, 0.02], dtype=np.float64)
_SPIKE = np.array([4.0, 25.0, 30.0, 15.0, 3.0], dtype=np.float64)


@dataclass
class Fleet:
    """State of `n` machines: per-machine offsets and a random generator (reproducible by seed)."""

    n: int
    seed: int
    anomaly_rate: float

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.offset = self.rng.normal(0.0, 0.05, size=(self.n, len(FIELDS))) * _BASE
        self.phase = self.rng.uniform(0, 2 * np.pi, size=(self.n, 1))

    def sample(self, t0: float, dt: float, count: int) -> np.ndarray:
        """Readings of every machine for `count` instants from `t0`: shape (n, count, fields)."""
        t = t0 + dt * np.arange(count)
        # Load follows a slow cycle per machine; every field moves with it.
        load = np.sin(2 * np.pi * t[None, :] / 600.0 + self.phase)
        values = (
            (_BASE + self.offset)[:, None, :]
            + load[:, :, None] * _SWING
            + self.rng.normal(size=(self.n, count, len(FIELDS))) * _NOISE
        )
        if self.anomaly_rate > 0:
            # A fault burst hits a whole message of a machine, so windows see it.
            hit = self.rng.random(self.n) < self.anomaly_rate
            if hit.any():
                values[hit, :, :] += _SPIKE
        return values.astype(np.float32)
