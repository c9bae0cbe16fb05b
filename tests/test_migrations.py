"""Migrations: applied once, in order, safely in parallel; services refuse a database behind."""

import re
import threading

import psycopg
import pytest

from shared import db
from tests.support import python_service


def fresh_database(pg_server, name):
    pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg_server.execute(f"CREATE DATABASE {name}")
    return pg_server.url(name)


def test_migrate_twice_at_once_applies_each_migration_once(pg_server):
    url = fresh_database(pg_server, "sitelink_migrate_race")
    results, errors = [], []

    def run():
        database = db.Database(url, "test-migrate")
        try:
            results.append(db.migrate(database))
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            database.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(len(r) for r in results) == [0, 0, 0, len(db.migrations())]
    with psycopg.connect(url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM sitelink_migration ORDER BY 1")]
    assert versions == [m.version for m in db.migrations()]
    db.check_schema(db.Database(url, "test-check"))
    pg_server.execute("DROP DATABASE sitelink_migrate_race WITH (FORCE)")


def test_services_refuse_a_database_that_is_behind(pg_server, tmp_path):
    url = fresh_database(pg_server, "sitelink_behind")
    env = {"PATH": "/usr/bin:/bin", "SITELINK_DATABASE_URL": url, "SITELINK_HOME": str(tmp_path),
           "SITELINK_EVENTS_ENDPOINT": "tcp://127.0.0.1:1", "SITELINK_STATUS_FEED": "tcp://127.0.0.1:1"}
    for name in ("logger", "monitor"):
        proc = python_service(name, env, tmp_path / f"{name}.out")
        assert proc.wait(30) == 78
        assert "make migrate" in (tmp_path / f"{name}.out").read_text()
    pg_server.execute("DROP DATABASE sitelink_behind WITH (FORCE)")


IMPOSSIBLE_ROWS = [
    # (columns of a new row, the constraint psql names in its error)
    ({"broker_port": 70000}, "mqtt_connection_broker_port_check"),
    ({"status": "sleepy"}, "mqtt_connection_status_check"),
    ({"qos": 3}, "mqtt_connection_qos_check"),
    ({"keepalive": 1}, "mqtt_connection_keepalive_check"),
    ({"broker_host": "tcp://broker.example.net"}, "mqtt_connection_broker_host_is_a_host_name_or_ip"),
    ({"broker_host": "broker.example.net:1883"}, "mqtt_connection_broker_host_is_a_host_name_or_ip"),
    ({"broker_host": "broker example"}, "mqtt_connection_broker_host_is_a_host_name_or_ip"),
    ({"broker_host": "[::1]"}, "mqtt_connection_broker_host_is_a_host_name_or_ip"),
    ({"username": "u" * 65536}, "mqtt_connection_username_at_most_65535_bytes"),
    ({"username": "gw\n"}, "mqtt_connection_username_is_mqtt_text"),
    ({"username": "gw", "password": "p" * 100_000}, "mqtt_connection_password_at_most_65535_bytes"),
    ({"password": "secret"}, "mqtt_connection_password_needs_username"),
    ({"client_id": "c" * 129}, "mqtt_connection_client_id_check"),
    ({"client_id": "id\x07"}, "mqtt_connection_client_id_is_mqtt_text"),
    ({"client_id": "id\ufffe"}, "mqtt_connection_client_id_is_mqtt_text"),
    ({"topics": []}, "mqtt_connection_topics_1_to_256_filters"),
    ({"topics": [f"t/{i}" for i in range(257)]}, "mqtt_connection_topics_1_to_256_filters"),
    ({"topics": [f"{i:03d}/" + "x" * 400 for i in range(200)]}, "mqtt_connection_topics_at_most_65536_bytes"),
    ({"topics": ["x" * 65536]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["a/" * 200 + "b"]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["a/#/b"]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["a#"]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["+a"]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["a/+b"]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["#/x"]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["ok/#", ""]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["a/\tb"]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["a/b", "a/b"]}, "mqtt_connection_topics_without_duplicates"),
    ({"use_tls": True, "tls_ca_path": "ca.pem"}, "mqtt_connection_tls_ca_path_absolute"),
    ({"use_tls": True, "tls_ca_path": "/" + "a" * 4096}, "mqtt_connection_tls_ca_path_at_most_4096_bytes"),
    ({"tls_ca_path": "/etc/ssl/certs/ca-certificates.crt"}, "mqtt_connection_tls_ca_path_needs_use_tls"),
    ({"parser_name": "p" * 65}, "mqtt_connection_parser_name_at_most_64_chars"),
]


def test_constraints_reject_impossible_rows_by_a_name_that_says_why(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('x') RETURNING id").fetchone()[0]
        for columns, constraint in IMPOSSIBLE_ROWS:
            cols = {"site_id": site, "broker_host": "broker.example.net", **columns}
            try:
                conn.execute(f"INSERT INTO mqtt_connection ({', '.join(cols)}) "
                             f"VALUES ({', '.join(['%s'] * len(cols))})", list(cols.values()))
            except psycopg.errors.CheckViolation as exc:
                assert exc.diag.constraint_name == constraint, (columns, exc.diag.constraint_name)
                assert f'violates check constraint "{constraint}"' in str(exc)
                continue
            raise AssertionError(f"{columns} was accepted")


#: A new value for each column of a connection's configuration (and is_active).
CONFIG_CHANGES = {
    "broker_host": "other.example.net", "broker_port": 1884, "username": "gw", "client_id": "another-id",
    "keepalive": 30, "use_tls": True, "topics": ["other/#"], "qos": 0, "parser_name": "other",
    "stall_after": 600, "ping_timeout": 20, "mqtt_protocol": "5", "clean_session": True, "is_active": False,
}


def _trigger_columns(conn, trigger: str) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_trigger t JOIN pg_attribute a ON a.attrelid = t.tgrelid "
        "AND a.attnum = ANY (t.tgattr::int2[]) WHERE t.tgname = %s", (trigger,))}


