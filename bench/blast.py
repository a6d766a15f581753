"""A publisher that is not the bottleneck: MQTT 3.1.1 PUBLISH packets encoded up front and
written to the socket in large writes, so the receiving side is what a benchmark measures.

paho's publisher in Python writes one packet per call from its network thread and tops out near
10,000 msg/s here, below what a subscriber can take; `mosquitto_pub --repeat` is fast but sends one
payload again and again (an edge refuses repeated readings as replays). `blast` sends distinct
payloads as fast as the broker takes them; at QoS 1 it counts the broker's PUBACKs on a thread.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def publish_packet(topic: str, payload: bytes, qos: int, mid: int) -> bytes:
    """One PUBLISH packet (QoS 0 or 1; `mid` is ignored at QoS 0)."""
    head = _utf8(topic) + (struct.pack(">H", mid) if qos else b"")
    return _packet(0x30 | (qos << 1), head + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        buf += chunk
    return buf


def blast(port: int, messages: Sequence[tuple[str, bytes]], qos: int, *,
          client_id: str = "bench-blast", host: str = "127.0.0.1",
          timeout: float = 120.0) -> float:  # fmt: skip
    """Publish `messages` (topic, payload) at `qos`; returns the seconds until the last is
    written (QoS 0) or acknowledged by the broker (QoS 1). Packets are encoded before the clock
    starts."""
    if qos not in (0, 1):
        raise ValueError("qos must be 0 or 1")
    packets = [publish_packet(t, p, qos, i % 65535 + 1) for i, (t, p) in enumerate(messages)]
    chunks, chunk, size = [], [], 0
    for p in packets:
        chunk.append(p)
        size += len(p)
        if size >= 256 * 1024:
            chunks.append(b"".join(chunk))
            chunk, size = [], 0
    if chunk:
        chunks.append(b"".join(chunk))
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connect = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60) + _utf8(client_id)
        sock.sendall(_packet(0x10, connect))
        connack = _recv_exact(sock, 4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"the broker refused the connection: {connack!r}")
        acked = threading.Event()
        errors: list[BaseException] = []

        def count_acks() -> None:  # PUBACKs are 4 bytes each: 0x40 0x02 mid
            want, buf = 4 * len(packets), 0
            try:
                while buf < want:
                    chunk = sock.recv(min(1 << 20, want - buf))
                    if not chunk:
                        raise ConnectionError("the broker closed the connection")
                    buf += len(chunk)
            except BaseException as exc:  # reported by the caller
                errors.append(exc)
            acked.set()

        reader = threading.Thread(target=count_acks, daemon=True) if qos else None
        t0 = time.perf_counter()
        if reader is not None:
            reader.start()
        for c in chunks:
            sock.sendall(c)
        if reader is not None and not acked.wait(timeout):
            raise TimeoutError(f"the broker did not acknowledge every message in {timeout} s")
        took = time.perf_counter() - t0
        if errors:
            raise errors[0]
        sock.sendall(_packet(0xE0, b""))  # DISCONNECT
    return took
