"""Follows a running pipeline through its status and metrics topics (read-only)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from fogline.codec import decode
from fogline.errors import DecodeError
from fogline.topics import Topics


@dataclass
class Seen:
    """The last status and metrics of one process."""

    state: str = "unknown"
    metrics: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0


class Monitor:
    """A small MQTT client keeping the latest status and metrics per `(role, id)`."""

    def __init__(self, *, host: str, port: int, topics: Topics) -> None:
        self.topics = topics
        self.seen: dict[tuple[str, str], Seen] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"fogline-monitor-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._host, self._port = host, port

    def start(self) -> Monitor:
        """Connect (retrying in the background) and start following."""
        self.client.connect_async(self._host, self._port, keepalive=15)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self.topics.all_status(), qos=1)
        client.subscribe(self.topics.all_metrics(), qos=0)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 2:
            return
        key = (parts[-2], parts[-1])
        try:
            env = decode(bytes(msg.payload))
        except DecodeError:
            return
        with self._lock:
            seen = self.seen.setdefault(key, Seen())
            if env.kind == "status":
                seen.state = str(env.body.get("state", "unknown"))
            elif env.kind == "metrics":
                seen.metrics = env.body
                seen.at = time.time()

    def snapshot(self) -> dict[tuple[str, str], Seen]:
        """A copy of what has been seen so far."""
        with self._lock:
            return {k: Seen(v.state, dict(v.metrics), v.at) for k, v in self.seen.items()}

    def total(self, role: str, counter: str, *, gauge: bool = False) -> float:
        """Sum of a counter (or gauge) over every process of `role`."""
        part = "gauges" if gauge else "counters"
        return sum(
            float(s.metrics.get(part, {}).get(counter, 0))
            for (r, _), s in self.snapshot().items()
            if r == role
        )

    def counters(self, role: str, name: str) -> dict[str, float]:
        """One counter of every process of `role`, by id."""
        return {
            ident: float(s.metrics.get("counters", {}).get(name, 0))
            for (r, ident), s in self.snapshot().items()
            if r == role and s.metrics
        }

    def gauge(self, role: str, ident: str, name: str) -> float | None:
        """One gauge of one process, if seen."""
        s = self.snapshot().get((role, ident))
        if s is None or not s.metrics:
            return None
        value = s.metrics.get("gauges", {}).get(name)
        return float(value) if value is not None else None
