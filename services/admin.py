"""Operator commands behind the Makefile targets.

    python -m services.admin migrate     apply missing migrations (make migrate)
    python -m services.admin seed-demo   insert the demo sites once (make up)
    python -m services.admin status      table of sites and their connections (make status)
    python -m services.admin watch       print the status feed live (make watch)
    python -m services.admin dburl       print the database URL in use (make psql)
    python -m services.admin settings    list every SITELINK_* setting and its default
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

import zmq

from shared import config, db

DEMO_SITES = ("alpine-hut", "harbour-pump", "vineyard-north")
#: A site whose broker does not exist, so errors and retries show.
DEMO_BROKEN_SITE = "offshore-buoy"
#: Largest feed message `watch` reads; a publisher sending more is disconnected.
FEED_MESSAGE_LIMIT = 1 << 20


def migrate(settings: config.Settings) -> int:
    database = db.Database(settings.database_url, "sitelink-migrate")
    try:
        applied = db.migrate(database)
    finally:
        database.close()
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("database is up to date")
    return 0


def seed_demo(settings: config.Settings) -> int:
    database = db.Database(settings.database_url, "sitelink-seed")
    try:
        with database.transaction() as s:
            for name in (*DEMO_SITES, DEMO_BROKEN_SITE):
                s.run("site_insert", {"name": name})
            for name in DEMO_SITES:
                s.run("demo_connection_insert", {"site": name, "broker_host": "127.0.0.1",
                                                 "broker_port": settings.embedded_mqtt_port,
                                                 "topics": [f"sites/{name}/#"]})
            # Nothing listens on the port after the embedded broker's.
            s.run("demo_connection_insert", {"site": DEMO_BROKEN_SITE, "broker_host": "127.0.0.1",
                                             "broker_port": settings.embedded_mqtt_port + 1,
                                             "topics": [f"sites/{DEMO_BROKEN_SITE}/#"]})
    finally:
        database.close()
    print(f"demo sites present: {', '.join((*DEMO_SITES, DEMO_BROKEN_SITE))}")
    return 0


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def status(settings: config.Settings) -> int:
    database = db.Database(settings.database_url, "sitelink-status")
    try:
        with database.transaction() as s:
            rows = s.rows("status_table")
    finally:
        database.close()
    for r in rows:
        if r["paused_since"] is not None:  # connected, but not reading: the logger is behind
            r["status"] = f"{r['status']}, paused since {_fmt(r['paused_since'])}"
    columns = [("site", "site"), ("active", "is_active"), ("status", "status"),
               ("last connected", "last_connected_at"), ("last data", "last_data_at"),
               ("errors", "connection_errors"), ("retry", "mqtt_retry_count"), ("next retry", "mqtt_next_retry"),
               ("broker", "broker"), ("message", "error_message")]
    table = [[h for h, _ in columns]] + [[_fmt(r[k])[:60] for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if not rows:
        print("(no connections)")
    return 0


def watch(settings: config.Settings, topic: str) -> int:
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.MAXMSGSIZE, FEED_MESSAGE_LIMIT)  # a feed message is a few hundred bytes
    sub.connect(settings.status_feed)
    sub.setsockopt_string(zmq.SUBSCRIBE, topic)
    print(f"watching {settings.status_feed} (topic prefix {topic!r}); Ctrl-C to stop", file=sys.stderr)
    try:
        while True:
            frame_topic, body = sub.recv_multipart()
            print(frame_topic.decode(), json.dumps(json.loads(body)), flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close(linger=0)
        context.term()


def show_settings() -> int:
    for name, default, doc in config.documentation():
        print(f"{name:<36} {default:<28} {doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.admin", description="sitelink operator commands")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply missing migrations")
    sub.add_parser("seed-demo", help="insert the demo sites (once)")
    sub.add_parser("status", help="table of sites and their connections")
    w = sub.add_parser("watch", help="print the status feed live")
    w.add_argument("--topic", default="", help="topic prefix, e.g. mqtt_status.site.3.")
    sub.add_parser("dburl", help="print the database URL")
    sub.add_parser("settings", help="list every setting")
    args = parser.parse_args(argv)
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"sitelink: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "migrate":
            return migrate(settings)
        if args.command == "seed-demo":
            return seed_demo(settings)
        if args.command == "status":
            return status(settings)
        if args.command == "watch":
            return watch(settings, args.topic)
        if args.command == "dburl":
            print(settings.database_url)
            return 0
        return show_settings()
    except db.DatabaseError as exc:
        print(f"sitelink: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
