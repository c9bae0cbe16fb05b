"""A gateway at full speed: QoS 1 publishes with a bounded window of in-flight messages.

    python tests/bench/publisher.py --port 1883 --topic sites/a/GW-01 --seconds 20

Connects, prints ``ready``, waits for a line on stdin (``go``), then publishes
the documented JSON format, with a ``ts`` unique per message (so each message
is one new reading row), for ``--seconds`` or until SIGTERM. ``publish()``
never waits for its own PUBACK: at most ``--window`` messages are unacknowledged
at any time. One thread runs paho's loop by hand (no ``loop_start()`` thread
to wake per message), so the publisher is cheap enough to outrun the
pipelines. At the end it waits for the outstanding PUBACKs and prints one
JSON line: published, acked, start, end (wall clock of the last publish),
rate.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time

import paho.mqtt.client as mqtt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--window", type=int, default=1000, help="most messages in flight (unacknowledged)")
    ap.add_argument("--rate", type=float, default=0.0, help="messages per second at most (0: no limit)")
    ap.add_argument("--gateway", default="GW-01")
    ap.add_argument("--ts-base", type=float, default=None,
                    help="ts of the first message (epoch s); message i has ts-base + i ms")
    args = ap.parse_args()

    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    state = {"acked": 0, "connected": False}

    def on_connect(client, userdata, flags, reason_code, properties):
        state["connected"] = not reason_code.is_failure

    def on_publish(client, userdata, mid, reason_code, properties):
        state["acked"] += 1

    # One thread, our own loop: publish() writes to the socket at once (no
    # network thread to wake per message), PUBACKs are read in bulk.
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}",
                         clean_session=True, protocol=mqtt.MQTTv311)
    # The window is enforced below (published - acked). paho's own limit is
    # switched off: with one set, every PUBACK walks all in-flight messages
    # (Client._update_inflight), which made this publisher slower than the
    # pipelines it measures.
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(args.host, args.port, keepalive=60)
    connect_deadline = time.monotonic() + 15
    while not state["connected"] and time.monotonic() < connect_deadline:
        client.loop(timeout=0.1)
    if not state["connected"]:
        print("publisher: no CONNACK within 15 s", file=sys.stderr)
        return 1
    print("ready", flush=True)
    # Wait for "go" on stdin, keeping the connection alive meanwhile.
    while not select.select([sys.stdin], [], [], 1.0)[0]:
        client.loop(timeout=0.0)
    if not sys.stdin.readline():
        return 1

    # Seven days back, one millisecond apart: unique, plausible timestamps.
    ts_base = args.ts_base if args.ts_base is not None else time.time() - 7 * 86400
    prefix = f'{{"gateway": "{args.gateway}", "datalogger": "DL-07", "ts": '
    suffix = ', "sensors": {"S-1": {"temperature": 21.4, "humidity": 40.2}}}'
    topic = args.topic
    published = 0
    start = time.time()
    deadline = time.monotonic() + args.seconds
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    next_at = time.monotonic()
    sock = client.socket()
    while not stopping:
        now = time.monotonic()
        if now >= deadline:
            break
        # Fill the window.
        while published - state["acked"] < args.window and now < deadline:
            if interval:
                if next_at > now:
                    break
                next_at += interval
            ts = ts_base + published / 1000.0
            info = client.publish(topic, prefix + repr(ts) + suffix, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                print(f"publisher: publish failed: {mqtt.error_string(info.rc)}", file=sys.stderr)
                return 1
            published += 1
            if published % 64 == 0:
                now = time.monotonic()
        # Then read PUBACKs (and write what the socket did not take).
        wait = 0.05
        if interval:
            wait = max(0.0, min(wait, next_at - time.monotonic()))
        readable, writable, _ = select.select([sock], [sock] if client.want_write() else [], [], wait)
        if readable:
            client.loop_read()
        if writable or client.want_write():
            client.loop_write()
        client.loop_misc()
    end = time.time()
    drain_deadline = time.monotonic() + 30
    while state["acked"] < published and time.monotonic() < drain_deadline:
        client.loop(timeout=0.05)
    acked = state["acked"]
    client.disconnect()
    print(json.dumps({"published": published, "acked": acked, "start": start, "end": end,
                      "rate": published / max(end - start, 1e-9), "topic": topic}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
