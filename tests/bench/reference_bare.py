"""The bare reference pipeline: what ingesting costs with nothing around it.

    python tests/bench/reference_bare.py --port 1883 --topic 'sites/x/#' --dsn postgresql://...

One paho subscriber (QoS 1) that json-decodes each message and hands one row
per sensor to one writer thread, which COPYs batches (at most --batch-max
rows, waiting at most --batch-wait s to fill one, like the logger) into a
simple table in its own transaction each:

    bare_reading (sensor text, ts timestamptz, "values" jsonb, received_at timestamptz DEFAULT now())

(received_at is only there so the benchmark can tell when each row was
committed, as it does with sitelink's reading.received_at.) No validation,
no devices, no status, no delivery guarantee past the broker's PUBACK.
Prints ``ready`` once subscribed; SIGTERM stops it (what is queued is
written first) and it prints one JSON line: received, written.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
import psycopg

TABLE = """CREATE TABLE IF NOT EXISTS bare_reading (
    sensor text NOT NULL, ts timestamptz NOT NULL, "values" jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now())"""


def writer(dsn: str, rows: queue.SimpleQueue, done: threading.Event, batch_max: int, batch_wait: float,
           counts: dict) -> None:
    utc = timezone.utc
    with psycopg.connect(dsn, application_name="bench-bare-writer") as conn:
        while True:
            try:
                first = rows.get(timeout=0.2)
            except queue.Empty:
                if done.is_set():
                    return
                continue
            batch = [first]
            fill_until = time.monotonic() + batch_wait
            while len(batch) < batch_max:
                try:
                    batch.append(rows.get_nowait())
                except queue.Empty:
                    if done.is_set() or time.monotonic() >= fill_until:
                        break
                    time.sleep(0.002)
            with conn.cursor() as cur:
                with cur.copy('COPY bare_reading (sensor, ts, "values") FROM STDIN') as copy:
                    for sensor, ts, values in batch:
                        copy.write_row((sensor, datetime.fromtimestamp(ts, utc), values))
            conn.commit()
            counts["written"] += len(batch)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--batch-max", type=int, default=2000)
    ap.add_argument("--batch-wait", type=float, default=0.05)
    args = ap.parse_args()

    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(TABLE)

    rows: queue.SimpleQueue = queue.SimpleQueue()
    done = threading.Event()
    counts = {"received": 0, "written": 0}
    thread = threading.Thread(target=writer, args=(args.dsn, rows, done, args.batch_max, args.batch_wait,
                                                   counts), daemon=True)
    thread.start()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        print("ready", flush=True)

    def on_message(client, userdata, message):
        doc = json.loads(message.payload)
        counts["received"] += 1
        prefix = f"{doc['gateway']}/{doc.get('datalogger')}/"
        ts = float(doc["ts"])
        for name, metrics in doc.get("sensors", {}).items():
            rows.put((prefix + name, ts, json.dumps(metrics)))

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{os.getpid()}",
                         clean_session=True, protocol=mqtt.MQTTv311)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))  # the loop below acts on it
    client.connect("127.0.0.1", args.port, keepalive=60)
    while not stopping:
        client.loop(timeout=0.2)
    client.disconnect()
    done.set()
    thread.join(30)
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
