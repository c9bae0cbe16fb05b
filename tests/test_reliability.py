"""Reliability in psql: the status history, the per-site views and silent sites.

Histories are built with exact times before a pinned reference time
(``SET sitelink.as_of``), and each figure is checked against the value
computed by hand in the comment beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.rows import dict_row

from shared import db

AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
S = timedelta(seconds=1)
M = timedelta(minutes=1)
H = timedelta(hours=1)
D = timedelta(days=1)


@pytest.fixture
def psql(database_url: str) -> Iterator[psycopg.Connection]:
    """A psql-like session whose "now", for the views, is AS_OF."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SELECT set_config('sitelink.as_of', %s, false)", (AS_OF.isoformat(),))
        yield conn


# --- constructed histories -------------------------------------------------------

@dataclass(frozen=True)
class Figures:
    active_time: timedelta
    connected_time: timedelta
    uptime_pct: str | None
    drops: int
    recoveries: int
    mttr: timedelta | None
    longest_outage: timedelta


@dataclass(frozen=True)
class Case:
    #: (how long before AS_OF, status, is_active), oldest first
    history: list[tuple[timedelta, str, bool]]
    day: Figures
    week: Figures


CASES = {
    "always_connected": Case(
        [(30 * D, "connected", True)],
        day=Figures(24 * H, 24 * H, "100.00", 0, 0, None, timedelta(0)),
        week=Figures(7 * D, 7 * D, "100.00", 0, 0, None, timedelta(0))),
    # Three drops: 10 min three days ago, 15 min (over two non-connected rows)
    # and 60 min within the day.
    "drops_and_recoveries": Case(
        [(10 * D, "connected", True),
         (3 * D, "error", True), (3 * D - 10 * M, "connected", True),
         (6 * H, "disconnected", True), (5 * H + 50 * M, "connecting", True), (5 * H + 45 * M, "connected", True),
         (2 * H, "error", True), (1 * H, "connected", True)],
        # 24 h: down 15 + 60 = 75 min; 1365 / 1440 = 94.79 %; mttr 75 / 2 = 37.5 min
        day=Figures(24 * H, 24 * H - 75 * M, "94.79", 2, 2, 37 * M + 30 * S, 60 * M),
        # 7 d: down 85 min; 9995 / 10080 = 99.16 %; mttr 85 / 3 = 28 min 20 s
        week=Figures(7 * D, 7 * D - 85 * M, "99.16", 3, 3, 28 * M + 20 * S, 60 * M)),
    # Down for 3 hours and still down (error, retry, error).
    "outage_going_on": Case(
        [(20 * D, "connected", True), (3 * H, "error", True), (2 * H, "connecting", True),
         (2 * H - M, "error", True)],
        # 21 / 24 = 87.50 %
        day=Figures(24 * H, 21 * H, "87.50", 1, 0, None, 3 * H),
        # 165 / 168 = 98.21 %
        week=Figures(7 * D, 165 * H, "98.21", 1, 0, None, 3 * H)),
    # Created 12 hours ago; 2 minutes to connect (a recovery, not a drop).
    "created_mid_window": Case(
        [(12 * H, "disconnected", True), (12 * H - M, "connecting", True), (12 * H - 2 * M, "connected", True)],
        # 718 / 720 = 99.72 %, in both windows
        day=Figures(12 * H, 12 * H - 2 * M, "99.72", 0, 1, 2 * M, 2 * M),
        week=Figures(12 * H, 12 * H - 2 * M, "99.72", 0, 1, 2 * M, 2 * M)),
    # Down from 30 h to 20 h ago: the 24 h window sees its last 4 hours.
    "outage_began_before_the_window": Case(
        [(10 * D, "connected", True), (30 * H, "error", True), (20 * H, "connected", True)],
        # 20 / 24 = 83.33 %; the drop is before the window
        day=Figures(24 * H, 20 * H, "83.33", 0, 1, 4 * H, 4 * H),
        # 158 / 168 = 94.05 %
        week=Figures(7 * D, 158 * H, "94.05", 1, 1, 10 * H, 10 * H)),
    # Switched off 8 h ago (disconnected by the monitor, not a drop), on again
    # 2 h ago, connected a minute later.
    "inactive_for_a_while": Case(
        [(10 * D, "connected", True), (8 * H, "connected", False), (8 * H - M, "disconnected", False),
         (2 * H, "disconnected", True), (2 * H - M, "connected", True)],
        # active 16 h + 2 h = 18 h, connected 16 h + 1 h 59 min: 1079 / 1080 = 99.91 %
        day=Figures(18 * H, 17 * H + 59 * M, "99.91", 0, 1, M, M),
        # active 168 - 6 = 162 h, 1 min of it down: 9719 / 9720 = 99.99 %
        week=Figures(162 * H, 162 * H - M, "99.99", 0, 1, M, M)),
    # Dropped 5 h ago, switched off while down 4 h ago (that outage ends
    # without a recovery), on again 1 h ago, connected 30 min later.
    "switched_off_while_down": Case(
        [(10 * D, "connected", True), (5 * H, "error", True), (4 * H, "error", False),
         (1 * H, "error", True), (30 * M, "connected", True)],
        # active 21 h, down 1 h + 30 min: 19.5 / 21 = 92.86 %
        day=Figures(21 * H, 19 * H + 30 * M, "92.86", 1, 1, 30 * M, H),
        # active 165 h: 163.5 / 165 = 99.09 %
        week=Figures(165 * H, 163 * H + 30 * M, "99.09", 1, 1, 30 * M, H)),
    "inactive_all_along": Case(
        [(30 * D, "disconnected", False)],
        day=Figures(timedelta(0), timedelta(0), None, 0, 0, None, timedelta(0)),
        week=Figures(timedelta(0), timedelta(0), None, 0, 0, None, timedelta(0))),
}

