"""Migrations: applied once, in order, safely in parallel; services refuse a database behind."""

import threading

import psycopg

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


def test_constraints_reject_impossible_rows(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('x') RETURNING id").fetchone()[0]
        for column, value in [("broker_port", 70000), ("status", "sleepy"), ("qos", 3)]:
            try:
                conn.execute(f"INSERT INTO mqtt_connection (site_id, broker_host, {column}) "
                             f"VALUES (%s, 'h', %s)", (site, value))
            except psycopg.errors.CheckViolation:
                continue
            raise AssertionError(f"{column}={value!r} was accepted")
