"""The whole pipeline, end to end: real PostgreSQL, Mosquitto, ZeroMQ and processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.stack import SQL
from tests.support import (ROOT, alive, children_of, cmdline, comm, free_port, joined_feed, monitor_children, reading,
                           wait_for)


# --- the seed's three ---------------------------------------------------------

def test_active_connection_reaches_connected(stack, broker):
    cid = stack.sql.add_site("alpha", port=broker.port)
    stack.start("logger", "monitor")
    row = stack.sql.wait_status(cid, "connected")
    assert row["last_connected_at"] is not None and row["error_message"] == ""
    log = stack.sql.one("SELECT * FROM mqtt_connection_log WHERE connection_id = %s AND level = 'INFO' "
                        "AND message LIKE 'Successfully connected%%'", cid)
    assert log is not None and log["exception_traceback"] == ""


def test_inactive_connection_disconnects_and_its_child_is_gone(stack, broker):
    cid = stack.sql.add_site("beta", port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    [child] = wait_for(lambda: monitor_children(stack), what="the child process")
    stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
    stack.sql.wait_status(cid, "disconnected")
    wait_for(lambda: not alive(child), what="the child to exit")
    assert stack.sql.one("SELECT 1 FROM mqtt_connection_log WHERE connection_id = %s "
                         "AND message = 'Disconnected cleanly'", cid)
    # The child's own log line says so too (it said "disconnected: " with nothing after).
    assert f"connection {cid} disconnected: cleanly, as asked" in stack.output("monitor")


def test_missing_broker_logs_errors_with_retry_attempt_and_next_retry(stack):
    cid = stack.sql.add_site("gamma", port=free_port())  # nothing listens there
    stack.start("logger", "monitor", SITELINK_MAX_RETRIES="50", SITELINK_RETRY_BASE="1",
                SITELINK_RETRY_CAP="5")
    rows = wait_for(lambda: stack.sql.rows(
        "SELECT * FROM mqtt_connection_log WHERE connection_id = %s AND level = 'ERROR' "
        "ORDER BY id", cid), what="ERROR rows")
    assert rows[0]["retry_attempt"] == 1 and "refused" in rows[0]["message"]
    assert rows[0]["exception_type"] == "ConnectionRefusedError"
    row = stack.sql.one("SELECT *, mqtt_next_retry > now() AS in_future FROM mqtt_connection WHERE id = %s", cid)
    assert row["status"] in ("error", "connecting") and row["connection_errors"] >= 1
    wait_for(lambda: stack.sql.value("SELECT mqtt_next_retry > now() FROM mqtt_connection WHERE id = %s", cid),
             what="mqtt_next_retry in the future")


# --- the status feed ----------------------------------------------------------

def test_feed_carries_each_change_after_commit_with_is_active(stack, broker):
    stack.start("logger", "monitor")
    feed = joined_feed(stack)
    cid = stack.sql.add_site("delta", port=broker.port)
    site_id = stack.sql.value("SELECT site_id FROM mqtt_connection WHERE id = %s", cid)

    def committed(topic, body):
        if body.get("connection_id") != cid or body["status"] != "connected":
            return False
        # Published only after the commit: the row must already say so.
        assert stack.sql.status(cid) == "connected"
        return True
    topic, body = feed.wait_for(committed, what="connected on the feed")
    assert topic == f"mqtt_status.site.{site_id}.conn.{cid}"
    assert body["type"] == "mqtt_status" and body["site_id"] == site_id and body["is_active"] is True
    assert isinstance(body["seq"], int) and body["timestamp"]

    stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
    _, body = feed.wait_for(lambda t, b: b.get("connection_id") == cid and b["status"] == "disconnected",
                            what="disconnected on the feed")
    assert body["is_active"] is False
    seqs = [b["seq"] for t, b in feed.messages if t.startswith("mqtt_status")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


# --- data --------------------------------------------------------------------

def test_readings_and_devices_are_stored_and_duplicates_ignored(stack, broker, publisher):
    cid = stack.sql.add_site("epsilon", port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    msg = reading(**{"S-1": {"temperature": 21.4, "humidity": 40.2}, "S-2": {"temperature": 19.0}})
    publisher.publish("sites/epsilon/GW-01/DL-07", msg)
    publisher.publish("sites/epsilon/GW-01/DL-07", msg)  # delivered twice
    publisher.publish("sites/epsilon/GW-01", reading(datalogger=None))  # heartbeat
    publisher.publish("sites/epsilon/GW-01/DL-07", reading(ts="2026-11-28T10:01:00Z", **{"S-1": {"temperature": 21.5}}))
    # The last message is stored after the repeat (one connection keeps order),
    # so three rows mean the repeat stored nothing new.
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 3, what="3 readings")
    rows = stack.sql.rows(
        "SELECT s.name, r.ts, r.values FROM reading r JOIN sensor s ON s.id = r.sensor_id ORDER BY s.name, r.ts")
    assert [(r["name"], r["values"]) for r in rows] == [
        ("S-1", {"temperature": 21.4, "humidity": 40.2}), ("S-1", {"temperature": 21.5}),
        ("S-2", {"temperature": 19.0})]
    site_id = stack.sql.value("SELECT site_id FROM mqtt_connection WHERE id = %s", cid)
    gw = stack.sql.one("SELECT * FROM gateway WHERE site_id = %s", site_id)
    assert gw["name"] == "GW-01" and gw["is_online"] and gw["last_seen_at"] is not None
    assert stack.sql.value("SELECT count(*) FROM datalogger WHERE gateway_id = %s", gw["id"]) == 1


def test_offline_device_comes_back_online_when_it_reports(stack, broker, publisher):
    cid = stack.sql.add_site("zeta", port=broker.port)
    stack.start("logger", "monitor", SITELINK_GATEWAY_OFFLINE_AFTER="1", SITELINK_DATALOGGER_OFFLINE_AFTER="1",
                SITELINK_SENSOR_OFFLINE_AFTER="1")
    feed = stack.feed("device_status")
    stack.sql.wait_status(cid, "connected")
    publisher.publish("sites/zeta/GW-01/DL-07", reading(**{"S-1": {"t": 1}}))
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM sensor WHERE NOT is_online") == 1, timeout=20,
             what="the sensor marked offline")
    assert stack.sql.value("SELECT count(*) FROM gateway WHERE NOT is_online") == 1
    feed.wait_for(lambda t, b: b["kind"] == "sensor" and b["is_online"] is False, what="offline on the feed")
    publisher.publish("sites/zeta/GW-01/DL-07", reading(ts="2026-11-28T10:05:00Z", **{"S-1": {"t": 2}}))
    feed.wait_for(lambda t, b: b["kind"] == "sensor" and b["is_online"] is True, what="online on the feed")


PARSE_CASES = [
    (b"\xff\xfe\x00 binary junk", "PARSE_ERROR"),
    (b"{not json", "PARSE_ERROR"),
    (json.dumps({"ts": "2026-11-28T10:00:00Z"}).encode(), "VALIDATION_ERROR"),
    (json.dumps(reading(**{"S-1": {"t": "warm"}})).encode(), "VALIDATION_ERROR"),
]


def test_each_parse_error_is_logged_and_the_connection_keeps_storing(stack, broker, publisher):
    cid = stack.sql.add_site("eta", port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    [child] = monitor_children(stack)
    for payload, _ in PARSE_CASES:
        publisher.publish("sites/eta/GW-01/DL-07", payload)
    publisher.publish("sites/eta/GW-01/DL-07", reading(**{"S-1": {"t": 1}}))
    rows = wait_for(lambda: (r := stack.sql.rows("SELECT * FROM mqtt_parsing_log ORDER BY id"))
                    and len(r) == len(PARSE_CASES) and r, what="parsing log rows")
    assert [r["error_type"] for r in rows] == [t for _, t in PARSE_CASES]
    assert all(r["topic"] == "sites/eta/GW-01/DL-07" and r["parser_name"] == "json" for r in rows)
    assert rows[0]["payload_sample"]["sample"].endswith("binary junk")
    assert "S-1.t" in rows[3]["error_message"]
    assert rows[0]["exception_traceback"] == ""  # no traceback where there was no exception to show
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 1, what="the good reading")
    assert alive(child) and stack.sql.status(cid) == "connected"
    parsing_log = stack.log_dir / "mqtt_parsing.log"
    wait_for(lambda: parsing_log.exists() and parsing_log.read_text().count("[VALIDATION_ERROR]") == 2,
             what="the parsing file log")


def test_unknown_parser_error_is_recorded_not_crashing(stack, broker, publisher):
    cid = stack.sql.add_site("theta", port=broker.port, parser_name="no-such-parser")
    stack.start("logger", "monitor")
    row = stack.sql.wait_status(cid, "error")
    assert "unknown parser 'no-such-parser'" in row["error_message"]
    # The monitor carries on with the others.
    other = stack.sql.add_site("iota", port=broker.port)
    stack.sql.wait_status(other, "connected")
    # Fixing the row starts it.
    stack.sql.rows("UPDATE mqtt_connection SET parser_name = 'json' WHERE id = %s", cid)
    stack.sql.wait_status(cid, "connected")


# --- file logs ----------------------------------------------------------------

def test_connection_file_log_gets_the_lines_the_db_log_gets(stack, broker):
    cid = stack.sql.add_site("kappa", port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
    stack.sql.wait_status(cid, "disconnected")
    path = stack.log_dir / "mqtt_connections.log"

    def all_there():
        text = path.read_text()
        rows = stack.sql.rows("SELECT level, message FROM mqtt_connection_log WHERE connection_id = %s", cid)
        return rows and all(any(r["level"] in line and r["message"] in line for line in text.splitlines())
                            for r in rows)
    wait_for(all_there, what="every DB log row in mqtt_connections.log")


def test_a_monitor_cycle_says_where_its_time_went(stack, broker):
    """On the feed and in the monitor's log: a slow cycle names the part that was slow."""
    cid = stack.sql.add_site("lambda", port=broker.port)
    stack.start("logger")
    feed = stack.feed("monitor_cycle")
    stack.start("monitor")
    _, body = feed.wait_for(lambda t, b: b["started"] == 1, what="the cycle that started the child")
    parts = body["parts"]
    assert list(parts) == ["read", "reconcile", "renew", "balance", "claim", "start", "fence", "offline"]
    assert all(seconds >= 0 for seconds in parts.values())
    assert sum(parts.values()) <= body["duration"] + 1e-6
    stack.sql.wait_status(cid, "connected")
    wait_for(lambda: any(" cycle: " in line and " started" in line and "(ms: " in line and "read " in line
                         for line in stack.output("monitor").splitlines()),
             what="the cycle's parts in the monitor's log")
    # Once nothing changes, a cycle reads no row again: it says so.
    wait_for(lambda: re.search(r" cycle: 1 running, .* 0 of 1 rows read, ", stack.output("monitor")),
             what="a cycle that read no row, the connection unchanged")