FIGURES = ", ".join(Figures.__dataclass_fields__)


def add_site(conn: psycopg.Connection, name: str) -> int:
    return conn.execute("INSERT INTO site (name) VALUES (%s) RETURNING id", (name,)).fetchone()["id"]


def add_connection(conn: psycopg.Connection, site_id: int, **columns) -> int:
    cols = {"site_id": site_id, "broker_host": "broker.example.net", **columns}
    return conn.execute(f"INSERT INTO mqtt_connection ({', '.join(cols)}) "
                        f"VALUES ({', '.join(['%s'] * len(cols))}) RETURNING id",
                        list(cols.values())).fetchone()["id"]


def add_site_with_history(conn: psycopg.Connection, name: str,
                          history: list[tuple[timedelta, str, bool]]) -> int:
    """A site whose connection has exactly ``history`` (the trigger's first row replaced)."""
    cid = add_connection(conn, add_site(conn, name))
    conn.execute("DELETE FROM mqtt_status_history WHERE connection_id = %s", (cid,))
    for before, status, active in history:
        conn.execute("INSERT INTO mqtt_status_history (connection_id, since, status, is_active) "
                     "VALUES (%s, %s, %s, %s)", (cid, AS_OF - before, status, active))
    return cid


def figures(conn: psycopg.Connection, view: str, site: str) -> Figures:
    row = conn.execute(f"SELECT {FIGURES} FROM {view} WHERE site = %s", (site,)).fetchone()
    assert row is not None, f"{site} missing from {view}"
    pct = row.pop("uptime_pct")
    return Figures(uptime_pct=None if pct is None else str(pct), **row)


@pytest.mark.parametrize("name", CASES)
def test_a_history_gives_the_figures_computed_by_hand(psql, name):
    case = CASES[name]
    add_site_with_history(psql, name, case.history)
    assert figures(psql, "site_reliability_24h", name) == case.day
    assert figures(psql, "site_reliability_7d", name) == case.week