def test_the_configuration_triggers_watch_every_column_of_the_configuration(database_url):
    """The triggers that reset a connection's retry and wake the monitors fire
    only for an UPDATE that names a configuration column (their WHEN alone cost
    a status update 2.5 ms): their column lists must be the configuration's."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        body = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'mqtt_connection_config'").fetchone()[0]
        config = set(re.findall(r"\bc\.(\w+)", body))
        assert {"broker_host", "password", "topics", "clean_session"} <= config
        for trigger in ("mqtt_connection_reset_retry", "mqtt_connection_notify_update"):
            assert _trigger_columns(conn, trigger) == config | {"is_active"}, trigger
        assert _trigger_columns(conn, "mqtt_connection_rules") == config | {"config_predates_checks"}
        assert _trigger_columns(conn, "mqtt_connection_config_hash") == config | {"config_hash"}


def test_the_monitor_s_change_marker_watches_every_column_its_read_takes(database_url):
    """The monitor reads only the rows whose monitor_change moved since its
    previous read (migration 0012): a column its read takes from the row that
    the trigger does not watch would change unseen."""
    read = set(re.findall(r"\bc\.(\w+)", db.QUERIES["monitor_read"]))
    assert {"status", "is_active", "config_hash", "claim_owner", "mqtt_next_retry"} <= read
    with psycopg.connect(database_url, autocommit=True) as conn:
        body = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'mqtt_connection_config'").fetchone()[0]
        config = set(re.findall(r"\bc\.(\w+)", body))
        watched = _trigger_columns(conn, "mqtt_connection_watch_update")
        assert read <= watched and config <= watched  # the configuration changes the hash
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'mqtt_connection_watch_%%' "
                            "AND tgenabled = 'A'").fetchone()[0] == 2  # replica-mode writes too


def test_the_stored_configuration_hash_is_the_configuration_s_whoever_writes_it(database_url):
    """The monitor compares the row's config_hash every cycle: it must change with
    any change of the configuration, and only then, and cannot be written by hand."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('x') RETURNING id").fetchone()[0]
        cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host) VALUES (%s, 'h') RETURNING id",
                           (site,)).fetchone()[0]

        def stored_and_computed() -> tuple[str, str]:
            return conn.execute("SELECT config_hash, md5(mqtt_connection_config(c)) FROM mqtt_connection c "
                                "WHERE id = %s", (cid,)).fetchone()
        first, computed = stored_and_computed()
        assert first == computed
        conn.execute("UPDATE mqtt_connection SET status = 'connected', is_active = false WHERE id = %s", (cid,))
        assert stored_and_computed() == (first, first)
        conn.execute("UPDATE mqtt_connection SET config_hash = 'forged' WHERE id = %s", (cid,))
        assert stored_and_computed() == (first, first)
        with conn.transaction():  # as logical replication writes: ordinary triggers skipped
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("UPDATE mqtt_connection SET keepalive = 45 WHERE id = %s", (cid,))
        stored, computed = stored_and_computed()
        assert stored == computed != first
        for column, value in CONFIG_CHANGES.items():
            if column == "is_active":
                continue
            before = stored_and_computed()[0]
            conn.execute(f"UPDATE mqtt_connection SET {column} = %s WHERE id = %s", (value, cid))
            stored, computed = stored_and_computed()
            assert stored == computed != before, column