# --- giving up ----------------------------------------------------------------

def test_gives_up_after_max_retries_and_waits_for_the_cool_down(stack):
    cid = stack.sql.add_site("lambda", port=free_port())
    stack.start("logger", "monitor", SITELINK_MAX_RETRIES="3", SITELINK_RETRY_COOLDOWN="3")
    row = wait_for(lambda: stack.sql.one(
        "SELECT *, extract(epoch FROM mqtt_next_retry - now()) AS wait FROM mqtt_connection "
        "WHERE id = %s AND mqtt_retry_count = 3 AND status = 'error'", cid), what="the give-up")
    assert "giving up" in row["error_message"] and row["wait"] > 1
    gave_up_at = time.monotonic()
    wait_for(lambda: not [p for p in monitor_children(stack)], what="the child to exit")
    # During the cool-down: no child, no new attempt.
    attempts = stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE connection_id = %s "
                               "AND level = 'ERROR'", cid)
    while time.monotonic() - gave_up_at < 1.5:
        assert not monitor_children(stack)
        time.sleep(0.1)
    assert stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE connection_id = %s "
                           "AND level = 'ERROR'", cid) == attempts
    # After it: a new start.
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE connection_id = %s "
                                     "AND level = 'ERROR'", cid) > attempts, timeout=15,
             what="a new attempt after the cool-down")


