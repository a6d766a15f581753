"""The service runtime every fogline process runs on.

It owns the MQTT client, reconnects with jittered capped backoff, publishes a retained
`online` / `offline` (last will) / `stopped` status and periodic metrics, and shuts down in
bounded time on SIGTERM/SIGINT. Subclasses hold the logic: they handle messages and ticks on one
worker thread (the network thread never runs application code) and decide when they are drained.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import paho.mqtt.client as mqtt

from fogline import __version__
from fogline.codec import encode_plain
from fogline.config import ServiceConfig, check_startup, parse
from fogline.errors import ConfigError, FoglineError
from fogline.logs import setup_logging
from fogline.mqttclient import Client
from fogline.security import apply_client_security
from fogline.topics import Topics

if TYPE_CHECKING:
    from fogline.prometheus import Exporter

log = logging.getLogger(__name__)

DLQ_COPY_BYTES = 512
#: Seconds past `shutdown_timeout` after which a stopping process that still runs is ended.
STUCK_GRACE = 10.0
EXIT_STUCK = 70
QUEUE_BATCH = 2000


def backoff_delay(attempt: int, *, base: float = 0.25, cap: float = 10.0) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0.0, min(cap, base * (2 ** min(attempt, 20))))


@dataclass(slots=True)  # not frozen: built for every message, and frozen costs 4x
class Inbound:
    """A received message waiting for the worker thread."""

    topic: str
    payload: bytes
    mid: int
    qos: int


class RateLimitedLog:
    """Logs a given key at most once per `interval` seconds, counting what it suppressed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: Any) -> None:
        """Log a warning unless the same key was logged within the interval."""
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._suppressed[key] += 1
            return
        more = self._suppressed.pop(key, 0)
        self._last[key] = now
        log.warning(
            msg + (" (%d similar suppressed)" if more else ""), *args, *((more,) if more else ())
        )


