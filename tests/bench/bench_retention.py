"""Retention: what partitioning ``reading`` costs the insert path, and what a pruning step takes.

1. What partitioning ``reading`` by week (migration 0009) costs the insert path.

The logger's own ``write_batch`` (devices upserted, readings inserted with ``ON
CONFLICT (sensor_id, ts)``), one transaction per batch of
``SITELINK_BATCH_MAX``-like size, on the durable PostgreSQL of the benchmarks,
into two databases that differ only in that: one migrated up to 0008 (``reading``
a plain table), one up to 0009 (``reading`` partitioned, the rows going to a
weekly partition). Rounds alternate between the two, so that a slow patch of the
machine does not fall on one of them; the ratio uses the medians.

``SITELINK_BENCH_PARTITION_BATCHES`` (default 100) batches of
``SITELINK_BENCH_PARTITION_EVENTS`` (2000) events per round, each event one
reading of one of ``SITELINK_BENCH_PARTITION_SENSORS`` (10) sensors,
``SITELINK_BENCH_ROUNDS`` (3) rounds each.

2. How long the logger's pruning steps take (``services/retention.py``):
``SITELINK_BENCH_PRUNE_ROWS`` (200000) rows of the connection log past their
age, deleted ``SITELINK_RETENTION_BATCH``-wise (5000) beside as many younger
ones; making a partition of ``reading`` ahead; dropping a week of
``SITELINK_BENCH_PRUNE_READINGS`` (500000) readings.

Both write the section "Retention" of RESULTS.md (``SITELINK_BENCH_WRITE=0``: print only).
"""

from __future__ import annotations

import os
import statistics
import time
from datetime import timezone

import psycopg
import pytest

from services.logger import write_batch
from services.retention import Retention
from shared import config, db
from shared.protocol import Data, Envelope
from tests.bench import results
from tests.bench.harness import describe_pg, env_int, wait_until_quiet

BATCHES = env_int("SITELINK_BENCH_PARTITION_BATCHES", 100)
EVENTS = env_int("SITELINK_BENCH_PARTITION_EVENTS", 2000)
SENSORS = env_int("SITELINK_BENCH_PARTITION_SENSORS", 10)
ROUNDS = env_int("SITELINK_BENCH_ROUNDS", 3)
PRUNE_ROWS = env_int("SITELINK_BENCH_PRUNE_ROWS", 200_000)
PRUNE_READINGS = env_int("SITELINK_BENCH_PRUNE_READINGS", 500_000)
#: The section's parts, written by the last test.
PARTS: dict[str, str] = {}

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]


def _database(server, name: str, upto: int) -> tuple[str, int]:
    server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    server.execute(f"CREATE DATABASE {name}")
    url = server.url(name)
    database = db.Database(url, "bench-partitions")
    db.migrate(database, upto=upto)
    database.close()
    with psycopg.connect(url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('bench') RETURNING id").fetchone()[0]
        cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host, is_active) "
                           "VALUES (%s, 'h', false) RETURNING id", (site,)).fetchone()[0]
    return url, cid


def _round(url: str, cid: int, start: float) -> float:
    """Rows per second committed by write_batch, BATCHES batches from ``start`` (epoch s)."""
    database = db.Database(url, "bench-partitions")
    ts = start
    began = time.perf_counter()
    for n in range(BATCHES):
        batch = []
        for k in range(EVENTS):
            ts += 0.01
            batch.append(Envelope(sender=f"conn:{cid}", incarnation="bench", seq=n * EVENTS + k + 1, floor=0,
                                  ts=time.time(), event=Data(connection_id=cid, topic="t", gateway="GW",
                                                             ts=ts, sensors={f"S-{k % SENSORS}": {"v": 1.0}})))
        with database.transaction() as s:
            write_batch(s, batch)
    elapsed = time.perf_counter() - began
    database.close()
    return BATCHES * EVENTS / elapsed


def test_what_partitioning_costs_the_insert_path(durable_pg):
    plain, plain_cid = _database(durable_pg, "bench_reading_plain", 8)
    parted, parted_cid = _database(durable_pg, "bench_reading_parted", 9)
    with psycopg.connect(parted, autocommit=True) as conn:
        # a weekly partition (the first ones after the one the migration made of the old table)
        week = conn.execute("SELECT min(from_ts) FROM reading_partitions WHERE from_ts IS NOT NULL").fetchone()[0]
        partitions = conn.execute("SELECT count(*) FROM reading_partitions").fetchone()[0]
    rates: dict[str, list[float]] = {"plain": [], "partitioned": []}
    quiet = []
    for r in range(ROUNDS):
        for name, url, cid in (("plain", plain, plain_cid), ("partitioned", parted, parted_cid)):
            quiet.append(wait_until_quiet())
            # each round its own stretch of time, inside the week (two rounds of the defaults: 2 x 2000 s)
            start = week.timestamp() + r * BATCHES * EVENTS * 0.01 + 60
            rates[name].append(_round(url, cid, start))
            print(f"\n[partitions] round {r + 1} {name}: {rates[name][-1]:,.0f} rows/s", flush=True)
    with psycopg.connect(parted, autocommit=True) as conn:
        where = conn.execute("SELECT tableoid::regclass::text, count(*) FROM reading GROUP BY 1").fetchall()
    assert where == [(f"reading_{week.astimezone(timezone.utc):%Y%m%d}", ROUNDS * BATCHES * EVENTS)]
    for url in (plain, parted):
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM reading").fetchone()[0] == ROUNDS * BATCHES * EVENTS
    p, q = statistics.median(rates["plain"]), statistics.median(rates["partitioned"])
    body = "\n".join([
        "`tests/bench/bench_retention.py`: the logger's `write_batch` (devices upserted, readings inserted with "
        "`ON CONFLICT (sensor_id, ts) DO NOTHING`), one transaction per batch, into `reading` as a plain table "
        "(migrations up to 0008) and partitioned by week (0009; the rows land in one weekly partition of "
        f"{partitions} partitions, the default one included). {BATCHES} batches of {EVENTS} events (one reading "
        f"each, {SENSORS} sensors) per round, {ROUNDS} rounds each, alternating.",
        "",
        f"Setup: {describe_pg(durable_pg)}.",
        "",
        "| reading | rows/s, per round | median |",
        "|---|---|---|",
        f"| plain table | {', '.join(f'{x:,.0f}' for x in rates['plain'])} | **{p:,.0f}** |",
        f"| partitioned by week | {', '.join(f'{x:,.0f}' for x in rates['partitioned'])} | **{q:,.0f}** |",
        "",
        f"Partitioned / plain: **{q / p:.2f}**. Machine load before each round (cores busy): "
        f"{', '.join(f'{x:.2f}' for x in quiet)}.",
    ])
    PARTS["insert"] = body