# --- process lifecycle ---------------------------------------------------------

def test_sigkill_of_the_monitor_leaves_no_child_behind(stack, broker):
    ids = [stack.sql.add_site(f"mu-{i}", port=broker.port) for i in range(3)]
    stack.start("logger", "monitor")
    for cid in ids:
        stack.sql.wait_status(cid, "connected")
    children = wait_for(lambda: len(c := monitor_children(stack)) == 3 and c, what="3 children")
    stack.stop("monitor", signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=10, what="the children to die")


def test_sigterm_stops_every_child_and_the_monitor(stack, broker):
    ids = [stack.sql.add_site(f"nu-{i}", port=broker.port) for i in range(3)]
    stack.start("logger", "monitor")
    for cid in ids:
        stack.sql.wait_status(cid, "connected")
    children = monitor_children(stack)
    assert stack.stop("monitor", signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in children)
    for cid in ids:
        stack.sql.wait_status(cid, "disconnected")


def test_crashed_child_is_restarted(stack, broker):
    cid = stack.sql.add_site("xi", port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    [child] = monitor_children(stack)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: stack.sql.one("SELECT 1 FROM mqtt_connection_log WHERE connection_id = %s "
                                   "AND message LIKE '%%crashed (killed by signal SIGKILL)%%'", cid),
             what="the crash in the log")
    wait_for(lambda: (c := monitor_children(stack)) and c != [child], what="a new child")
    stack.sql.wait_status(cid, "connected")


