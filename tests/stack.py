"""The services of one test as real processes, and what a user does in psql:
the objects the fixtures of ``tests/conftest.py`` hand out, importable by
tests and benchmarks (fixtures live in conftest.py; helpers do not)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from tests.support import FeedSubscriber, Mosquitto, free_port, python_service, remove_tree, stop_process, wait_for


class SQL:
    """What a user does in psql, for assertions and set-up."""

    def __init__(self, url: str):
        self.url = url
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row)
        return self._conn

    def rows(self, query: str, *params) -> list[dict]:
        with self._connection().cursor() as cur:
            cur.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def one(self, query: str, *params) -> dict | None:
        found = self.rows(query, *params)
        return found[0] if found else None

    def value(self, query: str, *params):
        row = self.one(query, *params)
        return None if row is None else next(iter(row.values()))

    def add_site(self, name: str, *, host: str = "127.0.0.1", port: int, topics: list[str] | None = None,
                 active: bool = True, **columns) -> int:
        site_id = self.value("INSERT INTO site (name) VALUES (%s) RETURNING id", name)
        # Sessions are persistent: a client id unique to this test keeps one
        # test's session (and its subscriptions) away from the next test's.
        client_id = f"{conninfo_to_dict(self.url)['dbname']}-{name}"
        cols = {"site_id": site_id, "broker_host": host, "broker_port": port, "client_id": client_id,
                "topics": topics or [f"sites/{name}/#"], "is_active": active, "keepalive": 10, **columns}
        names = ", ".join(cols)
        marks = ", ".join(["%s"] * len(cols))
        return self.value(f"INSERT INTO mqtt_connection ({names}) VALUES ({marks}) RETURNING id",
                          *cols.values())

    def status(self, connection_id: int) -> str | None:
        return self.value("SELECT status FROM mqtt_connection WHERE id = %s", connection_id)

    def wait_status(self, connection_id: int, status: str, timeout: float = 15.0) -> dict:
        return wait_for(lambda: self.one("SELECT * FROM mqtt_connection WHERE id = %s AND status = %s",
                                         connection_id, status),
                        timeout, f"connection {connection_id} to be {status} "
                                 f"(it is {self.status(connection_id)})")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Stack:
    """The services of one test, as real processes, with short intervals."""

    def __init__(self, database_url: str, broker: Mosquitto, tmp_path: Path):
        self.tmp = tmp_path
        self.broker = broker
        self.sql = SQL(database_url)
        self.log_dir = tmp_path / "logs"
        # The default transport, an ipc socket in a private runtime directory
        # (short: a Unix socket's path has at most 107 bytes; tmp_path is long).
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="sl-"))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SITELINK_")},
            "SITELINK_HOME": str(tmp_path),
            "SITELINK_DATABASE_URL": database_url,
            "SITELINK_RUNTIME_DIR": str(self.runtime_dir),
            "SITELINK_EVENTS_ENDPOINT": f"ipc://{self.runtime_dir}/events.sock",
            "SITELINK_STATUS_FEED": f"tcp://127.0.0.1:{free_port()}",
            "SITELINK_SNAPSHOT_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
            "SITELINK_LOG_DIR": str(self.log_dir),
            "SITELINK_LOG_LEVEL": "DEBUG",
            "SITELINK_MONITOR_INTERVAL": "1",
            "SITELINK_RETRY_BASE": "0.2",
            "SITELINK_RETRY_CAP": "1",
            "SITELINK_MAX_RETRIES": "3",
            "SITELINK_RETRY_COOLDOWN": "600",
            "SITELINK_RESTART_BASE": "0.2",
            "SITELINK_RESTART_CAP": "2",
            "SITELINK_STOP_GRACE": "3",
            "SITELINK_RESEND_AFTER": "1",
            "SITELINK_ACK_LINGER": "2",
            "SITELINK_BATCH_WAIT": "0.02",
            "SITELINK_CONNECT_TIMEOUT": "10",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.feeds: list[FeedSubscriber] = []

    def start(self, *names: str, **overrides: str) -> None:
        self.env.update(overrides)
        for name in names:
            self.procs[name] = python_service(name, self.env, self.tmp / f"{name}.out")

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        proc = self.procs.pop(name)
        return stop_process(proc, sig)

    def feed(self, topic: str = "") -> FeedSubscriber:
        sub = FeedSubscriber(self.env["SITELINK_STATUS_FEED"], topic)
        self.feeds.append(sub)
        return sub

    def output(self, name: str) -> str:
        path = self.tmp / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for sub in self.feeds:
            sub.close()
        # The monitor first, so it stops its children.
        for name in sorted(self.procs, key=lambda n: n != "monitor"):
            stop_process(self.procs[name])
        self.procs.clear()
        self.sql.close()
        remove_tree(self.runtime_dir)