def test_several_sites_and_a_site_without_connection(psql):
    for name, case in CASES.items():
        add_site_with_history(psql, name, case.history)
    add_site(psql, "no_connection_yet")
    for name, case in CASES.items():
        assert figures(psql, "site_reliability_24h", name) == case.day, name
        assert figures(psql, "site_reliability_7d", name) == case.week, name
    rows = psql.execute("SELECT * FROM site_reliability_24h").fetchall()
    assert [r["site"] for r in rows] == [*CASES, "no_connection_yet"]  # one row per site, by site id
    lonely = rows[-1]
    assert lonely["connection_id"] is None
    assert {k: lonely[k] for k in Figures.__dataclass_fields__} == dict.fromkeys(Figures.__dataclass_fields__)
    assert lonely["readings"] == 0 and lonely["last_data_at"] is None
    assert {(r["window_start"], r["window_end"]) for r in rows} == {(AS_OF - 24 * H, AS_OF)}


def test_any_window_for_a_site_or_a_connection(psql):
    cid = add_site_with_history(psql, "flaky", CASES["drops_and_recoveries"].history)
    add_site_with_history(psql, "steady", CASES["always_connected"].history)
    # two hours around the drop of three days ago: down 10 of 120 minutes, 91.67 %
    row = psql.execute("SELECT * FROM connection_reliability(%s, %s, %s)",
                       (cid, AS_OF - 3 * D - H, AS_OF - 3 * D + H)).fetchone()
    assert Figures(**{**row, "uptime_pct": str(row["uptime_pct"])}) == Figures(
        2 * H, 110 * M, "91.67", 1, 1, 10 * M, 10 * M)
    # 30 days: the steady site's history begins exactly at the window's start
    assert figures(psql, "site_reliability(interval '30 days')", "steady") == Figures(
        30 * D, 30 * D, "100.00", 0, 0, None, timedelta(0))
    # 30 days of the flaky one: its first row is 10 days old, and it lost 85 minutes since
    assert figures(psql, "site_reliability(interval '30 days')", "flaky") == Figures(
        10 * D, 10 * D - 85 * M, "99.41", 3, 3, 28 * M + 20 * S, H)


def test_a_pinned_time_can_be_released_and_the_views_use_now(psql):
    with psql.transaction():
        assert psql.execute("SELECT sitelink_as_of() = %s AS pinned", (AS_OF,)).fetchone()["pinned"]
        psql.execute("RESET sitelink.as_of")
        assert psql.execute("SELECT sitelink_as_of() = now() AS unpinned").fetchone()["unpinned"]
        add_site(psql, "x")
        row = psql.execute("SELECT window_end = now() AS now_ends FROM site_reliability_7d").fetchone()
        assert row["now_ends"]


def test_the_window_and_the_threshold_must_be_positive(psql):
    for bad in ("interval '0'", "interval '-1 day'", "NULL"):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="the window must be a positive interval"):
            psql.execute(f"SELECT * FROM site_reliability({bad})")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="the threshold must be a positive interval"):
            psql.execute(f"SELECT * FROM silent_sites({bad})")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="window_end - window_start must be a positive"):
        psql.execute("SELECT * FROM connection_reliability(1, '2026-03-01', '2026-02-01')")


# --- data: last message and readings per minute --------------------------------------

def add_device(conn: psycopg.Connection, table: str, **columns) -> int:
    return conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) "
                        f"VALUES ({', '.join(['%s'] * len(columns))}) RETURNING id",
                        list(columns.values())).fetchone()["id"]


def add_readings(conn: psycopg.Connection, sensor_id: int, times: list[datetime]) -> None:
    conn.execute("INSERT INTO reading (sensor_id, ts, \"values\") "
                 "SELECT %s, t, '{\"v\": 1}' FROM unnest(%s::timestamptz[]) AS t", (sensor_id, times))


