"""Many sites' gateways in one process: one reading per site every ``--period`` seconds.

    python tests/bench/sites_publisher.py --port 1883 --first 1 --count 500 --period 3 --seconds 30

One paho client (QoS 1, clean session) publishes for the sites named
``<prefix><first>`` .. ``<prefix><first + count - 1>`` on the topics
``sites/<name>/GW/DL``, in the documented JSON format, spread evenly: message
``i`` goes to site ``i % count`` at ``start + i * period / count``, so each
site publishes once per period and the publisher sends ``count / period``
messages per second in all. Each message's ``ts`` is its scheduled time
(unique per site: one new reading row each).

Connects, prints ``ready``, waits for a line on stdin (``go``), publishes for
``--seconds`` (or until SIGTERM), waits up to 30 s for the outstanding
PUBACKs, then prints one JSON line: published, acked, acked per site name,
start, end, rate, and how late the publisher ran behind its schedule at worst.
One thread runs paho's loop by hand, sleeping in select() between messages,
so it costs little CPU.
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
    ap.add_argument("--prefix", default="site-")
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--period", type=float, default=3.0, help="seconds between two readings of one site")
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()

    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    names = [f"{args.prefix}{args.first + j}" for j in range(args.count)]
    topics = [f"sites/{name}/GW/DL" for name in names]
    acked = [0] * args.count
    pending: dict[int, int] = {}  # mid -> site index
    state = {"connected": False, "acked": 0}

    def on_connect(client, userdata, flags, reason_code, properties):
        state["connected"] = not reason_code.is_failure

    def on_publish(client, userdata, mid, reason_code, properties):
        j = pending.pop(mid, None)
        if j is not None:
            acked[j] += 1
            state["acked"] += 1

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sites-{os.getpid()}",
                         clean_session=True, protocol=mqtt.MQTTv311)
    # No paho-side limit: with one, every PUBACK walks all in-flight messages.
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(args.host, args.port, keepalive=60)
    deadline = time.monotonic() + 15
    while not state["connected"] and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    if not state["connected"]:
        print("sites_publisher: no CONNACK within 15 s", file=sys.stderr)
        return 1
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 1.0)[0]:
        client.loop(timeout=0.0)
    if not sys.stdin.readline():
        return 1

    step = args.period / args.count
    start_wall = time.time()
    start = time.monotonic()
    end_at = start + args.seconds
    published = 0
    worst_late = 0.0
    sock = client.socket()
    while not stopping:
        now = time.monotonic()
        due = start + published * step
        if due >= end_at:
            break
        while due <= now:
            j = published % args.count
            ts = start_wall + published * step
            payload = (f'{{"gateway": "GW", "datalogger": "DL", "ts": {ts!r}, '
                       f'"sensors": {{"S-1": {{"temperature": {20 + j % 10}.5, "humidity": 40.2}}}}}}')
            info = client.publish(topics[j], payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                print(f"sites_publisher: publish failed: {mqtt.error_string(info.rc)}", file=sys.stderr)
                return 1
            pending[info.mid] = j
            worst_late = max(worst_late, now - due)
            published += 1
            due = start + published * step
            if due >= end_at:
                break
        wait = max(0.0, min(0.5, start + published * step - time.monotonic()))
        readable, writable, _ = select.select([sock], [sock] if client.want_write() else [], [], wait)
        if readable:
            client.loop_read()
        if writable or client.want_write():
            client.loop_write()
        client.loop_misc()
    end_wall = time.time()
    drain_deadline = time.monotonic() + 30
    while state["acked"] < published and time.monotonic() < drain_deadline:
        client.loop(timeout=0.05)
    client.disconnect()
    print(json.dumps({"published": published, "acked": state["acked"],
                      "acked_per_site": dict(zip(names, acked)), "start": start_wall, "end": end_wall,
                      "rate": published / max(end_wall - start_wall, 1e-9), "worst_late": worst_late}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
