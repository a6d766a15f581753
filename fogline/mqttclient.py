"""paho's MQTT client with buffered reads and batched acknowledgements.

paho reads a packet with three or more `recv` calls (the command byte, each byte of the remaining
length, the rest), waits in `select` before every packet, and writes each PUBACK with a system
call of its own after waking its network thread through a socket pair. At tens of thousands of
messages per second those calls are most of a receiving process's time. `Client`:

- reads the socket in blocks of `READ_BLOCK` bytes and serves paho's small reads from that block
  (`buffered()` says how much is left; each turn of the network loop goes on reading packets
  while it is not zero, since `select` cannot see bytes already taken off the socket);
- acknowledges a batch of QoS 1 messages with one write (`ack_many`): the PUBACK packets are
  concatenated, which MQTT allows (a TCP stream of packets).

Both hook paho 2's socket read (`_sock_recv`, `_sock_close`) and packet queue (`_packet_queue`),
which paho-mqtt 2.x keeps stable; on a paho without them the client falls back to paho's own
reads and one `ack` per message (`FAST` is False).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt

READ_BLOCK = 256 * 1024
_PUBACK = 0x40

FAST = all(
    hasattr(mqtt.Client, name) for name in ("_loop", "_sock_recv", "_sock_close", "_packet_queue")
)


class Client(mqtt.Client):
    """paho's client, reading in blocks and acknowledging in batches (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

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