# --- secrets ---------------------------------------------------------------------

def test_password_appears_nowhere(stack, broker, publisher):
    secret = "pw-Zq8-never-shown"
    cid = stack.sql.add_site("omicron", port=broker.port, username="gw", password=secret)
    bad = stack.sql.add_site("pi", port=free_port(), username="gw", password=secret)
    stack.start("logger", "monitor")
    feed = joined_feed(stack)
    stack.sql.wait_status(cid, "connected")
    stack.sql.wait_status(bad, "error")
    publisher.publish("sites/omicron/x", b"{broken")
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_parsing_log") == 1, what="a parse error")
    for pid in monitor_children(stack) + [stack.pid("monitor")]:
        assert secret not in cmdline(pid)
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        assert secret not in environ
    stack.sql.rows("UPDATE mqtt_connection SET password = 'other' WHERE id = %s", cid)  # restart: logs change
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE connection_id = %s "
                                     "AND message LIKE 'stopping%%'", cid), what="the restart")
    stack.sql.wait_status(cid, "connected")
    for table in ("mqtt_connection_log", "mqtt_parsing_log"):
        assert not stack.sql.rows(f"SELECT 1 FROM {table} t WHERE t::text LIKE %s", f"%{secret}%")
    for path in stack.tmp.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path
    assert feed.poll() and not any(secret in json.dumps(body) for _, body in feed.messages)


# --- PostgreSQL outage -------------------------------------------------------------

