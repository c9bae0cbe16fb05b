"""A gateway at full speed: QoS 1 publishes with a bounded window of in-flight messages.

    python tests/bench/publisher.py --port 1883 --topic sites/a/GW-01 --seconds 20

Connects, prints ``ready``, waits for a line on stdin (``go``), then publishes
the documented JSON format, with a ``ts`` unique per message (so each message
is one new reading row), for ``--seconds`` or until SIGTERM. ``publish()``
never waits for its own PUBACK: at most ``--window`` messages are unacknowledged
at any time. At the end it waits for the outstanding PUBACKs and prints one
JSON line: published, acked, start, end (wall clock of the last publish),
rate.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
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

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    window = threading.Semaphore(args.window)
    acked = 0
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            connected.set()

    def on_publish(client, userdata, mid, reason_code, properties):
        nonlocal acked
        acked += 1
        window.release()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}",
                         clean_session=True, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(args.window)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(args.host, args.port, keepalive=60)
    client.loop_start()
    if not connected.wait(15):
        print("publisher: no CONNACK within 15 s", file=sys.stderr)
        return 1
    print("ready", flush=True)
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
    while not stop.is_set():
        if not window.acquire(timeout=0.5):
            if time.monotonic() >= deadline:
                break
            continue
        now = time.monotonic()
        if now >= deadline:
            window.release()
            break
        if interval:
            if next_at > now:
                time.sleep(next_at - now)
            next_at += interval
        ts = ts_base + published / 1000.0
        info = client.publish(topic, prefix + repr(ts) + suffix, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            window.release()
            print(f"publisher: publish failed: {mqtt.error_string(info.rc)}", file=sys.stderr)
            time.sleep(0.01)
            continue
        published += 1
    end = time.time()
    drain_deadline = time.monotonic() + 30
    while acked < published and time.monotonic() < drain_deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"published": published, "acked": acked, "start": start, "end": end,
                      "rate": published / max(end - start, 1e-9), "topic": topic}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
