"""Model-based decisions at the edge: batching, escalation to the fog, training samples.

Pure logic around a `ModelDetector`: no broker, no clock (callers pass `now`). Windows become
ready as telemetry arrives; `flush()` scores them all at once and returns the records to send and
the escalation requests to publish. An escalated window waits for the fog's verdict until its
deadline; then the edge decides alone and marks the decision unconfirmed.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.models import NORMAL, SENSOR_KINDS, ModelDetector, Verdict, recommendation
from fogline.latency import Latency

Record = tuple[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class EscalationRules:
    """When and how much the edge asks the fog."""

    timeout: float = 2.0  # seconds to wait for the fog's verdict
    rate: float = 20.0  # escalations per second on average (token bucket)
    burst: float = 50.0  # escalations allowed at once
    train_share: float = 0.01  # share of normal windows sent up as training samples
    holdoff: float = 10.0  # seconds during which repeats of a device's warning are only counted
    persistence: int = 2  # consecutive anomalous windows before a score-only warning counts


@dataclass(slots=True)
class Window:
    """A complete window waiting to be scored."""

    device: str
    first: int
    values: np.ndarray
    fields: tuple[str, ...]
    ts: float
    #: When the device published the message that completed the window (wall clock).
    published: float = 0.0

    @property
    def last(self) -> int:
        """Sequence number of the window's last reading."""
        return self.first + len(self.values) - 1


@dataclass(frozen=True, slots=True)
class EscalationRequest:
    """What the edge asks the fog about one window."""

    id: str
    device: str
    first: int
    last: int
    fields: tuple[str, ...]
    features: np.ndarray


@dataclass(slots=True)
class _Waiting:
    window: Window
    verdict: Verdict
    deadline: float


