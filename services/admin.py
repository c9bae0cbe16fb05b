"""Operator commands behind the Makefile targets.

    python -m services.admin migrate     apply missing migrations (make migrate)
    python -m services.admin seed-demo   insert the demo sites once (make up)
    python -m services.admin status      table of sites and their connections (make status)
    python -m services.admin watch       print the status feed live (make watch)
    python -m services.admin psql        psql on the database in use, no secret in its argv (make psql)
    python -m services.admin dburl       print the database URL in use (without its password)
    python -m services.admin settings    list every SITELINK_* setting and its default
    python -m services.admin replay      parse quarantined payloads again, store what now parses
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime

from psycopg import ProgrammingError, conninfo

from services import replay
from shared import config, db, embedded, feed, protocol
from shared.signals import SignalPipe

DEMO_SITES = ("alpine-hut", "harbour-pump", "vineyard-north")
#: A site whose broker does not exist, so errors and retries show.
DEMO_BROKEN_SITE = "offshore-buoy"


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
    try:
        password = embedded.mqtt_password(settings.secrets_dir, embedded.SITE_USER)
    except embedded.CredentialsUnavailable as exc:
        print(f"sitelink: the demo sites need the embedded broker's credentials: {exc}", file=sys.stderr)
        return 1
    database = db.Database(settings.database_url, "sitelink-seed")
    try:
        with database.transaction() as s:
            for name in (*DEMO_SITES, DEMO_BROKEN_SITE):
                s.run("site_insert", {"name": name})
            for name in DEMO_SITES:
                row = {"site": name, "broker_host": "127.0.0.1", "broker_port": settings.embedded_mqtt_port,
                       "username": embedded.SITE_USER, "password": password, "topics": [f"sites/{name}/#"]}
                s.run("demo_connection_insert", row)
                s.run("demo_connection_credentials", row)
            # Nothing listens on the port after the embedded broker's; and
            # whatever might, it gets no credentials of ours.
            s.run("demo_connection_insert", {"site": DEMO_BROKEN_SITE, "broker_host": "127.0.0.1",
                                             "broker_port": settings.embedded_mqtt_port + 1,
                                             "username": None, "password": None,
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


def watch(settings: config.Settings, topic: str, feeds: list[str], snapshots: list[str],
          seconds: float | None = None) -> int:
    """Print the current state of every connection and device, then every change.

    One line per item: the feed topic, then the JSON body (shared/feed.py).
    ``feeds``/``snapshots`` add other hosts' loggers, to follow a fleet.
    """
    client = feed.FeedClient([settings.status_feed, *feeds], [settings.snapshot_endpoint, *snapshots])
    signals = SignalPipe(signal.SIGTERM, signal.SIGINT)
    deadline = None if seconds is None else time.monotonic() + seconds

    def show(body: dict) -> None:
        line_topic = feed.topic_of(body)
        if line_topic.startswith(topic):
            print(line_topic, json.dumps(body), flush=True)
    try:
        state = client.start()
        for endpoint, error in client.errors.items():
            print(f"sitelink: no snapshot from {endpoint} ({error}); trying again", file=sys.stderr)
        print(f"# current state: {len(client.connections)} connections, {len(client.devices)} devices "
              f"(from {', '.join(client.snapshots)})", flush=True)
        for body in sorted(state, key=feed.topic_of):
            show(body)
        print(f"# changes from {', '.join(client.feeds)} (Ctrl-C to stop)", flush=True)
        while not signals.drain() and (deadline is None or time.monotonic() < deadline):
            for body in client.poll(0.5):
                show(body)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
        signals.close()


def psql(settings: config.Settings, args: list[str]) -> int:
    """Replace this process by psql on the database in use. A password in the
    URL goes to psql's environment (PGPASSWORD), which only its user and root
    can read, never to its argv, which ``ps`` shows to everyone."""
    try:
        params = conninfo.conninfo_to_dict(settings.database_url)
    except ProgrammingError:  # not its message: that quotes the URL, password and all
        print("sitelink: SITELINK_DATABASE_URL is not a valid PostgreSQL URL", file=sys.stderr)
        return 2
    env = dict(os.environ)
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    if "sslpassword" in params:
        print("sitelink: make psql cannot pass sslpassword without showing it to ps; "
              "run psql yourself", file=sys.stderr)
        return 2
    try:
        os.execvpe("psql", ["psql", conninfo.make_conninfo(**params), *args], env)
    except FileNotFoundError:
        print("sitelink: psql is not installed (Debian package postgresql-client)", file=sys.stderr)
        return 1


def _when(text: str) -> datetime:
    """An ISO-8601 time for a filter; without a zone, this host's local time."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time (e.g. 2026-11-28T10:00:00Z)") from None
    return when if when.tzinfo is not None else when.astimezone()


