"""The floor under any paho-based Python receiver: a bare paho subscriber that counts messages
(one callback per message, manual PUBACKs at QoS 1) and does nothing else.

Run as `python -m bench.pahofloor PORT QOS N [--fogline]`: prints `ready` once subscribed, then
the `time.monotonic()` at which the N-th message arrived (or at the last arrival, after 5 s
without messages). `--fogline` uses fogline's client (block reads, batched acks).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import paho.mqtt.client as mqtt

from fogline.mqttclient import Client


def main(argv: list[str]) -> int:
    """Entry point (started by `python -m bench peer`)."""
    p = argparse.ArgumentParser(prog="python -m bench.pahofloor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("port", type=int, help="broker port on 127.0.0.1")
    p.add_argument("qos", type=int, choices=(0, 1), help="subscription QoS")
    p.add_argument("n", type=int, help="messages to wait for")
    p.add_argument("--fogline", action="store_true", help="use fogline's client")
    args = p.parse_args(argv)
    port, qos, n, fogline = args.port, args.qos, args.n, args.fogline
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
    try:
        client.connect("127.0.0.1", port)
    except OSError as exc:
        print(f"cannot reach a broker at 127.0.0.1:{port}: {exc}", file=sys.stderr)
        return 1
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
