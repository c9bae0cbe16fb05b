"""Retention: each table pruned by age in batches, readings by whole weeks when
configured (and kept by default), and the services never wait for it."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.rows import dict_row

from services import retention
from services.retention import Retention
from shared import config, db
from tests.support import Publisher, joined_feed, reading, wait_for

DAY = timedelta(days=1)


@pytest.fixture
def psql(database_url: str):
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def now(conn) -> datetime:
    return conn.execute("SELECT now() AS now").fetchone()["now"]


def add_connection(conn, name: str) -> tuple[int, int]:
    site = conn.execute("INSERT INTO site (name) VALUES (%s) RETURNING id", (name,)).fetchone()["id"]
    cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host, is_active) VALUES (%s, 'h', false) "
                       "RETURNING id", (site,)).fetchone()["id"]
    return site, cid


def old_rows(conn, site: int, cid: int, ages_days: list[float]) -> None:
    """One row of the connection log, the parsing log (and its quarantined payload) per age."""
    for age in ages_days:
        conn.execute("INSERT INTO mqtt_connection_log (connection_id, timestamp, level, message) "
                     "SELECT %s, now() - make_interval(secs => %s), 'INFO', 'old'", (cid, age * 86400))
        conn.execute("WITH log AS (INSERT INTO mqtt_parsing_log (site_id, connection_id, timestamp, error_type, "
                     "error_message) SELECT %s, %s, now() - make_interval(secs => %s), 'PARSE_ERROR', 'm' "
                     "RETURNING id, timestamp) "
                     "INSERT INTO mqtt_quarantine (parsing_log_id, site_id, connection_id, received_at, topic, "
                     "parser_name, error_type, error_message, payload, payload_bytes, replayable) "
                     "SELECT id, %s, %s, timestamp, 't', 'json', 'PARSE_ERROR', 'm', '\\x00', 1, true FROM log",
                     (site, cid, age * 86400, site, cid))


def many_old_rows(conn, site: int, cid: int, n: int, age_days: float) -> None:
    conn.execute("INSERT INTO mqtt_connection_log (connection_id, timestamp, level, message) "
                 "SELECT %s, now() - make_interval(secs => %s + k), 'INFO', 'old' FROM generate_series(1, %s) k",
                 (cid, age_days * 86400, n))
    conn.execute("INSERT INTO mqtt_parsing_log (site_id, connection_id, timestamp, error_type, error_message) "
                 "SELECT %s, %s, now() - make_interval(secs => %s + k), 'PARSE_ERROR', 'm' "
                 "FROM generate_series(1, %s) k", (site, cid, age_days * 86400, n))
    conn.execute("INSERT INTO mqtt_quarantine (site_id, connection_id, received_at, topic, parser_name, error_type, "
                 "error_message, payload, payload_bytes, replayable) "
                 "SELECT %s, %s, now() - make_interval(secs => %s + k), 't', 'json', 'PARSE_ERROR', 'm', '\\x00', 1, "
                 "true FROM generate_series(1, %s) k", (site, cid, age_days * 86400, n))


def history(conn, cid: int, ages_days: list[float]) -> None:
    for age in ages_days:
        conn.execute("INSERT INTO mqtt_status_history (connection_id, since, status, is_active) "
                     "SELECT %s, now() - make_interval(secs => %s), 'error', true", (cid, age * 86400))


def ages(conn, table: str, column: str, where: str = "true") -> list[int]:
    """The ages, in whole days, of a table's rows, oldest first."""
    return [r["age"] for r in conn.execute(
        f"SELECT floor(extract(epoch FROM now() - {column}) / 86400)::int AS age FROM {table} "
        f"WHERE {where} ORDER BY {column}")]


def one_round(url: str, **env: str) -> Retention:
    """A whole retention round, as the logger runs it, step by step."""
    database = db.Database(url, "test-retention")
    keeper = Retention(config.load(env), database)
    keeper.step()
    while keeper.todo:
        keeper.next_step = 0.0
        keeper.step()
    database.close()
    return keeper


