"""The naive reference pipeline: one INSERT and one COMMIT per message.

    python tests/bench/reference_naive.py --port 1883 --topic 'sites/x/#' --dsn postgresql://...

One paho subscriber (QoS 1) that json-decodes each message and, in the
callback, inserts its row(s) and commits, into

    naive_reading (sensor text, ts timestamptz, "values" jsonb, received_at timestamptz DEFAULT now())

Prints ``ready`` once subscribed; SIGTERM stops it and it prints one JSON
line: received, written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
import psycopg

TABLE = """CREATE TABLE IF NOT EXISTS naive_reading (
    sensor text NOT NULL, ts timestamptz NOT NULL, "values" jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now())"""
INSERT = 'INSERT INTO naive_reading (sensor, ts, "values") VALUES (%s, %s, %s::jsonb)'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--dsn", required=True)
    args = ap.parse_args()

    conn = psycopg.connect(args.dsn, application_name="bench-naive")
    with conn.cursor() as cur:
        cur.execute(TABLE)
    conn.commit()
    counts = {"received": 0, "written": 0}
    utc = timezone.utc

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        print("ready", flush=True)

    def on_message(client, userdata, message):
        doc = json.loads(message.payload)
        counts["received"] += 1
        prefix = f"{doc['gateway']}/{doc.get('datalogger')}/"
        at = datetime.fromtimestamp(float(doc["ts"]), utc)
        with conn.cursor() as cur:
            for name, metrics in doc.get("sensors", {}).items():
                cur.execute(INSERT, (prefix + name, at, json.dumps(metrics)))
                counts["written"] += 1
        conn.commit()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-naive-{os.getpid()}",
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
    conn.close()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