@dataclass
class ModelDecisions:
    """Turns windows into model verdicts, events, escalations and training samples."""

    edge: str
    detector: ModelDetector
    rules: EscalationRules = field(default_factory=EscalationRules)
    pending: list[Window] = field(default_factory=list)
    waiting: dict[str, _Waiting] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    #: Per device: the fault of its last event, when it was sent, and repeats counted since.
    last_event: dict[str, tuple[str | None, float, int]] = field(default_factory=dict)
    #: Per device: how many windows in a row were anomalous.
    streaks: dict[str, int] = field(default_factory=dict)
    #: Device publish -> decision (scored, or answered by the fog), per window.
    latency: Latency = field(default_factory=Latency)
    _tokens: float = -1.0
    _refilled: float = 0.0
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def accepts(self, fields: tuple[str, ...]) -> bool:
        """Whether the models can score telemetry with these fields."""
        return self.detector.can_score(fields)

    def add(self, window: Window) -> None:
        """Queue a complete window for the next batch."""
        self.pending.append(window)

    def flush(self, now: float) -> tuple[list[Record], list[EscalationRequest]]:
        """Score every pending window (one batch per field layout, one invoke per model)."""
        records: list[Record] = []
        requests: list[EscalationRequest] = []
        groups: dict[tuple[str, ...], list[Window]] = {}
        for w in self.pending:
            groups.setdefault(w.fields, []).append(w)
        self.pending = []
        for fields, windows in groups.items():
            verdicts = self.detector.score(np.stack([w.values for w in windows]), fields)
            scored = time.time()
            for w in windows:
                self.latency.record(scored - w.published)
            self.stats["scored"] += len(windows)
            self.stats["batches"] += 1
            for w, v in zip(windows, verdicts, strict=True):
                if self._held(w, v):
                    continue
                if v.uncertain:
                    if self._take_token(now):
                        request = self._escalate(w, v, now)
                        requests.append(request)
                        continue
                    self.stats["over_budget"] += 1
                    if v.status == "warning":
                        records.append(
                            self._event(w, v, by="edge", escalated=False, unconfirmed=True, now=now)
                        )
                    continue
                if v.status == "warning":
                    if not self._repeat(w.device, v.fault, now):
                        records.append(
                            self._event(
                                w, v, by="edge", escalated=False, unconfirmed=False, now=now
                            )
                        )
                elif self._sampled(w):
                    records.append(self._train(w, v))
        return records, requests

    def on_reply(
        self, request_id: str, fault: str, confidence: float, model: str, now: float
    ) -> list[Record]:
        """The fog's verdict on an escalated window (unknown or late ids are ignored)."""
        waiting = self.waiting.pop(request_id, None)
        if waiting is None:
            self.stats["late_replies"] += 1
            return []
        self.stats["answered"] += 1
        w, v = waiting.window, waiting.verdict
        # The fog's class counts when it is sure of it; otherwise only the anomaly score can
        # still make the window a warning, and then no fault is named.
        sure = fault != NORMAL and confidence >= self.detector.confidence_threshold
        if not sure:
            self.stats["fog_unsure"] += fault != NORMAL
            if v.score < v.threshold:
                return []
            fault = NORMAL
        hours = v.hours_to_failure if fault not in SENSOR_KINDS else None
        final = Verdict(
            status="warning",
            score=v.score,
            threshold=v.threshold,
            fault=fault,
            confidence=confidence,
            hours_to_failure=hours,
            recommendation=recommendation("warning", fault, hours),
            features=v.features,
            uncertain=False,
        )
        return [
            self._event(w, final, by="fog", escalated=True, unconfirmed=False, now=now, model=model)
        ]

    def expire(self, now: float, *, everything: bool = False) -> list[Record]:
        """Decide alone on escalations past their deadline (all of them with `everything`)."""
        out: list[Record] = []
        for rid in [r for r, wt in self.waiting.items() if everything or wt.deadline <= now]:
            waiting = self.waiting.pop(rid)
            self.stats["unconfirmed"] += 1
            if waiting.verdict.status == "warning":
                out.append(
                    self._event(
                        waiting.window,
                        waiting.verdict,
                        by="edge",
                        escalated=True,
                        unconfirmed=True,
                        now=now,
                    )
                )
        return out

    # ---------------------------------------------------------------- helpers

    def _held(self, w: Window, v: Verdict) -> bool:
        """An anomaly score alone must persist for `persistence` windows before it counts.

        A single anomalous window of a device whose classifier sees nothing is the typical false
        alarm; a fault that develops stays anomalous. Confident fault classes are not held.
        """
        anomalous = v.score >= v.threshold
        streak = self.streaks.get(w.device, 0) + 1 if anomalous else 0
        self.streaks[w.device] = streak
        score_only = v.fault == NORMAL or v.confidence < self.detector.confidence_threshold
        if anomalous and score_only and streak < self.rules.persistence:
            self.stats["held"] += 1
            return True
        return False

    def _repeat(self, device: str, fault: str, now: float) -> bool:
        """Whether a warning only repeats the device's last event (counted, not sent)."""
        last = self.last_event.get(device)
        fault_or_none = None if fault == NORMAL else fault
        if last is None or last[0] != fault_or_none or now - last[1] >= self.rules.holdoff:
            return False
        self.last_event[device] = (last[0], last[1], last[2] + 1)
        self.stats["repeats"] += 1
        return True

    def _take_token(self, now: float) -> bool:
        if self._tokens < 0:
            self._tokens, self._refilled = self.rules.burst, now
        self._tokens = min(
            self.rules.burst, self._tokens + (now - self._refilled) * self.rules.rate
        )
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _escalate(self, w: Window, v: Verdict, now: float) -> EscalationRequest:
        rid = f"{self.edge}.{next(self._ids)}.{w.device}.{w.first}"
        self.waiting[rid] = _Waiting(w, v, now + self.rules.timeout)
        self.stats["escalated"] += 1
        return EscalationRequest(rid, w.device, w.first, w.last, w.fields, v.features)

    def _sampled(self, w: Window) -> bool:
        """A reproducible share of normal windows (by device and position, not by chance)."""
        if self.rules.train_share <= 0:
            return False
        h = zlib.crc32(f"{w.device}:{w.first}".encode()) / 2**32
        return h < self.rules.train_share

    def _event(
        self,
        w: Window,
        v: Verdict,
        *,
        by: str,
        escalated: bool,
        unconfirmed: bool,
        now: float,
        model: str = "",
    ) -> Record:
        self.stats["events"] += 1
        fault = None if v.fault == NORMAL else v.fault
        previous = self.last_event.get(w.device)
        repeats = previous[2] if previous is not None else 0
        self.last_event[w.device] = (fault, now, 0)
        return (
            "event",
            {
                "edge": self.edge, "device": w.device, "first": w.first, "last": w.last,
                "count": len(w.values), "ts": w.ts, "kind": "model", "status": v.status,
                "score": v.score, "threshold": v.threshold, "fault": fault,
                "confidence": v.confidence, "hours_to_failure": v.hours_to_failure,
                "recommendation": v.recommendation, "escalated": escalated, "verdict_by": by,
                "unconfirmed": unconfirmed,
                "model": model or self.detector.models["classifier"].label,
                "repeats": repeats, "published": w.published,
                "evidence": v.features.astype("<f4").tobytes(),
            },
        )  # fmt: skip

    def _train(self, w: Window, v: Verdict) -> Record:
        self.stats["train_samples"] += 1
        return (
            "train",
            {
                "edge": self.edge, "device": w.device, "first": w.first, "last": w.last,
                "count": len(w.values), "ts": w.ts, "label": v.fault, "score": v.score,
                "fields": list(w.fields), "features": v.features.astype("<f4").tobytes(),
            },
        )  # fmt: skip