#: Rules the trigger checks (as CHECK constraints they cost every status update
#: and claim renewal): a change that breaks each, on a row that follows them all.
TRIGGER_RULES = [
    ({"broker_port": 0}, "mqtt_connection_broker_port_check"),
    ({"keepalive": 4000}, "mqtt_connection_keepalive_check"),
    ({"password": "secret"}, "mqtt_connection_password_needs_username"),
    ({"topics": ["a/b", None]}, "mqtt_connection_topics_check"),
    ({"broker_host": "tcp://broker.example.net"}, "mqtt_connection_broker_host_is_a_host_name_or_ip"),
    ({"client_id": "id\x07"}, "mqtt_connection_client_id_is_mqtt_text"),
    ({"topics": ["a/#/b"]}, "mqtt_connection_topic_filters_valid"),
    ({"topics": ["a/b", "a/b"]}, "mqtt_connection_topics_without_duplicates"),
    ({"username": "gw\n"}, "mqtt_connection_username_is_mqtt_text"),
]


def test_an_update_that_breaks_a_rule_is_refused_by_its_name_and_a_status_update_passes(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('x') RETURNING id").fetchone()[0]
        cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host) VALUES (%s, 'h') RETURNING id",
                           (site,)).fetchone()[0]
        for columns, constraint in TRIGGER_RULES:
            sets = ", ".join(f"{c} = %s" for c in columns)
            try:
                conn.execute(f"UPDATE mqtt_connection SET {sets} WHERE id = %s", [*columns.values(), cid])
            except psycopg.errors.CheckViolation as exc:
                assert exc.diag.constraint_name == constraint, (columns, exc.diag.constraint_name)
                assert exc.diag.message_primary == (f'new row for relation "mqtt_connection" violates check '
                                                    f'constraint "{constraint}"')
                continue
            raise AssertionError(f"{columns} was accepted")
        conn.execute("UPDATE mqtt_connection SET status = 'connected', status_changed_at = now() WHERE id = %s",
                     (cid,))


#: The CHECK constraints left on mqtt_connection: the rules on what a status
#: update or a claim writes. PostgreSQL prepares every CHECK of a table for
#: each UPDATE statement, whatever it sets; the configuration's rules run in
#: mqtt_connection_rules, only when the configuration changes (migration 0011).
STATUS_CHECKS = {"mqtt_connection_status_check", "mqtt_connection_connection_errors_check",
                 "mqtt_connection_mqtt_retry_count_check", "mqtt_connection_claim_epoch_check"}


