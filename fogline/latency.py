"""Latency histograms (HDR): recorded in a process, shipped in its metrics, merged by readers.

A process records seconds into a `Latency` (microsecond resolution, 1 us to 10 min, three
significant digits). Its metrics carry the histogram as a compact base64 string gauge
(`latency.<name>`) plus plain gauges for the usual percentiles in milliseconds
(`latency.<name>.p50_ms`, `.p99_ms`, `.p999_ms`, `.count`), so that `fogline status` and
Prometheus see numbers and a benchmark can merge the exact histograms of several processes.
"""

from __future__ import annotations

from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 600_000_000
DIGITS = 3
PERCENTILES = (("p50_ms", 50.0), ("p99_ms", 99.0), ("p999_ms", 99.9))


class Latency:
    """One latency distribution (seconds in, milliseconds out)."""

    def __init__(self) -> None:
        self.hist = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)

    def record(self, seconds: float) -> None:
        """Add one latency; negative ones (clocks of two hosts disagree) count as 0."""
        us = min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US)
        self.hist.record_value(us)

    @property
    def count(self) -> int:
        """Latencies recorded."""
        return int(self.hist.get_total_count())

    def percentile_ms(self, p: float) -> float:
        """The `p`th percentile in milliseconds (0 when empty)."""
        return self.hist.get_value_at_percentile(p) / 1000.0 if self.count else 0.0

    def gauges(self, name: str) -> dict[str, float | str]:
        """Metrics gauges: the encoded histogram and its usual percentiles."""
        out: dict[str, float | str] = {f"latency.{name}": self.encode()}
        out |= {f"latency.{name}.{k}": self.percentile_ms(p) for k, p in PERCENTILES}
        out[f"latency.{name}.count"] = self.count
        return out

    def encode(self) -> str:
        """The histogram as text (HdrHistogram's compressed base64 encoding)."""
        return bytes(self.hist.encode()).decode("ascii")

    @classmethod
    def merged(cls, encoded: Iterable[str]) -> Latency:
        """One histogram of several processes' encoded ones."""
        out = cls()
        for text in encoded:
            out.hist.add(HdrHistogram.decode(text.encode("ascii")))
        return out
