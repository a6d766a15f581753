"""The edge's pure core: per-device sequencing, windows, a z-score detector and summaries.

No broker, no clock, no disk: `EdgeCore` takes decoded telemetry and the current time and returns
custody records `(kind, body)`. Summaries cover contiguous reading ranges exactly; every reading
that cannot be summarised (a gap, a duplicate-free overlap trimmed, a non-finite value) is reported
in a `drop` record with its range and reason, so coverage can be proved downstream.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.decisions import ModelDecisions, Window
from fogline.codec import Telemetry
from fogline.latency import Latency

Record = tuple[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Rules:
    """Windowing and detection settings."""

    window: int = 20
    z_threshold: float = 4.0
    warmup_windows: int = 5
    baseline_alpha: float = 0.05
    summary_interval: float = 5.0


#: Readings blocks a summary keeps before folding them into its totals (one reduction per
#: this many messages instead of one per message).
FOLD_BLOCKS = 8


@dataclass(slots=True)
class _Summary:
    first: int
    fields: tuple[str, ...]
    t0: float
    count: int = 0
    t1: float = 0.0
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    events: int = 0
    blocks: list[np.ndarray] = field(default_factory=list)

    def add(self, values: np.ndarray, t1: float) -> None:
        self.blocks.append(values)
        self.count += len(values)
        self.t1 = t1
        if len(self.blocks) >= FOLD_BLOCKS:
            self.fold()

    def fold(self) -> None:
        """Fold the blocks taken since the last fold into the totals."""
        if not self.blocks:
            return
        v = np.concatenate(self.blocks).astype(np.float64)
        self.blocks = []
        total, total_sq, low, high = v.sum(0), (v * v).sum(0), v.min(0), v.max(0)
        if self.total is None or self.total_sq is None or self.low is None or self.high is None:
            self.total, self.total_sq, self.low, self.high = total, total_sq, low, high
        else:
            self.total += total
            self.total_sq += total_sq
            self.low = np.minimum(self.low, low)
            self.high = np.maximum(self.high, high)


@dataclass(slots=True)
class DeviceState:
    """What the edge knows of one device."""

    expected: int
    summary: _Summary | None = None
    summary_due: float = 0.0
    window: list[np.ndarray] = field(default_factory=list)
    window_first: int = 0
    window_len: int = 0
    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    windows_seen: int = 0
    summaries: int = 0  # opened since the edge started


class EdgeCore:
    """Turns telemetry into events, summaries and drop notices for one edge."""

    def __init__(
        self,
        edge: str,
        rules: Rules,
        expected: dict[str, int] | None = None,
        decisions: ModelDecisions | None = None,
        latency: Latency | None = None,
    ) -> None:
        self.edge = edge
        #: Device publish -> decision, per window decided here (the z-score rule).
        self.latency = latency or Latency()
        self.rules = rules
        #: Model-based decisions; windows the models cannot score use the z-score rule.
        self.decisions = decisions
        self.devices: dict[str, DeviceState] = {
            d: DeviceState(expected=e) for d, e in (expected or {}).items()
        }
        self.stats = {"readings": 0, "duplicates": 0, "gaps": 0, "events": 0, "non_finite": 0}
        self._written: dict[str, int] = dict(expected or {})  # restart points on disk
        self._touched: set[str] = set()  # devices whose restart point may have moved since

    # ---------------------------------------------------------------- ingest

    def is_replay(self, tele: Telemetry) -> bool:
        """Whether every reading of the batch was already taken (a duplicate delivery or replay)."""
        state = self.devices.get(tele.device)
        return state is not None and tele.last < state.expected

    def ingest(self, tele: Telemetry, now: float, published: float | None = None) -> list[Record]:
        """Take one telemetry batch; returns the records it produced (events, drops, summaries).

        `published` is when the device published the batch (wall clock, its envelope's `ts`):
        the windows it completes carry it, for the decision and commit latencies.
        """
        state = self.devices.get(tele.device)
        if state is None:
            # Devices number their readings from 0: an edge that first hears of a device at
            # reading N reports readings 0..N-1 as a gap rather than ignoring them.
            state = self.devices[tele.device] = DeviceState(expected=0)
        self._touched.add(tele.device)
        out: list[Record] = []
        values, first, t0 = tele.values, tele.first, tele.t0
        if tele.last < state.expected:
            self.stats["duplicates"] += tele.count
            return out
        if first < state.expected:  # overlap with what we have: keep the new part only
            skip = state.expected - first
            self.stats["duplicates"] += skip
            values, first, t0 = values[skip:], state.expected, t0 + skip * tele.dt
        if first > state.expected:
            out += self._discontinuity(tele.device, state, now)
            out.append(self._drop(tele.device, state.expected, first - 1, "gap", now))
            self.stats["gaps"] += first - state.expected
        last = first + len(values) - 1
        state.expected = last + 1
        if not np.isfinite(values).all():
            out += self._discontinuity(tele.device, state, now)
            out.append(self._drop(tele.device, first, last, "non_finite", now))
            self.stats["non_finite"] += len(values)
            return out
        self.stats["readings"] += len(values)
        t_last = tele.t0 + tele.dt * (tele.count - 1)
        if state.summary is None or state.summary.fields != tele.fields:
            if state.summary is not None:
                out += self._discontinuity(tele.device, state, now)
            state.summary = _Summary(first=first, fields=tele.fields, t0=t0)
            interval = self.rules.summary_interval
            if not state.summaries:
                # A device's first summary here lasts between half and all of the interval
                # (by its id): devices that start together then close their summaries spread
                # over the interval, not all in one tick that holds up every decision behind it.
                interval *= 0.5 + 0.5 * zlib.crc32(tele.device.encode()) / 2**32
            state.summaries += 1
            state.summary_due = now + interval
        state.summary.add(values, t_last)
        sent = now if published is None else published
        out += self._windows(tele.device, state, values, first, t_last, tele.fields, sent, now)
        return out

    def _windows(
        self,
        device: str,
        state: DeviceState,
        values: np.ndarray,
        first: int,
        ts: float,
        fields: tuple[str, ...],
        published: float,
        now: float,
    ) -> list[Record]:
        out: list[Record] = []
        size = self.rules.window
        pos = 0
        while pos < len(values):
            if state.window_len == 0:
                state.window_first = first + pos
            take = min(size - state.window_len, len(values) - pos)
            state.window.append(values[pos : pos + take])
            state.window_len += take
            pos += take
            if state.window_len == size:
                win = np.concatenate(state.window)
                if self.decisions is not None and self.decisions.accepts(fields):
                    self.decisions.add(
                        Window(device, state.window_first, win, fields, ts, published)
                    )
                else:
                    event = self._decide(device, state, win, ts, published)
                    self.latency.record(now - published)
                    if event is not None:
                        out.append(event)
                state.window, state.window_len = [], 0
        return out

    def _decide(
        self, device: str, state: DeviceState, win: np.ndarray, ts: float, published: float
    ) -> Record | None:
        """z-score of the window mean against the device's running baseline (EWMA)."""
        m = win.astype(np.float64).mean(0)
        state.windows_seen += 1
        if state.mean is None or state.var is None:
            state.mean, state.var = m, np.zeros_like(m)
            return None
        std = np.sqrt(state.var) + 1e-9 + 1e-3 * np.abs(state.mean)
        z = (m - state.mean) / std
        j = int(np.abs(z).argmax())
        abnormal = (
            state.windows_seen > self.rules.warmup_windows and abs(z[j]) > self.rules.z_threshold
        )
        if not abnormal:  # anomalies must not drag the baseline towards themselves
            # A plain running mean/variance while few windows are known, then an EWMA: starting
            # with the EWMA alone underestimates the variance right after warm-up.
            a = max(self.rules.baseline_alpha, 1.0 / state.windows_seen)
            delta = m - state.mean
            state.mean = state.mean + a * delta
            state.var = (1 - a) * (state.var + a * delta * delta)
            return None
        self.stats["events"] += 1
        if state.summary is not None:
            state.summary.events += 1
        assert state.summary is not None
        first = state.window_first
        return (
            "event",
            {
                "edge": self.edge,
                "device": device,
                "first": first,
                "last": first + len(win) - 1,
                "count": len(win),
                "ts": ts,
                "kind": "zscore",
                "field": state.summary.fields[j],
                "value": float(m[j]),
                "baseline": float(state.mean[j]),
                "z": float(z[j]),
                "published": published,
            },
        )

    # ---------------------------------------------------------------- summaries

    def due_summaries(self, now: float, *, force: bool = False) -> list[Record]:
        """Close and return the summaries whose interval has elapsed (all of them with `force`)."""
        out: list[Record] = []
        for device, state in self.devices.items():
            if state.summary is not None and (force or now >= state.summary_due):
                out += self._break(device, state, now)
        return out

    def _discontinuity(self, device: str, state: DeviceState, now: float) -> list[Record]:
        """Readings stop being contiguous: close the summary and start a new window."""
        state.window, state.window_len = [], 0
        return self._break(device, state, now)

    def _break(self, device: str, state: DeviceState, now: float) -> list[Record]:
        """Close the device's open summary (at a discontinuity or when due)."""
        self._touched.add(device)
        s = state.summary
        if s is None or s.count == 0:
            state.summary = None
            return []
        state.summary = None
        s.fold()
        assert s.total is not None and s.total_sq is not None
        assert s.low is not None and s.high is not None
        mean = s.total / s.count
        var = np.maximum(s.total_sq / s.count - mean * mean, 0.0)
        body = {
            "edge": self.edge,
            "device": device,
            "first": s.first,
            "last": s.first + s.count - 1,
            "count": s.count,
            "t0": s.t0,
            "t1": s.t1,
            "fields": list(s.fields),
            "min": s.low.tolist(),
            "mean": mean.tolist(),
            "max": s.high.tolist(),
            "std": np.sqrt(var).tolist(),
            "events": s.events,
        }
        return [("summary", body)]

    def _drop(self, device: str, first: int, last: int, reason: str, now: float) -> Record:
        body = {
            "reason": reason,
            "origin": self.edge,
            "records": 0,
            "kinds": {},
            "ranges": [[device, first, last]],
            "ts": now,
        }
        return ("drop", body)

    def committed(self) -> dict[str, int]:
        """Per device, the first reading not in a closed summary or drop (the restart point)."""
        return {device: _restart_point(state) for device, state in self.devices.items()}

    def moved_restart_points(self) -> dict[str, int]:
        """The restart points that moved since the last call (to be written with the records)."""
        out = {}
        for device in self._touched:
            point = _restart_point(self.devices[device])
            if self._written.get(device) != point:
                out[device] = point
        self._touched.clear()
        self._written |= out
        return out


def _restart_point(state: DeviceState) -> int:
    s = state.summary
    return s.first if s is not None and s.count else state.expected