class Service:
    """Base class of the four processes: MQTT plumbing, status, metrics, bounded shutdown."""

    role: ClassVar[str] = "service"
    #: Whether the broker keeps this client's subscriptions and queued messages across restarts.
    persistent_session: ClassVar[bool] = False
    tick_interval: ClassVar[float] = 0.1

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        #: This process's id in its client id and its status, metrics and DLQ topics.
        self.ident = config.process_id()
        self.topics = Topics(config.topic_root)
        self.counters: Counter[str] = Counter()
        self.stopping = False
        self.connected = threading.Event()
        self.started = time.time()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._watchdog: threading.Timer | None = None
        self._signal_mask: set[int | signal.Signals] | None = None
        self._restore_signals: Callable[[], None] = lambda: None
        self._net_stop = threading.Event()
        self._queue: queue.SimpleQueue[Inbound | Callable[[], None]] = queue.SimpleQueue()
        self._seq = 0
        self._ratelog = RateLimitedLog()
        #: The Prometheus endpoint, while `metrics_port` is set and the process runs.
        self.exporter: Exporter | None = None
        self.client = self._make_client()

    # ------------------------------------------------------------------ hooks for subclasses

    def subscriptions(self) -> list[str]:
        """Topics to subscribe to (QoS 1) after every connect."""
        return []

    def on_start(self) -> None:
        """Open state (databases) before connecting."""

    def on_connected(self) -> None:
        """Called on the worker thread after each successful (re)connect."""

    def accepts(self, topic: str) -> bool:
        """Whether to take this message now; refused messages stay unacknowledged (redelivered)."""
        return True

    def handle(self, messages: list[Inbound]) -> None:
        """Handle a batch of messages on the worker thread; they are acknowledged afterwards."""

    def on_tick(self, now: float) -> None:
        """Periodic work on the worker thread (every `tick_interval` seconds)."""

    def on_stopping(self) -> None:
        """Input has stopped: flush what is held in memory to durable state."""

    def drained(self) -> bool:
        """Whether everything this process holds has been delivered (ends the shutdown early)."""
        return True

    def on_stopped(self) -> None:
        """Close state; the process is about to exit."""

    def metrics(self) -> dict[str, Any]:
        """Gauges added to the periodic metrics message."""
        return {}

    def status_extra(self) -> dict[str, Any]:
        """Fields added to the retained `online` status (e.g. the models in use)."""
        return {}

    def publish_status(self) -> None:
        """Publish the retained `online` status again (after what it describes changed)."""
        status = self.topics.status(self.role, self.ident)
        self.publish(status, self._status_payload("online"), qos=1, retain=True)

    # ------------------------------------------------------------------ helpers for subclasses

    @property
    def client_id(self) -> str:
        """The MQTT client id of this process."""
        return f"fogline-{self.role}-{self.ident}"

    def next_seq(self) -> int:
        """A per-process message counter for envelopes."""
        self._seq += 1
        return self._seq

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish a message (queued by the client while disconnected)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.counters["publish_errors"] += 1
            self._ratelog.warning(
                "publish", "publish to %s failed: %s", topic, mqtt.error_string(info.rc)
            )

    def reject(self, reason: str, topic: str, payload: bytes, detail: str) -> None:
        """Count a rejected input by reason, copy it (truncated) to the DLQ, log it."""
        self.counters[f"rejected.{reason}"] += 1
        body = {
            "reason": reason,
            "detail": detail[:500],
            "topic": topic,
            "size": len(payload),
            "payload": bytes(payload[:DLQ_COPY_BYTES]),
        }
        dlq = self.topics.dlq(self.role, self.ident)
        self.publish(
            dlq,
            encode_plain("dlq", self.ident, body, seq=self.next_seq(), ts=time.time()),
            qos=0,
        )
        self._ratelog.warning(
            f"reject.{reason}", "rejected message on %s: %s: %s", topic, reason, detail
        )

    def request_stop(self) -> None:
        """Ask the process to stop (what SIGTERM does); a second request aborts the drain.

        A process still alive `STUCK_GRACE` seconds after its shutdown timeout prints the stacks
        of its threads and exits with status 70: shutdown stays bounded whatever hangs.
        """
        if self._stop.is_set():
            self._abort.set()
            return
        self._stop.set()
        if self._watchdog is None:
            self._watchdog = threading.Timer(
                self.config.shutdown_timeout + STUCK_GRACE, self._stuck
            )
            self._watchdog.daemon = True
            self._watchdog.start()

    def _stuck(self) -> None:
        log.error(
            "%s %s did not stop within %.0fs of the request; thread stacks follow",
            self.role, self.ident, self.config.shutdown_timeout + STUCK_GRACE,
        )  # fmt: skip
        with contextlib.suppress(OSError, ValueError, AttributeError):
            faulthandler.dump_traceback(all_threads=True)
        os._exit(EXIT_STUCK)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the worker thread."""
        self._queue.put(fn)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record the duration of one run of a stage (a no-op without `metrics_port`)."""
        if self.exporter is not None:
            self.exporter.observe_stage(stage, seconds)

    def observe_custody(self, batches: int, records: int) -> None:
        """Record custody batches published upstream (a no-op without `metrics_port`)."""
        if self.exporter is not None and batches:
            self.exporter.observe_custody(batches, records)

    # ------------------------------------------------------------------ the runtime

    def _status_payload(self, state: str) -> bytes:
        body = {"state": state, "pid": os.getpid(), "version": __version__, "started": self.started}
        if state == "online":
            body |= self.status_extra()
        return encode_plain("status", self.ident, body, seq=0, ts=time.time())

    def _make_client(self) -> Client:
        client = Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=not self.persistent_session,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        cfg = self.config
        try:
            apply_client_security(
                client, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key,
                username=cfg.username, password_file=cfg.password_file,
            )  # fmt: skip
        except (FoglineError, OSError, ValueError) as exc:
            raise ConfigError("tls", f"cannot set up TLS or the login: {exc}") from exc
        status = self.topics.status(self.role, self.ident)
        client.will_set(status, self._status_payload("offline"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish_received = self._on_publish_received
        return client

    def _on_connect(self, client: mqtt.Client, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if rc.is_failure:
            log.warning("broker refused the connection: %s", rc)
            return
        log.info("connected to %s:%d", self.config.broker_host, self.config.broker_port)
        for topic in self.subscriptions():
            client.subscribe(topic, qos=1)
        status = self.topics.status(self.role, self.ident)
        client.publish(status, self._status_payload("online"), qos=1, retain=True)
        self.connected.set()
        self.call_soon(self.on_connected)

    def _on_disconnect(self, _c: mqtt.Client, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self.connected.clear()
        if not self._net_stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", rc)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    def _on_publish_received(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        self._queue.put(Inbound(topic, payload, mid, qos))

    def _network_loop(self) -> None:
        """Drive the MQTT client; (re)connect with jittered capped backoff."""
        attempt = 0
        ever_connected = False
        need_connect = True
        while not self._net_stop.is_set():
            if need_connect:
                try:
                    if ever_connected:
                        self.client.reconnect()
                    else:
                        cfg = self.config
                        self.client.connect(cfg.broker_host, cfg.broker_port, keepalive=15)
                        ever_connected = True
                    need_connect = False
                except OSError as exc:
                    delay = backoff_delay(attempt)
                    attempt += 1
                    self._ratelog.warning(
                        "connect",
                        "cannot reach the broker at %s:%d (%s); retrying in %.1fs",
                        self.config.broker_host,
                        self.config.broker_port,
                        exc,
                        delay,
                    )
                    self._net_stop.wait(delay)
                    continue
            rc = self.client.loop(timeout=0.05)
            if rc == mqtt.MQTT_ERR_SUCCESS:
                if self.connected.is_set():
                    attempt = 0
                continue
            if self._net_stop.is_set():
                break
            need_connect = True
            self._net_stop.wait(backoff_delay(attempt))
            attempt += 1

    def _install_signals(self) -> None:
        """SIGTERM/SIGINT reach `request_stop` through a thread of their own.

        The worker thread blocks them, so it is never interrupted by one (a signal landing
        while it waits in `SimpleQueue.get(timeout=...)` could leave it waiting far past the
        timeout). Whichever thread the kernel delivers a signal to, Python's C-level handler
        writes its number to a pipe (`set_wakeup_fd`) that a watcher thread reads; the watcher
        unblocks them for itself, so there is always a thread that can take them.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        wanted = {signal.SIGTERM, signal.SIGINT}
        r, w = os.pipe()
        os.set_blocking(w, False)
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, lambda *_: None) for sig in wanted}
        self._signal_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)

        def restore() -> None:  # as it was before `run` (in-process callers, children)
            assert self._signal_mask is not None
            signal.pthread_sigmask(signal.SIG_SETMASK, self._signal_mask)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)
            os.close(w)  # ends the watcher

        self._restore_signals = restore
        numbers = {int(s) for s in wanted}

        def watch() -> None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
            while data := os.read(r, 64):
                for _ in range(sum(1 for b in data if b in numbers)):
                    self.request_stop()
            os.close(r)

        threading.Thread(target=watch, name=f"{self.role}-signals", daemon=True).start()

    def _step(self, timeout: float) -> None:
        """Take queued messages and callbacks, hand them to the subclass, then ack them."""
        batch: list[Inbound] = []
        try:
            item = self._queue.get(timeout=timeout)
            while True:
                if isinstance(item, Inbound):
                    batch.append(item)
                else:
                    item()
                if len(batch) >= QUEUE_BATCH:
                    break
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if not batch:
            return
        taken = [m for m in batch if self.accepts(m.topic)]
        self.counters["messages_in"] += len(taken)
        self.counters["bytes_in"] += sum(len(m.payload) for m in taken)
        if taken:
            started = time.perf_counter()
            self.handle(taken)
            if self.exporter is not None:
                self.exporter.observe_stage("handle", time.perf_counter() - started)
                self.exporter.observe_inbound(len(taken))
        self.client.ack_many(m.mid for m in taken if m.qos == 1)

    def _publish_metrics(self) -> None:
        uptime, counters, gauges = time.time() - self.started, dict(self.counters), self.metrics()
        if self.exporter is not None:
            self.exporter.update(counters, gauges, uptime)
        body = {
            "role": self.role,
            "id": self.ident,
            "uptime": uptime,
            "counters": counters,
            "gauges": gauges,
        }
        topic = self.topics.metrics(self.role, self.ident)
        self.publish(
            topic,
            encode_plain("metrics", self.ident, body, seq=self.next_seq(), ts=time.time()),
            qos=0,
        )

    def run(self) -> int:
        """Run until stopped; returns the process exit status."""
        self._install_signals()
        try:
            return self._run()
        finally:
            self._restore_signals()

    def _run(self) -> int:
        self.on_start()
        self._start_exporter()
        net = threading.Thread(target=self._network_loop, name=f"{self.role}-mqtt", daemon=True)
        net.start()
        log.info(
            "%s %s started (broker %s:%d)",
            self.role,
            self.ident,
            self.config.broker_host,
            self.config.broker_port,
        )
        next_tick = next_metrics = time.monotonic()
        try:
            while not self._stop.is_set():
                self._step(max(0.0, min(next_tick, next_metrics) - time.monotonic()))
                now = time.monotonic()
                if now >= next_tick:
                    self.on_tick(time.time())
                    next_tick = now + self.tick_interval
                if now >= next_metrics:
                    self._publish_metrics()
                    next_metrics = now + self.config.metrics_interval
            log.info("%s %s stopping", self.role, self.ident)
            self.stopping = True
            self.on_stopping()
            deadline = time.monotonic() + self.config.shutdown_timeout
            while not self._abort.is_set() and time.monotonic() < deadline and not self.drained():
                self._step(0.05)
                self.on_tick(time.time())
            if not self.drained():
                log.warning(
                    "%s %s stops with undelivered state (kept on disk)", self.role, self.ident
                )
            self._publish_metrics()
        finally:
            self.on_stopped()
            status = self.topics.status(self.role, self.ident)
            info = self.client.publish(status, self._status_payload("stopped"), qos=1, retain=True)
            if self.client.is_connected():
                with contextlib.suppress(RuntimeError):
                    info.wait_for_publish(timeout=2.0)
            self._net_stop.set()
            self.client.disconnect()
            net.join(timeout=2.0)
            if self.exporter is not None:
                self.exporter.stop()
            if self._watchdog is not None:
                self._watchdog.cancel()
        log.info("%s %s stopped", self.role, self.ident)
        return 0

    def _start_exporter(self) -> None:
        """Serve Prometheus `/metrics` when `metrics_port` is set."""
        port = self.config.metrics_port
        if not port:
            return
        # Imported here: processes without `metrics_port` do not load prometheus-client.
        from fogline.prometheus import Exporter

        exporter = Exporter(self.role, self.ident)
        try:
            exporter.start(self.config.metrics_host, port)
        except OSError as exc:
            # The pipeline matters more than its dashboard: run on, without /metrics.
            log.error("cannot serve metrics on %s:%d: %s", self.config.metrics_host, port, exc)
            return
        self.exporter = exporter


def main(
    service: type[Service],
    config: type[ServiceConfig],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
) -> int:
    """The whole life of a process command: parse its config, log, run until stopped."""
    cfg = parse(config, argv, prog=prog, description=description, section=prog)
    setup_logging(cfg.log_level, cfg.log_format, role=service.role, ident=cfg.process_id())
    # `kill -USR1 PID` prints every thread's stack to the log: for a process that looks stuck.
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stderr without a file
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        check_startup(cfg)
        process = service(cfg)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return process.run()
    except ConfigError as exc:  # found while starting (a key file, a model, a store)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