def test_last_data_and_readings_per_minute_of_each_site(psql):
    busy = add_site(psql, "busy")
    add_connection(psql, busy)
    quiet = add_site(psql, "quiet")
    add_connection(psql, quiet)
    g1 = add_device(psql, "gateway", site_id=busy, name="GW-1", last_seen_at=AS_OF - 90 * S)
    g2 = add_device(psql, "gateway", site_id=busy, name="GW-2", last_seen_at=AS_OF - 10 * M)
    dl = add_device(psql, "datalogger", gateway_id=g2, name="DL-1")
    every_minute = add_device(psql, "sensor", gateway_id=g1, name="S-1")
    hourly = add_device(psql, "sensor", gateway_id=g2, datalogger_id=dl, name="S-2")
    # two days, one a minute, plus one a minute ahead of the window (a gateway clock running fast)
    add_readings(psql, every_minute, [AS_OF - k * M for k in range(-1, 2880)])
    add_readings(psql, hourly, [AS_OF - k * H for k in range(200)])  # 200 hours, one an hour
    add_device(psql, "gateway", site_id=quiet, name="GW-Q", last_seen_at=AS_OF - 3 * D)

    day = {r["site"]: r for r in psql.execute("SELECT * FROM site_reliability_24h")}
    week = {r["site"]: r for r in psql.execute("SELECT * FROM site_reliability_7d")}
    # 24 h (AS_OF - 24 h, AS_OF]: 1440 + 24 readings; 1464 / 1440 = 1.02 a minute
    assert (day["busy"]["readings"], str(day["busy"]["readings_per_minute"])) == (1464, "1.02")
    # 7 d: 2880 + 168 readings; 3048 / 10080 = 0.30 a minute
    assert (week["busy"]["readings"], str(week["busy"]["readings_per_minute"])) == (3048, "0.30")
    assert day["busy"]["last_data_at"] == AS_OF - 90 * S and day["busy"]["since_last_data"] == 90 * S
    assert (day["quiet"]["readings"], str(day["quiet"]["readings_per_minute"])) == (0, "0.00")
    assert day["quiet"]["since_last_data"] == 3 * D


def test_readings_are_counted_through_the_primary_key_not_a_scan_of_reading(psql):
    """30 days of 20 sensors, one reading every 2 minutes: 432,000 rows."""
    site = add_site(psql, "big")
    add_connection(psql, site)
    gateway = add_device(psql, "gateway", site_id=site, name="GW")
    psql.execute("INSERT INTO sensor (gateway_id, name) SELECT %s, 'S-' || i FROM generate_series(1, 20) i",
                 (gateway,))
    psql.execute("INSERT INTO reading (sensor_id, ts, \"values\") "
                 "SELECT s.id, %s - make_interval(mins => 2 * k), '{\"v\": 1}' "
                 "FROM sensor s, generate_series(0, 21599) k", (AS_OF,))
    psql.execute("VACUUM ANALYZE reading")
    # reading is partitioned by week (migration 0009): these rows are all in one partition
    partitions = {r["partition"]: r["rows_estimate"] for r in psql.execute("SELECT * FROM reading_partitions")}
    assert sorted(partitions.values())[-1] == 432_000
    for view, expected in (("site_reliability_24h", 20 * 720), ("site_reliability_7d", 20 * 5040)):
        plan = psql.execute(f"EXPLAIN (FORMAT JSON) SELECT * FROM {view}").fetchone()["QUERY PLAN"]
        nodes = list(plan_nodes(plan[0]["Plan"]))
        scans = [n for n in nodes if n.get("Relation Name") in partitions]
        # a partition that holds readings is read through its primary key, one range per sensor
        # (index, index-only or bitmap scan); only an empty one may be "scanned"
        keyed = [n for n in nodes if n.get("Index Name", "").removesuffix("_pkey") in partitions]
        assert keyed and all("sensor_id = se.id" in n["Index Cond"] for n in keyed), json.dumps(plan)
        assert not [n for n in scans if n["Node Type"] == "Seq Scan" and partitions[n["Relation Name"]] > 0]
        assert psql.execute(f"SELECT readings FROM {view}").fetchone()["readings"] == expected
        # without the readings columns, the planner does not count them at all
        plan = json.dumps(psql.execute(f"EXPLAIN (FORMAT JSON) SELECT site, uptime_pct, drops FROM {view}").fetchone())
        assert not [name for name in partitions if f'"{name}' in plan] and '"reading"' not in plan


def plan_nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


# --- silent sites --------------------------------------------------------------------

