"""Connections that heal themselves, against real brokers the tests configure,
stop, freeze and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest

from tests.support import (Mosquitto, Publisher, alive, client_id_takeovers, connection_children, joined_feed,
                           monitor_children, python_service, reading, remove_tree, stop_process, wait_for,
                           world_traversable_tmpdir)


@pytest.fixture
def own_broker():
    """A broker of this test alone, to stop, freeze or reconfigure."""
    made: list[Mosquitto] = []
    bases: list[Path] = []

    def make(listener_conf: list[str] | None = None) -> Mosquitto:
        base = world_traversable_tmpdir("sitelink-test-own-mqtt-")
        bases.append(base)
        broker = Mosquitto(base, listener_conf)
        broker.start()
        made.append(broker)
        return broker
    yield make
    for broker in made:
        broker.stop()
    for base in bases:
        remove_tree(base)


def log_rows(stack, cid: int, like: str) -> list[dict]:
    return stack.sql.rows("SELECT * FROM mqtt_connection_log WHERE connection_id = %s AND message LIKE %s "
                          "ORDER BY id", cid, like)


# --- 1. reaction under a second -------------------------------------------------------

def test_activation_takes_effect_at_once_with_a_30s_interval(stack, broker):
    cid = stack.sql.add_site("act", port=broker.port, active=False)
    other = stack.sql.add_site("act-other", port=broker.port)
    stack.start("logger", "monitor", SITELINK_MONITOR_INTERVAL="30")
    stack.sql.wait_status(other, "connected")
    [other_child] = monitor_children(stack)
    stack.sql.rows("UPDATE mqtt_connection SET is_active = true WHERE id = %s", cid)
    # Far sooner than the 30 s poll could: the NOTIFY woke the monitor.
    stack.sql.wait_status(cid, "connected", timeout=10)
    assert other_child in monitor_children(stack)  # the other connection was not touched


def test_a_dropped_listen_connection_is_re_established(stack, broker):
    cid = stack.sql.add_site("relisten", port=broker.port, active=False)
    stack.start("logger", "monitor", SITELINK_MONITOR_INTERVAL="30")
    listening = "SELECT pid FROM pg_stat_activity WHERE application_name = 'sitelink-monitor-listen'"
    [first] = wait_for(lambda: stack.sql.rows(listening), what="the monitor to LISTEN")
    stack.sql.rows("SELECT pg_terminate_backend(%s)", first["pid"])
    wait_for(lambda: (r := stack.sql.rows(listening)) and r[0]["pid"] != first["pid"],
             what="a new LISTEN connection")
    stack.sql.rows("UPDATE mqtt_connection SET is_active = true WHERE id = %s", cid)
    stack.sql.wait_status(cid, "connected", timeout=10)


def test_the_log_names_changed_settings_but_never_the_password(stack, broker):
    cid = stack.sql.add_site("changes", port=broker.port, username="u", password="old-secret-1")
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    stack.sql.rows("UPDATE mqtt_connection SET password = 'new-secret-2', keepalive = 20 WHERE id = %s", cid)
    [row] = wait_for(lambda: log_rows(stack, cid, "settings changed%"), what="the change in the log")
    assert row["message"] == "settings changed: password, keepalive"
    wait_for(lambda: len(log_rows(stack, cid, "Successfully connected%")) == 2, what="the reconnect")
    assert not stack.sql.rows("SELECT 1 FROM mqtt_connection_log WHERE message LIKE '%%secret%%'")


# --- 2. silent stalls and dead paths --------------------------------------------------

def test_a_frozen_broker_is_noticed_within_keepalive_and_a_half(stack, own_broker):
    mqtt_broker = own_broker()
    cid = stack.sql.add_site("frozen", port=mqtt_broker.port, keepalive=5, stall_after=None)
    stack.start("logger", "monitor", SITELINK_CONNECT_TIMEOUT="2")
    stack.sql.wait_status(cid, "connected")
    frozen_at = time.monotonic()
    mqtt_broker.freeze()
    row = wait_for(lambda: stack.sql.one("SELECT * FROM mqtt_connection WHERE id = %s AND "
                                         "status <> 'connected'", cid), timeout=20,
                   what="the dead path to be noticed")
    noticed = time.monotonic() - frozen_at
    [lost] = wait_for(lambda: log_rows(stack, cid, "Disconnected: no answer to a ping%"),
                      what="the reason in the log")
    assert lost["level"] == "WARNING"
    # keepalive 5 s + ping timeout 2.5 s, well before paho's own 2 x keepalive;
    # a loose bound, for a functional difference, not a speed measurement.
    assert noticed < 14, f"noticed after {noticed:.1f} s"
    mqtt_broker.thaw()
    wait_for(lambda: len(log_rows(stack, cid, "Successfully connected%")) == 2, timeout=20,
             what="the reconnect after the broker woke up")
    assert row["status"] in ("disconnected", "connecting", "error")


def test_a_silent_connection_is_reconnected_and_resubscribed(stack, broker):
    cid = stack.sql.add_site("silent", port=broker.port, stall_after=1)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    [warning] = wait_for(lambda: log_rows(stack, cid, "connected but received nothing for 1 s%"),
                         what="the stall warning")
    assert warning["level"] == "WARNING"
    wait_for(lambda: len(log_rows(stack, cid, "Successfully connected%")) >= 2, what="the reconnect")
    publisher = Publisher(broker.port)
    try:
        publisher.publish("sites/silent/GW-1", reading(gateway="GW-1", datalogger=None, **{"S-1": {"t": 1}}))
    finally:
        publisher.close()
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 1, what="data after the reconnect")


# --- 3. retry policy by failure type ---------------------------------------------------

@pytest.fixture
def password_broker(own_broker, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "gw", "right-password"], check=True)
    passwd.chmod(0o644)
    return own_broker(["allow_anonymous false", f"password_file {passwd}"])


def test_a_wrong_password_gives_up_with_the_reason_and_a_fix_connects_at_once(stack, password_broker):
    cid = stack.sql.add_site("auth", port=password_broker.port, username="gw", password="wrong-password")
    stack.start("logger", "monitor", SITELINK_MAX_RETRIES="50", SITELINK_MAX_REJECTIONS="3")
    row = wait_for(lambda: stack.sql.one("SELECT *, mqtt_next_retry > now() + interval '5 minutes' AS cooling "
                                         "FROM mqtt_connection WHERE id = %s AND error_message LIKE "
                                         "'%%giving up%%'", cid), what="the give-up")
    assert "check its username and password" in row["error_message"]
    assert row["mqtt_retry_count"] == 3 and row["cooling"]
    wait_for(lambda: not monitor_children(stack), what="the child to exit")
    assert len(log_rows(stack, cid, "Connecting%")) == 3  # no endless retry
    stack.sql.rows("UPDATE mqtt_connection SET password = 'right-password' WHERE id = %s", cid)
    row = stack.sql.wait_status(cid, "connected", timeout=10)  # not after the cool-down
    assert row["mqtt_retry_count"] == 0


# --- 4. no thundering herd ----------------------------------------------------------------

def test_reconnects_after_a_broker_restart_respect_the_attempt_rate(stack, own_broker):
    mqtt_broker = own_broker()
    ids = [stack.sql.add_site(f"herd-{i}", port=mqtt_broker.port, stall_after=None) for i in range(12)]
    stack.start("logger", "monitor", SITELINK_CONNECT_RATE="4", SITELINK_RETRY_BASE="0.1",
                SITELINK_RETRY_CAP="0.5", SITELINK_MAX_RETRIES="1000")
    for cid in ids:
        stack.sql.wait_status(cid, "connected", timeout=30)
    mqtt_broker.stop()
    for cid in ids:
        wait_for(lambda: stack.sql.status(cid) != "connected", what="every connection to notice")
    restart_mark = stack.sql.value("SELECT max(id) FROM mqtt_connection_log")
    mqtt_broker.start()
    for cid in ids:
        stack.sql.wait_status(cid, "connected", timeout=30)
    stamps = [r["timestamp"].timestamp() for r in stack.sql.rows(
        "SELECT timestamp FROM mqtt_connection_log WHERE id > %s AND message LIKE 'Connecting%%' "
        "ORDER BY timestamp", restart_mark)]
    # In any one second, at most 4 attempts (+1 for a window's edge).
    busiest = max(sum(1 for t in stamps if start <= t < start + 1.0) for start in stamps)
    assert busiest <= 5, f"{busiest} attempts within one second"


# --- 5. never two clients for one site -------------------------------------------------------

def test_two_monitors_on_one_database_share_the_connections_and_never_run_one_twice(stack, broker):
    ids = [stack.sql.add_site(f"twin-{i}", port=broker.port) for i in range(4)]
    client_ids = [r["client_id"] for r in stack.sql.rows("SELECT client_id FROM mqtt_connection")]
    stack.start("logger", "monitor", SITELINK_INSTANCE_ID="first")
    for cid in ids:
        stack.sql.wait_status(cid, "connected")
    env = {**stack.env, "SITELINK_INSTANCE_ID": "second"}
    second = python_service("monitor", env, stack.tmp / "second.out")
    try:
        # The second gets its share (two of four) by hand-over from the first.
        wait_for(lambda: len(connection_children(second.pid)) == 2 and len(monitor_children(stack)) == 2,
                 what="two connections each")
        for cid in ids:
            stack.sql.wait_status(cid, "connected")
        claims = Counter(r["claimed_by"] for r in stack.sql.rows("SELECT claimed_by FROM mqtt_connection"))
        assert claims == {"first": 2, "second": 2}
        # The first stops (releasing its claims): the second takes every connection over.
        assert stack.stop("monitor") == 0
        wait_for(lambda: len(connection_children(second.pid)) == 4,
                 what="the second monitor to take over")
        for cid in ids:
            wait_for(lambda: stack.sql.value("SELECT claimed_by FROM mqtt_connection WHERE id = %s", cid)
                     == "second", what="the claims to move")
            stack.sql.wait_status(cid, "connected")
        assert not client_id_takeovers(broker, client_ids), "two clients for one site at the broker"
    finally:
        stop_process(second)


def test_a_session_taken_over_by_another_client_is_logged_as_such(stack, broker):
    cid = stack.sql.add_site("taken", port=broker.port, mqtt_protocol="5")
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    client_id = stack.sql.value("SELECT client_id FROM mqtt_connection WHERE id = %s", cid)
    intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    intruder.connect("127.0.0.1", broker.port)
    intruder.loop_start()
    try:
        rows = wait_for(lambda: log_rows(stack, cid, "%took over the session%"), what="the take-over")
        assert rows[0]["level"] == "WARNING" and client_id in rows[0]["message"]
    finally:
        intruder.loop_stop()
        intruder.disconnect()


# --- 6. crash loops are visible -------------------------------------------------------------

def test_a_child_that_keeps_crashing_is_left_stopped_with_a_reason(stack, broker):
    cid = stack.sql.add_site("crashy", port=broker.port)
    stack.start("logger", "monitor", SITELINK_CRASH_LIMIT="2", SITELINK_RESTART_BASE="0.1",
                SITELINK_RESTART_CAP="0.3")
    killed: set[int] = set()

    def kill_each_new_child():
        for pid in monitor_children(stack):
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)  # like the OOM killer, right after start
                killed.add(pid)
        return len(killed) >= 3
    wait_for(kill_each_new_child, timeout=30, what="three crashes")
    row = stack.sql.wait_status(cid, "error")
    row = wait_for(lambda: stack.sql.one("SELECT * FROM mqtt_connection WHERE id = %s AND "
                                         "error_message LIKE '%%crashed 3 times%%'", cid),
                   what="the crash-loop status")
    assert "left stopped" in row["error_message"]
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # no flapping: nothing restarts it
        assert not [p for p in monitor_children(stack) if p not in killed]
        time.sleep(0.1)
    stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
    stack.sql.wait_status(cid, "disconnected")
    stack.sql.rows("UPDATE mqtt_connection SET is_active = true WHERE id = %s", cid)
    stack.sql.wait_status(cid, "connected")


# --- 7. every broker setting works --------------------------------------------------------------

def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


@pytest.fixture
def tls_broker(own_broker, tmp_path):
    ca_key, ca_cert = make_ca(tmp_path, "sitelink-test-ca")
    key, csr, cert = tmp_path / "server.key", tmp_path / "server.csr", tmp_path / "server.pem"
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
    ext = tmp_path / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)
    for path in tmp_path.iterdir():
        path.chmod(0o644)
    _, other_ca = make_ca(tmp_path, "some-other-ca")
    other_ca.chmod(0o644)
    broker = own_broker(["allow_anonymous true", f"cafile {ca_cert}", f"certfile {cert}", f"keyfile {key}"])
    return broker, ca_cert, other_ca


def test_tls_with_the_right_ca_connects_and_a_wrong_ca_gives_up(stack, tls_broker):
    broker, ca_cert, other_ca = tls_broker
    good = stack.sql.add_site("tls-good", host="localhost", port=broker.port, use_tls=True,
                              tls_ca_path=str(ca_cert))
    bad = stack.sql.add_site("tls-bad", host="localhost", port=broker.port, use_tls=True,
                             tls_ca_path=str(other_ca))
    stack.start("logger", "monitor", SITELINK_MAX_RETRIES="50", SITELINK_MAX_REJECTIONS="2")
    stack.sql.wait_status(good, "connected")
    row = wait_for(lambda: stack.sql.one("SELECT * FROM mqtt_connection WHERE id = %s AND error_message "
                                         "LIKE '%%giving up%%'", bad), what="the bad CA to give up")
    assert "TLS certificate verification failed" in row["error_message"]
    assert row["mqtt_retry_count"] == 2


def test_mqtt_5_connects_and_stores_data(stack, broker, publisher):
    cid = stack.sql.add_site("v5", port=broker.port, mqtt_protocol="5")
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    publisher.publish("sites/v5/GW-1", reading(gateway="GW-1", datalogger=None, **{"S-1": {"t": 5}}))
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 1, what="the reading")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_persistent_session_loses_no_qos1_message_across_a_reconnect(stack, broker, publisher, protocol):
    cid = stack.sql.add_site(f"persist-{protocol}", port=broker.port, mqtt_protocol=protocol)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    [child] = monitor_children(stack)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not alive(child), what="the child to die")
    for minute in range(5):  # published while nobody of ours is connected
        publisher.publish(f"sites/persist-{protocol}/GW-1",
                          reading(gateway="GW-1", datalogger=None, ts=f"2026-11-28T10:0{minute}:00Z",
                                  **{"S-1": {"t": minute}}))
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 5, timeout=20,
             what="the 5 readings after the restart")


# --- 8. "connected" means data can flow --------------------------------------------------------

def test_a_child_paused_by_backpressure_keeps_its_session_and_says_so(stack, own_broker):
    """The logger falls behind (its insert waits on a lock): the child stops
    reading, keeps its MQTT session alive with PINGREQs for longer than the
    broker's keepalive timeout, and says it is paused — in the connection log,
    the row and the feed — and that it flows again afterwards."""
    mqtt_broker = own_broker(["allow_anonymous true", "log_type all"])
    cid = stack.sql.add_site("paused", port=mqtt_broker.port, keepalive=5, stall_after=None)
    stack.start("logger", "monitor", SITELINK_MAX_UNACKED="20")
    stack.sql.wait_status(cid, "connected")
    client_id = stack.sql.value("SELECT client_id FROM mqtt_connection WHERE id = %s", cid)
    feed = joined_feed(stack)
    locker = psycopg.connect(stack.sql.url, autocommit=False)
    publisher = Publisher(mqtt_broker.port)
    try:
        locker.execute("LOCK TABLE reading IN EXCLUSIVE MODE")
        for n in range(100):
            publisher.publish("sites/paused/GW", reading(gateway="GW", datalogger=None, ts=1795860000 + n,
                                                        **{"S": {"n": n}}))
        wait_for(lambda: "paused: the logger has not stored" in stack.output("monitor"), timeout=30,
                 what="the child to say it is paused")
        log = mqtt_broker.log
        start = len(log.read_text(errors="replace"))
        # Four PINGREQs at keepalive / 2 apart: paused for longer than the
        # broker waits (1.5 x keepalive) before it drops a silent client.
        wait_for(lambda: log.read_text(errors="replace")[start:].count(f"Received PINGREQ from {client_id}") >= 4,
                 timeout=30, what="the paused child to keep pinging")
        assert "exceeded timeout" not in log.read_text(errors="replace")[start:]
    finally:
        locker.rollback()
        locker.close()
        publisher.close()
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 100, timeout=30, what="every reading")
    wait_for(lambda: log_rows(stack, cid, "reading from the broker again%"), what="the end of the pause logged")
    [paused] = log_rows(stack, cid, "paused: %")
    assert paused["level"] == "WARNING"
    assert len(log_rows(stack, cid, "Successfully connected%")) == 1  # the session was never lost
    feed.wait_for(lambda t, b: b["type"] == "mqtt_status" and b["paused"] is True, what="paused on the feed")
    feed.wait_for(lambda t, b: b["type"] == "mqtt_status" and b["paused"] is False
                  and b["status"] == "connected", what="flowing again on the feed")
    assert stack.sql.value("SELECT paused_since FROM mqtt_connection WHERE id = %s", cid) is None