def test_how_long_a_pruning_step_takes(durable_pg):
    url, cid = _database(durable_pg, "bench_prune", 9)
    with psycopg.connect(url, autocommit=True) as conn:
        for age in (40, 1):  # past the 30 days of the default, and not
            conn.execute("INSERT INTO mqtt_connection_log (connection_id, timestamp, level, message, broker_host) "
                         "SELECT %s, now() - make_interval(days => %s, secs => k), 'ERROR', "
                         "'connection refused (is the broker running and listening on this port?)', '10.0.0.1' "
                         "FROM generate_series(1, %s) k", (cid, age, PRUNE_ROWS))
        conn.execute("VACUUM ANALYZE mqtt_connection_log")
        site = conn.execute("SELECT site_id FROM mqtt_connection WHERE id = %s", (cid,)).fetchone()[0]
        conn.execute("INSERT INTO gateway (site_id, name) VALUES (%s, 'GW')", (site,))
        conn.execute("INSERT INTO sensor (gateway_id, name) SELECT g.id, 'S-' || i FROM gateway g, "
                     "generate_series(1, 100) i")
        week = conn.execute("SELECT min(from_ts) FROM reading_partitions WHERE from_ts IS NOT NULL").fetchone()[0]
        conn.execute("INSERT INTO reading (sensor_id, ts, \"values\") SELECT s.id, %s + make_interval(secs => k), "
                     "'{\"temperature\": 21.4, \"humidity\": 40.2}' FROM sensor s, generate_series(1, %s) k",
                     (week, PRUNE_READINGS // 100))
    settings = config.load({"SITELINK_KEEP_STATUS_HISTORY_DAYS": "forever", "SITELINK_KEEP_PARSING_LOG_DAYS": "forever",
                            "SITELINK_KEEP_QUARANTINE_DAYS": "forever"})
    database = db.Database(url, "bench-prune")
    keeper = Retention(settings, database)
    keeper.tasks = [t for t in keeper.tasks if t.table == "mqtt_connection_log"]
    wait_until_quiet()
    steps = []
    keeper.step()  # the round begins
    while keeper.todo:
        keeper.next_step = 0.0
        began = time.perf_counter()
        keeper.step()
        steps.append(time.perf_counter() - began)
    timings = {}
    with database.transaction() as s:
        began = time.perf_counter()
        made = s.one("reading_partition_add", {"ahead": 400 * 86400, "patient": False})["partition"]
        timings["add"] = time.perf_counter() - began
    full = f"reading_{week.astimezone(timezone.utc):%Y%m%d}"
    dropped = None
    while dropped != full:  # the oldest first: the (empty) partition the migration made of the old table
        with database.transaction() as s:
            began = time.perf_counter()
            # a cut just past the end of that week
            dropped = s.one("reading_partition_drop", {"keep": time.time() - week.timestamp() - 7 * 86400 - 1})[
                "partition"]
            timings["drop"] = time.perf_counter() - began
        assert dropped is not None
    database.close()
    with psycopg.connect(url, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM mqtt_connection_log").fetchone()[0]
        readings = conn.execute("SELECT count(*) FROM reading").fetchone()[0]
    assert left == PRUNE_ROWS and made and readings == 0
    steps.sort()
    PARTS["prune"] = "\n".join([
        f"Pruning steps (`services/retention.py`, a transaction each, on the same PostgreSQL): {PRUNE_ROWS:,} rows "
        f"of `mqtt_connection_log` past 30 days beside {PRUNE_ROWS:,} younger, deleted {settings.retention_batch} "
        f"per step in {len(steps)} steps: median **{statistics.median(steps) * 1000:.0f} ms**, longest "
        f"{steps[-1] * 1000:.0f} ms. Making a partition of `reading` ahead: {timings['add'] * 1000:.0f} ms. "
        f"Dropping a week of {PRUNE_READINGS:,} readings: {timings['drop'] * 1000:.0f} ms.",
    ])


def test_report():
    assert PARTS, "no retention benchmark ran"
    body = "\n\n".join(PARTS[k] for k in ("insert", "prune") if k in PARTS)
    print("\n" + body)
    if os.environ.get("SITELINK_BENCH_WRITE", "1") != "0":
        results.update_section("Retention", body)