def add_connected_site(conn: psycopg.Connection, name: str, *, connected: timedelta | None,
                       heard: timedelta | None, status: str = "connected", **columns) -> int:
    """A site connected ``connected`` before AS_OF whose gateway was last heard ``heard`` before."""
    site = add_site(conn, name)
    at = None if connected is None else AS_OF - connected
    add_connection(conn, site, status=status, last_connected_at=at, status_changed_at=at, **columns)
    if heard is not None:
        add_device(conn, "gateway", site_id=site, name="GW", last_seen_at=AS_OF - heard)
    return site


def test_silent_sites_are_connected_active_and_quiet_past_the_threshold(psql):
    add_connected_site(psql, "quiet_2h", connected=3 * H, heard=2 * H)
    add_connected_site(psql, "spoke_20min_ago", connected=3 * H, heard=20 * M)
    # silent for 5 h, but reconnected 30 min ago: counted from the reconnect
    add_connected_site(psql, "reconnected", connected=30 * M, heard=5 * H)
    add_connected_site(psql, "never_spoke", connected=2 * H, heard=None)
    add_connected_site(psql, "down", connected=None, heard=5 * H, status="error")
    add_connected_site(psql, "switched_off", connected=5 * H, heard=5 * H, is_active=False)
    add_connected_site(psql, "expects_no_traffic", connected=5 * H, heard=5 * H, stall_after=None)
    add_site(psql, "no_connection")
    psql.execute("UPDATE mqtt_connection SET paused_since = %s WHERE site_id = "
                 "(SELECT id FROM site WHERE name = 'quiet_2h')", (AS_OF - 2 * H,))

    default = psql.execute("SELECT * FROM silent_sites").fetchall()
    assert [(r["site"], r["silent_for"]) for r in default] == [("quiet_2h", 2 * H), ("never_spoke", 2 * H)]
    first = default[0]
    assert (first["connected_since"], first["last_data_at"], first["paused_since"]) == (
        AS_OF - 3 * H, AS_OF - 2 * H, AS_OF - 2 * H)
    assert default[1]["last_data_at"] is None

    ten_minutes = psql.execute("SELECT site, silent_for FROM silent_sites(interval '10 minutes')").fetchall()
    assert [(r["site"], r["silent_for"]) for r in ten_minutes] == [
        ("quiet_2h", 2 * H), ("never_spoke", 2 * H), ("reconnected", 30 * M), ("spoke_20min_ago", 20 * M)]
    assert psql.execute("SELECT count(*) FROM silent_sites(interval '3 hours')").fetchone()["count"] == 0


# --- the history the trigger keeps ----------------------------------------------------

def history(conn: psycopg.Connection, cid: int) -> list[tuple[datetime, str, bool]]:
    return [(r["since"], r["status"], r["is_active"]) for r in conn.execute(
        "SELECT since, status, is_active FROM mqtt_status_history WHERE connection_id = %s ORDER BY since, id",
        (cid,))]


def test_the_logger_status_queries_fill_the_history(psql, database_url):
    cid = add_connection(psql, add_site(psql, "north-pier"))
    [(created, first, _)] = history(psql, cid)
    assert first == "disconnected"
    t = [created + k * S for k in range(1, 7)]
    database = db.Database(database_url, "test-logger")

    seqs = iter(range(10, 100, 10))

    def status(name: str, at: datetime, seq: int | None = None, **extra) -> dict | None:
        # As the logger calls them (arrays, one status per connection): applied in
        # the order (epoch, seq) PostgreSQL keeps.
        one = {"message": "", "retry_attempt": None, "retry_in": None, **extra}
        with database.transaction() as s:
            return s.one("status_set", {"ids": [cid], "statuses": [name], "ats": [at], "epochs": [1],
                                        "seqs": [seq or next(seqs)], "messages": [one["message"]],
                                        "retry_attempts": [one["retry_attempt"]], "retry_ins": [one["retry_in"]]})

    try:
        status("connecting", t[0])
        status("connected", t[1])
        with database.transaction() as s:  # paused and flowing again: not a status change
            s.one("set_flow", dict(connection_id=cid, paused=True, at=t[1] + S / 2, epoch=1))
            s.one("set_flow", dict(connection_id=cid, paused=False, at=t[1] + S / 2, epoch=1))
        status("error", t[2], message="connection lost", retry_attempt=1, retry_in=60.0)
        status("connecting", t[3])
        status("connecting", t[3] + S / 2)  # the same status again: nothing new
        assert status("connected", t[2] + S / 2, seq=35) is None  # a late re-send, older than the row: not applied
        status("disconnected", t[4])
    finally:
        database.close()
    assert history(psql, cid) == [(created, "disconnected", True), (t[0], "connecting", True),
                                  (t[1], "connected", True), (t[2], "error", True),
                                  (t[3], "connecting", True), (t[4], "disconnected", True)]