def test_a_status_update_prepares_no_rule_of_the_configuration(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        checks = {r[0] for r in conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'mqtt_connection'::regclass AND contype = 'c'")}
    assert checks == STATUS_CHECKS


def test_the_rules_hold_for_writes_in_replica_mode(database_url):
    """A CHECK constraint held for writes that skip ordinary triggers (logical
    replication, some restores): the rules that replaced them hold there too."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('x') RETURNING id").fetchone()[0]
        cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host) VALUES (%s, 'h') RETURNING id",
                           (site,)).fetchone()[0]
        for columns, constraint in [({"keepalive": 1}, "mqtt_connection_keepalive_check"),
                                    ({"topics": ["a/#/b"]}, "mqtt_connection_topic_filters_valid")]:
            sets = ", ".join(f"{c} = %s" for c in columns)
            with pytest.raises(psycopg.errors.CheckViolation) as refused, conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")
                conn.execute(f"UPDATE mqtt_connection SET {sets} WHERE id = %s", [*columns.values(), cid])
            assert refused.value.diag.constraint_name == constraint


def test_an_old_row_that_breaks_a_rule_takes_status_updates_but_no_other_change(pg_server):
    """A row written before the rules (migration 0004 marks it) stays exempt
    while only its status changes; any change of its configuration ends the
    exemption, and the row must then follow every rule, those of the trigger too."""
    url = fresh_database(pg_server, "sitelink_old_rule_breaker")
    database = db.Database(url, "test-migrate")
    try:
        db.migrate(database, upto=3)
        with psycopg.connect(url, autocommit=True) as conn:
            site = conn.execute("INSERT INTO site (name) VALUES ('x') RETURNING id").fetchone()[0]
            cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host, topics) "
                               "VALUES (%s, 'h', ARRAY['a/#/b']) RETURNING id", (site,)).fetchone()[0]
        db.migrate(database)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE mqtt_connection SET status = 'error', error_message = 'cannot start' "
                         "WHERE id = %s", (cid,))
            assert conn.execute("SELECT config_predates_checks FROM mqtt_connection").fetchone()[0] is True
            with pytest.raises(psycopg.errors.CheckViolation) as refused:
                conn.execute("UPDATE mqtt_connection SET keepalive = 30 WHERE id = %s", (cid,))
            assert refused.value.diag.constraint_name == "mqtt_connection_topic_filters_valid"
            conn.execute("UPDATE mqtt_connection SET topics = ARRAY['a/#'] WHERE id = %s", (cid,))
            assert conn.execute("SELECT config_predates_checks FROM mqtt_connection").fetchone()[0] is False
    finally:
        database.close()
        pg_server.execute("DROP DATABASE sitelink_old_rule_breaker WITH (FORCE)")


def test_a_change_of_configuration_resets_the_retry_and_wakes_the_monitor_but_a_status_does_neither(
        database_url):
    with psycopg.connect(database_url, autocommit=True) as conn, \
            psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN sitelink_mqtt_connection")
        sites = [r[0] for r in conn.execute("INSERT INTO site (name) VALUES ('x'), ('y') RETURNING id")]
        cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host) VALUES (%s, 'h') RETURNING id",
                           (sites[0],)).fetchone()[0]
        cooling = ("UPDATE mqtt_connection SET mqtt_retry_count = 3, "
                   "mqtt_next_retry = now() + interval '1 hour' WHERE id = %s")

        def notified() -> list[str]:
            """What was notified since the last call: up to a marker sent now
            (notifications of one session arrive in the order of its commits)."""
            conn.execute("SELECT pg_notify('sitelink_mqtt_connection', 'marker')")
            payloads = []
            for n in listener.notifies(timeout=10):
                if n.payload == "marker":
                    return payloads
                payloads.append(n.payload)
            raise AssertionError(f"no marker; got {payloads}")
        notified()  # the INSERT's
        changes = {**CONFIG_CHANGES, "site_id": sites[1], "password": "secret", "tls_ca_path": "/etc/ssl/ca.pem"}
        for column, value in changes.items():
            conn.execute(cooling, (cid,))
            conn.execute(f"UPDATE mqtt_connection SET {column} = %s WHERE id = %s", (value, cid))
            row = conn.execute("SELECT mqtt_retry_count, mqtt_next_retry FROM mqtt_connection WHERE id = %s",
                               (cid,)).fetchone()
            assert row == (0, None), column
            assert notified() == [f"update:{cid}"], column
        conn.execute(cooling, (cid,))
        conn.execute("UPDATE mqtt_connection SET status = 'connected', status_changed_at = now(), "
                     "error_message = '', connection_errors = 0, broker_host = broker_host WHERE id = %s", (cid,))
        assert conn.execute("SELECT mqtt_retry_count FROM mqtt_connection WHERE id = %s", (cid,)).fetchone()[0] == 3
        assert notified() == []


def test_no_one_marks_a_row_exempt_from_the_rules(database_url):
    """Only migration 0004 marks the rows it found breaking a rule."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('x') RETURNING id").fetchone()[0]
        cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host, config_predates_checks) "
                           "VALUES (%s, 'h', true) RETURNING id", (site,)).fetchone()[0]
        assert conn.execute("SELECT config_predates_checks FROM mqtt_connection").fetchone()[0] is False
        try:
            conn.execute("UPDATE mqtt_connection SET config_predates_checks = true, password = 'p' WHERE id = %s",
                         (cid,))
        except psycopg.errors.CheckViolation as exc:
            assert exc.diag.constraint_name == "mqtt_connection_password_needs_username"
        else:
            raise AssertionError("a row marked itself exempt")