def test_logger_keeps_events_while_postgres_is_down(own_postgres, broker, publisher):
    """Stop PostgreSQL under a running pipeline: nothing published meanwhile is lost."""
    server, stack = own_postgres
    cid = stack.sql.add_site("rho", port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    stack.sql.close()
    server.stop()
    for minute in range(10):
        publisher.publish("sites/rho/GW-01/DL-07",
                          reading(ts=f"2026-11-28T10:{minute:02d}:00Z", **{"S-1": {"t": minute}}))
    wait_for(lambda: "cannot write to PostgreSQL" in stack.output("logger"), what="the logger to notice")
    server.start()
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 10, timeout=40,
             what="all 10 readings after PostgreSQL is back")
    assert stack.sql.status(cid) == "connected"


def test_changed_broker_settings_restart_only_that_child(stack, broker, publisher):
    changed = stack.sql.add_site("sigma", port=broker.port, topics=["old/sigma/#"])
    other = stack.sql.add_site("tau", port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(changed, "connected")
    stack.sql.wait_status(other, "connected")
    before = set(wait_for(lambda: len(c := monitor_children(stack)) == 2 and c, what="2 children"))
    stack.sql.rows("UPDATE mqtt_connection SET topics = ARRAY['new/sigma/#'] WHERE id = %s", changed)
    after = set(wait_for(lambda: len(c := set(monitor_children(stack))) == 2 and c != before and c,
                         what="a new child for the changed connection"))
    assert len(before & after) == 1  # the other connection kept its process
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE connection_id = %s "
                                     "AND message LIKE 'Successfully connected%%'", changed) == 2,
             what="the new child connected")
    publisher.publish("new/sigma/GW-9", reading(gateway="GW-9", **{"S-1": {"t": 1}}))
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM gateway WHERE name = 'GW-9'") == 1,
             what="a reading on the new topic")


def test_make_status_shows_a_paused_connection_and_when_data_last_came(database_url, tmp_path):
    sql = SQL(database_url)
    try:
        cid = sql.add_site("status-site", port=1883)
        sql.rows("UPDATE mqtt_connection SET status = 'connected', paused_since = now() WHERE id = %s", cid)
        sql.rows("INSERT INTO gateway (site_id, name, last_seen_at) SELECT site_id, 'GW', '2026-11-28T10:00:00Z' "
                 "FROM mqtt_connection WHERE id = %s", cid)
    finally:
        sql.close()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SITELINK_")},
           "SITELINK_DATABASE_URL": database_url, "TZ": "UTC"}
    out = subprocess.run([sys.executable, "-m", "services.admin", "status"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    [line] = [l for l in out.splitlines() if l.startswith("status-site")]
    assert "connected, paused since" in line and "2026-11-28 10:00:00" in line
    assert "last data" in out.splitlines()[0]


def test_ps_shows_each_process_as_what_it_is(stack, broker):
    """ps -ef and top show each child as its connection and site, and the
    monitor, the zygote and the logger likewise; a hostile site name is escaped."""
    cid = stack.sql.add_site("north-pier", port=broker.port)
    odd = stack.sql.add_site("x\n\x1b[31mred", port=broker.port, client_id=f"odd-{os.getpid()}",
                             topics=["sites/odd/#"])
    stack.start("logger", "monitor", SITELINK_INSTANCE_ID="host-a")
    for c in (cid, odd):
        stack.sql.wait_status(c, "connected")
    titles = {pid: cmdline(pid).strip() for pid in children_of(stack.pid("monitor"))}
    assert f"sitelink: conn {cid} north-pier" in titles.values()
    assert f"sitelink: conn {odd} x\\n\\x1b[31mred" in titles.values()
    assert "sitelink: zygote of monitor host-a" in titles.values()
    assert cmdline(stack.pid("monitor")).strip() == "sitelink: monitor host-a"
    assert cmdline(stack.pid("logger")).strip() == "sitelink: logger"
    assert comm(stack.pid("monitor")) == "sitelink-mon" and comm(stack.pid("logger")) == "sitelink-logger"
    assert {comm(p) for p in titles} == {"sitelink-zygote", f"sitelink-c{cid}", f"sitelink-c{odd}"}