# --- the small tables ----------------------------------------------------------------

def test_the_logger_prunes_each_table_by_age_in_batches(stack, psql):
    site, cid = add_connection(psql, "r-old")
    old_rows(psql, site, cid, [100, 40, 31, 29, 1])
    many_old_rows(psql, site, cid, 2500, 45)
    _, lone = add_connection(psql, "r-lone")
    history(psql, cid, [200, 120, 95, 91, 60, 10])
    history(psql, lone, [300])
    stack.start("logger", SITELINK_RETENTION_BATCH="1000", SITELINK_KEEP_STATUS_HISTORY_DAYS="90")

    def pruned():
        return ages(psql, "mqtt_connection_log", "timestamp", f"connection_id = {cid}") == [29, 1]
    wait_for(pruned, timeout=30, what="the connection log older than 30 days pruned")
    wait_for(lambda: ages(psql, "mqtt_quarantine", "received_at") == [29, 1], what="the quarantine pruned")
    assert ages(psql, "mqtt_parsing_log", "timestamp") == [29, 1]
    # each connection keeps its newest row at or before the cut (its state then), and what is newer
    assert ages(psql, "mqtt_status_history", "since", f"connection_id = {cid}") == [91, 60, 10, 0]
    assert ages(psql, "mqtt_status_history", "since", f"connection_id = {lone}") == [300, 0]
    lines = wait_for(lambda: re.findall(r"retention: .*", stack.output("logger")), what="the round's summary")
    for table, rows in (("mqtt_connection_log", 2503), ("mqtt_parsing_log", 2503), ("mqtt_quarantine", 2503),
                        ("mqtt_status_history", 3)):
        assert f"{table}: {rows} rows deleted in" in lines[0], lines
    steps = int(re.search(r"mqtt_connection_log: 2503 rows deleted in (\d+) transactions", lines[0]).group(1))
    assert steps == 3  # 1000, 1000, 503: no transaction deleted more than SITELINK_RETENTION_BATCH


def test_a_table_kept_forever_is_not_pruned(psql, database_url):
    site, cid = add_connection(psql, "r-forever")
    old_rows(psql, site, cid, [400, 40])
    one_round(database_url, SITELINK_KEEP_CONNECTION_LOG_DAYS="forever", SITELINK_KEEP_QUARANTINE_DAYS="forever",
              SITELINK_KEEP_PARSING_LOG_DAYS="35")
    assert ages(psql, "mqtt_connection_log", "timestamp") == [400, 40]
    assert ages(psql, "mqtt_quarantine", "received_at") == [400, 40]
    # a parsing-log row pruned leaves its quarantined payload, unlinked
    assert ages(psql, "mqtt_parsing_log", "timestamp") == []
    assert [r["parsing_log_id"] for r in psql.execute("SELECT parsing_log_id FROM mqtt_quarantine")] == [None, None]


# --- readings ----------------------------------------------------------------------------

WEEKS_BACK = 10