def test_an_existing_reading_table_becomes_partitioned_without_losing_a_row(pg_server):
    """Migration 0009 on an installation with readings: every row stays, the natural
    key and the cascade from sensor still hold, and weeks ahead have partitions."""
    url = fresh_database(pg_server, "sitelink_partition_upgrade")
    database = db.Database(url, "test-migrate")
    db.migrate(database, upto=8)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO site (name) VALUES ('s')")
        conn.execute("INSERT INTO gateway (site_id, name) SELECT id, 'g' FROM site")
        conn.execute("INSERT INTO sensor (gateway_id, name) "
                     "SELECT g.id, 'S-' || i FROM gateway g, generate_series(1, 5) i")
        # three years back to a day ahead (the parser's limit), one an hour per sensor
        conn.execute("INSERT INTO reading (sensor_id, ts, \"values\") SELECT s.id, "
                     "now() + interval '1 day' - make_interval(hours => k), jsonb_build_object('k', k) "
                     "FROM sensor s, generate_series(0, 3 * 365 * 24) k")
        before = conn.execute("SELECT sensor_id, ts, \"values\", received_at FROM reading ORDER BY 1, 2").fetchall()
    db.migrate(database)
    database.close()
    with psycopg.connect(url, autocommit=True) as conn:
        after = conn.execute("SELECT sensor_id, ts, \"values\", received_at FROM reading ORDER BY 1, 2").fetchall()
        assert after == before
        assert conn.execute("SELECT relkind FROM pg_class WHERE relname = 'reading'").fetchone()[0] == "p"
        parts = conn.execute("SELECT partition, from_ts, to_ts FROM reading_partitions WHERE NOT is_default").fetchall()
        [(legacy, start, end)] = [p for p in parts if p[1] is None]
        assert legacy.startswith("reading_before_") and end > max(r[1] for r in before)
        assert conn.execute(f"SELECT count(*) FROM {legacy}").fetchone()[0] == len(before)
        assert max(p[2] for p in parts) >= conn.execute("SELECT now() + interval '28 days'").fetchone()[0]
        first = before[0]
        assert conn.execute("INSERT INTO reading (sensor_id, ts, \"values\") VALUES (%s, %s, '{}') "
                            "ON CONFLICT (sensor_id, ts) DO NOTHING", first[:2]).rowcount == 0
        conn.execute("DELETE FROM sensor WHERE id = %s", (first[0],))
        assert conn.execute("SELECT count(*) FROM reading").fetchone()[0] == len(before) * 4 // 5
    pg_server.execute("DROP DATABASE sitelink_partition_upgrade WITH (FORCE)")
