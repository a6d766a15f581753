"""paho's MQTT client with buffered reads and batched acknowledgements.

paho reads a packet with three or more `recv` calls (the command byte, each byte of the remaining
length, the rest), waits in `select` before every packet, and writes each PUBACK with a system
call of its own after waking its network thread through a socket pair. At tens of thousands of
messages per second those calls are most of a receiving process's time. `Client`:

- reads the socket in blocks of `READ_BLOCK` bytes and serves paho's small reads from that block
  (`buffered()` says how much is left; each turn of the network loop goes on reading packets
  while it is not zero, since `select` cannot see bytes already taken off the socket);
- acknowledges a batch of QoS 1 messages with one write (`ack_many`): the PUBACK packets are
  concatenated, which MQTT allows (a TCP stream of packets);
- with `on_publish_received` set (and manual acks, MQTT 3.1.1), parses the QoS 0 and 1 PUBLISH
  packets that lie whole in the block itself and hands each over as (topic, payload, mid, qos),
  without paho's per-message objects, logging and topic matching. Anything else (other packets,
  QoS 2, a packet cut by the block's end, a topic that is not UTF-8) goes through paho as before.

They hook paho 2's socket read (`_sock_recv`, `_sock_close`), packet read (`_packet_read`,
`_loop`) and packet queue (`_packet_queue`), which paho-mqtt 2.x keeps stable (the project pins
`<3`); on a paho without them the client falls back to paho's own reads and one `ack` per message
(`FAST` is False).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt

READ_BLOCK = 256 * 1024
_time_func: Callable[[], float] = getattr(mqtt, "time_func", time.monotonic)
_PUBACK = 0x40

FAST = all(
    hasattr(mqtt.Client, name)
    for name in ("_loop", "_sock_recv", "_sock_close", "_packet_queue", "_packet_read")
)


class Client(mqtt.Client):
    """paho's client, reading in blocks and acknowledging in batches (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        #: Called on the network thread with (topic, payload, mid, qos) for PUBLISH packets
        #: parsed from the read block (None: every packet goes through paho and on_message).
        self.on_publish_received: Callable[[str, bytes, int, int], None] | None = None

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._rbuf) - self._rpos

    def _loop(self, timeout: float = 1.0) -> mqtt.MQTTErrorCode:
        # Behind loop(), loop_forever() and loop_start(): after select, read every packet
        # already buffered (each loop_read takes at least one byte, so this ends).
        rc = super()._loop(timeout)
        while rc == mqtt.MQTT_ERR_SUCCESS and self.buffered():
            rc = self.loop_read()
        return rc

    def _sock_recv(self, bufsize: int) -> bytes:
        if not FAST:
            return super()._sock_recv(bufsize)
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, READ_BLOCK))
            if len(data) <= bufsize:  # what was asked for, or less: hand it over as it is
                return data
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        if (
            FAST
            and self.on_publish_received is not None
            and self._manual_ack
            and self._protocol != mqtt.MQTTv5
            and self._in_packet["command"] == 0  # paho is not halfway through a packet
            and self.buffered()
        ):
            self._publishes_from_block(self.on_publish_received)
        return super()._packet_read()

    def _publishes_from_block(self, deliver: Callable[[str, bytes, int, int], None]) -> None:
        """Hand over the whole QoS 0/1 PUBLISH packets at the start of the block's unread part;
        stop at the first packet paho must read."""
        buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
        start = pos
        while pos < end:
            command = buf[pos]
            qos = (command >> 1) & 3
            if command & 0xF0 != 0x30 or qos > 1:
                break
            length, mult, i = 0, 1, pos + 1
            while i < end and i - pos <= 4:
                byte = buf[i]
                i += 1
                length += (byte & 0x7F) * mult
                mult *= 128
                if byte < 0x80:
                    break
            else:
                break  # the length runs past the block (or is malformed): paho's turn
            stop = i + length
            if stop > end or length < 2:
                break
            topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
            head_end = topic_end + (2 if qos else 0)
            if head_end > stop:
                break
            try:
                topic = buf[i + 2 : topic_end].decode()
            except UnicodeDecodeError:
                break
            mid = buf[topic_end] << 8 | buf[topic_end + 1] if qos else 0
            self._rpos = pos = stop
            deliver(topic, buf[head_end:stop], mid, qos)
        if pos != start:
            with self._msgtime_mutex:
                self._last_bytes_received = _time_func()  # what paho's keepalive reads

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0  # bytes of a closed connection never reach a new one
        super()._sock_close()

    def ack_many(self, mids: Iterable[int]) -> None:
        """Acknowledge QoS 1 messages (manual acks): one write for all of them."""
        if not FAST:
            for mid in mids:
                self.ack(mid, 1)
            return
        packet = b"".join(struct.pack("!BBH", _PUBACK, 2, mid) for mid in mids)
        if packet:
            self._packet_queue(_PUBACK, packet, 0, 0)