def ten_weeks_of_readings(conn) -> tuple[datetime, int]:
    """An installation that has run for ten weeks: converted from before migration 0009
    (its old rows in reading_before_<date>), then a partition a week, with one week the
    partitions missed (its readings in reading_default). A reading every 12 hours since."""
    this_week = conn.execute("SELECT sitelink_week_start(now()) AS w").fetchone()["w"]
    [legacy] = [r["partition"] for r in conn.execute(
        "SELECT partition FROM reading_partitions WHERE from_ts IS NULL AND NOT is_default")]
    conn.execute(f"DROP TABLE {legacy}")  # the test database's own, made at the start of the run (empty)
    first = this_week - timedelta(weeks=WEEKS_BACK)
    conn.execute(f"CREATE TABLE reading_before_{first:%Y%m%d} PARTITION OF reading "
                 f"FOR VALUES FROM (MINVALUE) TO ('{first.isoformat()}')")
    covered = conn.execute("SELECT min(from_ts) AS f FROM reading_partitions WHERE from_ts IS NOT NULL").fetchone()["f"]
    week = first
    while week < covered:
        if week != this_week - timedelta(weeks=6):  # that week went to the default partition
            conn.execute("SELECT reading_partition_create(%s)", (week,))
        week += timedelta(weeks=1)
    site, _ = add_connection(conn, "r-readings")
    gateway = conn.execute("INSERT INTO gateway (site_id, name) VALUES (%s, 'GW') RETURNING id", (site,)).fetchone()
    sensor = conn.execute("INSERT INTO sensor (gateway_id, name) VALUES (%s, 'S') RETURNING id",
                          (gateway["id"],)).fetchone()["id"]
    conn.execute("INSERT INTO reading (sensor_id, ts, \"values\") SELECT %s, now() - make_interval(hours => 12 * k), "
                 "'{\"v\": 1}' FROM generate_series(0, %s) k", (sensor, 2 * 7 * (WEEKS_BACK + 2)))
    assert conn.execute("SELECT count(*) FROM reading_default").fetchone()["count"] == 14
    return this_week, sensor


def test_readings_are_kept_by_default(psql, database_url):
    ten_weeks_of_readings(psql)
    before = psql.execute("SELECT count(*) FROM reading").fetchone()["count"]
    partitions = {r["partition"] for r in psql.execute("SELECT partition FROM reading_partitions")}
    keeper = one_round(database_url)
    assert psql.execute("SELECT count(*) FROM reading").fetchone()["count"] == before
    assert partitions <= {r["partition"] for r in psql.execute("SELECT partition FROM reading_partitions")}
    assert [t.kind for t in keeper.tasks if t.table.startswith("reading")] == ["add"]


def test_readings_past_their_retention_go_by_whole_weeks(psql, database_url):
    this_week, sensor = ten_weeks_of_readings(psql)
    cut = now(psql) - 30 * DAY
    keep = {r["ts"] for r in psql.execute("SELECT ts FROM reading WHERE ts >= %s", (cut,))}
    one_round(database_url, SITELINK_KEEP_READINGS_DAYS="30", SITELINK_RETENTION_BATCH="5")
    left = psql.execute("SELECT min(ts) AS oldest, count(*) FROM reading").fetchone()
    assert keep <= {r["ts"] for r in psql.execute("SELECT ts FROM reading")}  # nothing younger than 30 days lost
    assert left["oldest"] >= psql.execute("SELECT sitelink_week_start(%s) AS w", (cut,)).fetchone()["w"]
    partitions = psql.execute("SELECT * FROM reading_partitions WHERE NOT is_default").fetchall()
    assert all(p["to_ts"] > cut for p in partitions)  # every week wholly older is gone
    assert not [p for p in partitions if p["from_ts"] is None]  # reading_before_<date> too
    assert psql.execute("SELECT count(*) FROM reading_default").fetchone()["count"] == 0  # by batches of 5
    assert max(p["to_ts"] for p in partitions) >= now(psql) + 28 * DAY  # and partitions ahead


def test_a_new_partition_takes_in_what_the_default_partition_caught(psql):
    site, _ = add_connection(psql, "r-ahead")
    gateway = psql.execute("INSERT INTO gateway (site_id, name) VALUES (%s, 'GW') RETURNING id", (site,)).fetchone()
    sensor = psql.execute("INSERT INTO sensor (gateway_id, name) VALUES (%s, 'S') RETURNING id",
                          (gateway["id"],)).fetchone()["id"]
    covered = psql.execute("SELECT max(to_ts) AS t FROM reading_partitions WHERE NOT is_default").fetchone()["t"]
    psql.execute("INSERT INTO reading (sensor_id, ts, \"values\") VALUES (%s, %s, '{}')", (sensor, covered + DAY))
    made = psql.execute("SELECT reading_partition_add(%s, false) AS p", (covered + DAY,)).fetchone()["p"]
    where = psql.execute("SELECT tableoid::regclass::text AS part FROM reading").fetchone()["part"]
    assert where == made == f"reading_{covered.astimezone(timezone.utc):%Y%m%d}"
    assert psql.execute("SELECT count(*) FROM reading_default").fetchone()["count"] == 0