def show_dburl(settings: config.Settings, with_password: bool) -> int:
    """Print the database URL in use; a password in it is left out unless asked
    for (it would stay on the screen, in the scrollback and in a pasted ticket)."""
    url = settings.database_url
    if with_password:
        print(url)
        return 0
    try:
        params = conninfo.conninfo_to_dict(url)
    except ProgrammingError:  # not its message: that quotes the URL, password and all
        print("sitelink: SITELINK_DATABASE_URL is not a PostgreSQL connection URL", file=sys.stderr)
        return 2
    secrets = [key for key in ("password", "sslpassword") if key in params]
    if not secrets:
        print(url)
        return 0
    print(conninfo.make_conninfo(**{k: v for k, v in params.items() if k not in secrets}))
    print(f"sitelink: the {' and '.join(secrets)} in SITELINK_DATABASE_URL left out; "
          f"`dburl --with-password` prints the URL as it is", file=sys.stderr)
    return 0


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
    w = sub.add_parser("watch", help="print the current state, then the status feed live")
    w.add_argument("--feed", action="append", default=[], metavar="ENDPOINT",
                   help="another host's status feed (repeat for each)")
    w.add_argument("--snapshot", action="append", default=[], metavar="ENDPOINT",
                   help="another host's snapshot endpoint (repeat for each)")
    w.add_argument("--seconds", type=float, help="stop after this long")
    w.add_argument("--topic", default="", help="topic prefix, e.g. mqtt_status.site.3.")
    p = sub.add_parser("psql", help="psql on the database in use (no secret in its argv)")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="more arguments for psql")
    u = sub.add_parser("dburl", help="print the database URL (a password in it left out)")
    u.add_argument("--with-password", action="store_true", help="print it as it is, password and all")
    sub.add_parser("settings", help="list every setting")
    r = sub.add_parser("replay", help="parse quarantined payloads again with their connection's current "
                                      "parser; store what now parses, once",
                       description="Parse the quarantined payloads that match again, with the parser their "
                                   "site's connection has now; store what parses (once: a payload stored by "
                                   "a replay is not replayed again) and report what still fails.")
    r.add_argument("--site", help="a site's name or id")
    r.add_argument("--since", type=_when, help="received at or after this ISO-8601 time (no zone: local time)")
    r.add_argument("--until", type=_when, help="received before this ISO-8601 time")
    r.add_argument("--error-type", action="append", default=[], dest="error_types",
                   choices=[t for t in protocol.ERROR_TYPES if t != "DB_ERROR"],
                   help="only payloads that failed so (repeat for several)")
    r.add_argument("--dry-run", action="store_true", help="parse and report, store nothing, mark nothing")
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
            return watch(settings, args.topic, args.feed, args.snapshot, args.seconds)
        if args.command == "psql":
            return psql(settings, args.psql_args)
        if args.command == "replay":
            return replay.replay(settings, replay.Filters(args.site, args.since, args.until,
                                                          tuple(args.error_types)), args.dry_run)
        if args.command == "dburl":
            return show_dburl(settings, args.with_password)
        return show_settings()
    except db.DatabaseError as exc:
        print(f"sitelink: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