def test_other_writers_are_stamped_with_their_transaction_time(psql):
    cid = add_connection(psql, add_site(psql, "harbour"))
    psql.execute("UPDATE mqtt_connection SET status = 'connected', status_changed_at = clock_timestamp() "
                 "WHERE id = %s", (cid,))
    with psql.transaction():
        # a status change that leaves status_changed_at as it was
        psql.execute("UPDATE mqtt_connection SET status = 'error' WHERE id = %s", (cid,))
        error_at = psql.execute("SELECT now()").fetchone()["now"]
    with psql.transaction():
        psql.execute("UPDATE mqtt_connection SET is_active = false WHERE id = %s", (cid,))
        off_at = psql.execute("SELECT now()").fetchone()["now"]
    # changes of anything else write nothing
    psql.execute("UPDATE mqtt_connection SET broker_port = 1884, error_message = 'x', "
                 "status_changed_at = clock_timestamp() WHERE id = %s", (cid,))
    rows = history(psql, cid)
    assert [(status, active) for _, status, active in rows] == [
        ("disconnected", True), ("connected", True), ("error", True), ("error", False)]
    assert (rows[2][0], rows[3][0]) == (error_at, off_at)


def test_a_stamp_never_goes_back_before_the_previous_row(psql):
    cid = add_connection(psql, add_site(psql, "buoy"))
    [(created, _, _)] = history(psql, cid)
    psql.execute("UPDATE mqtt_connection SET status = 'connected', status_changed_at = '2001-01-01Z' "
                 "WHERE id = %s", (cid,))
    assert history(psql, cid)[-1] == (created, "connected", True)


def test_the_history_goes_with_its_connection(psql):
    kept = add_connection(psql, add_site(psql, "kept"))
    gone_site = add_site(psql, "gone")
    add_connection(psql, gone_site)
    psql.execute("UPDATE mqtt_connection SET status = 'connected'")
    psql.execute("DELETE FROM site WHERE id = %s", (gone_site,))
    counts = {r["connection_id"]: r["count"] for r in psql.execute(
        "SELECT connection_id, count(*) FROM mqtt_status_history GROUP BY 1")}
    assert counts == {kept: 2}  # nothing left of `gone`


def test_migrating_starts_the_history_of_existing_connections(pg_server):
    name = "sitelink_reliability_upgrade"
    pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg_server.execute(f"CREATE DATABASE {name}")
    database = db.Database(pg_server.url(name), "test-migrate")
    try:
        db.migrate(database, upto=6)  # the release before this one
        with psycopg.connect(pg_server.url(name), autocommit=True, row_factory=dict_row) as conn:
            up = add_connection(conn, add_site(conn, "up"), status="connected",
                                status_changed_at=AS_OF - 2 * D, last_connected_at=AS_OF - 2 * D)
            off = add_connection(conn, add_site(conn, "off"), is_active=False)
            created = conn.execute("SELECT created_at FROM mqtt_connection WHERE id = %s", (off,)).fetchone()
            db.migrate(database)
            assert history(conn, up) == [(AS_OF - 2 * D, "connected", True)]
            assert history(conn, off) == [(created["created_at"], "disconnected", False)]
    finally:
        database.close()
        pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