# --- the services never wait for it ---------------------------------------------------------

def test_a_prune_holding_its_locks_stops_no_monitor_cycle_nor_any_write(stack, broker, psql):
    """Every pruning step, held open with its locks (as if it took forever): the
    monitor still cycles, a site still switches off and on, readings still go in."""
    site, old = add_connection(psql, "r-held")
    many_old_rows(psql, site, old, 3000, 400)
    history(psql, old, [400, 300])
    cid = stack.sql.add_site("r-live", port=broker.port, stall_after=None)
    forever = {f"SITELINK_KEEP_{t}_DAYS": "forever" for t in ("CONNECTION_LOG", "STATUS_HISTORY", "PARSING_LOG",
                                                                "QUARANTINE")}
    stack.start("logger", "monitor", **forever)  # the test holds the prune: the logger's own must not race it
    stack.sql.wait_status(cid, "connected")
    feed = joined_feed(stack)
    with psycopg.connect(stack.env["SITELINK_DATABASE_URL"], autocommit=False) as pruner:
        session = db.Session(pruner)
        deleted = {task.table: session.run(task.query, {"keep": task.keep_days * 86400, "batch": 5000})
                   for task in retention.tasks(config.load({"SITELINK_KEEP_READINGS_DAYS": "7"}))
                   if task.kind == "rows"}
        assert deleted["mqtt_connection_log"] == deleted["mqtt_quarantine"] == 3000
        held = {r[0] for r in pruner.execute(
            "SELECT relation::regclass::text FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'relation'")}
        assert {"mqtt_connection_log", "mqtt_status_history", "mqtt_parsing_log", "mqtt_quarantine"} <= held
        assert not held & {"mqtt_connection", "sitelink_monitor", "gateway", "datalogger", "sensor"}
        cycles = lambda: len([b for _, b in feed.poll() if b["type"] == "monitor_cycle"])  # noqa: E731
        seen = cycles()
        wait_for(lambda: cycles() >= seen + 2, what="two more monitor cycles")
        stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
        stack.sql.wait_status(cid, "disconnected")
        stack.sql.rows("UPDATE mqtt_connection SET is_active = true WHERE id = %s", cid)
        stack.sql.wait_status(cid, "connected")
        publisher = Publisher(broker.port)
        publisher.publish("sites/r-live/GW", reading(gateway="GW", **{"S": {"t": 1.0}}))
        publisher.close()
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 1, what="a reading stored meanwhile")
        pruner.rollback()


def test_making_a_partition_never_queues_behind_the_monitor(psql, database_url):
    """Attaching a partition needs sensor's lock, which the monitor's cycle takes to
    mark sensors offline. Tried while a cycle holds it, the step gives up at once
    (NOWAIT) instead of waiting in the queue ahead of the monitor's next statement."""
    covered = psql.execute("SELECT max(to_ts) AS t FROM reading_partitions WHERE NOT is_default").fetchone()["t"]
    with psycopg.connect(database_url) as monitor:
        monitor.execute("UPDATE sensor SET is_online = false WHERE is_online AND last_seen_at < now() - interval '1 h'")
        with pytest.raises(psycopg.errors.LockNotAvailable, match='could not obtain lock on relation "sensor"'):
            psql.execute("SELECT reading_partition_add(%s, false)", (covered + DAY,))
        # dropping a partition needs no lock of the monitor's
        psql.execute("SELECT set_config('lock_timeout', '1s', false)")
        dropped = psql.execute("SELECT reading_partition_drop(%s) AS p", (covered,)).fetchone()["p"]
        assert dropped is not None
        monitor.rollback()
    # once the cycle is over, the next try makes it
    assert psql.execute("SELECT reading_partition_add(%s, false) AS p", (covered + DAY,)).fetchone()["p"]
