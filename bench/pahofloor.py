"""The floor under any paho-based Python receiver: a bare paho subscriber that counts messages
(one callback per message, manual PUBACKs at QoS 1) and does nothing else.

Run as `python -m bench.pahofloor PORT QOS N [--fogline]`: prints `ready` once subscribed, then
the `time.monotonic()` at which the N-th message arrived (or at the last arrival, after 5 s
without messages). `--fogline` uses fogline's client (block reads, batched acks).
"""

from __future__ import annotations

import sys
import threading
import time

import paho.mqtt.client as mqtt

from fogline.mqttclient import Client


def main(argv: list[str]) -> int:
    port, qos, n = int(argv[0]), int(argv[1]), int(argv[2])
    fogline = "--fogline" in argv
    got, last = [0], [0.0]
    done, subscribed = threading.Event(), threading.Event()
    mids: list[int] = []
    cls = Client if fogline else mqtt.Client
    client = cls(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-floor-q{qos}",
                 protocol=mqtt.MQTTv311, manual_ack=True)  # fmt: skip

    def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got[0] += 1
        last[0] = time.monotonic()
        if msg.qos:
            if fogline:
                mids.append(msg.mid)
                if len(mids) >= 100:
                    c.ack_many(mids)  # type: ignore[attr-defined]
                    mids.clear()
            else:
                c.ack(msg.mid, msg.qos)
        if got[0] >= n:
            done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe("fl/v1/dev/+/+/tele", qos=qos)
    client.loop_start()
    if not subscribed.wait(10):
        print("no SUBACK within 10 s", file=sys.stderr)
        return 1
    print("ready", flush=True)
    seen = -1
    while not done.wait(5.0) and got[0] != seen:  # stop after 5 s without a message
        seen = got[0]
    print(f"{got[0]} {last[0]!r}", flush=True)
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
