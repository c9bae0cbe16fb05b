"""Fixtures: a real PostgreSQL and Mosquitto per test run, a fresh database per test,
and the services as real processes with short intervals."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import db
from tests.stack import Stack
from tests.support import (Mosquitto, PostgresServer, Publisher, remove_tree, world_traversable_tmpdir)

TEMPLATE = "sitelink_template"
_db_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    base = world_traversable_tmpdir("sitelink-test-pg-")
    server = PostgresServer(base)
    server.start()
    try:
        server.execute(f"CREATE DATABASE {TEMPLATE}")
        database = db.Database(server.url(TEMPLATE), "sitelink-test-migrate")
        db.migrate(database)
        database.close()
        yield server
    finally:
        server.stop()
        remove_tree(base)


@pytest.fixture
def database_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, migrated database for one test (a copy of the template)."""
    name = f"sitelink_test_{os.getpid()}_{next(_db_numbers)}"
    pg_server.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield pg_server.url(name)
    pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def broker() -> Iterator[Mosquitto]:
    """The tests' broker: anonymous clients welcome (tests/test_stack_security.py
    checks the embedded stack's, which refuses them)."""
    base = world_traversable_tmpdir("sitelink-test-mqtt-")
    server = Mosquitto(base, anonymous=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        remove_tree(base)


@pytest.fixture
def stack(database_url: str, broker: Mosquitto, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(database_url, broker, tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(broker.port)
    yield pub
    pub.close()


@pytest.fixture
def own_postgres(broker: Mosquitto, tmp_path: Path) -> Iterator[tuple[PostgresServer, Stack]]:
    """A PostgreSQL of this test alone (to stop and start), migrated, with a Stack on it."""
    base = world_traversable_tmpdir("sitelink-test-own-pg-")
    server = PostgresServer(base)
    server.start()
    stack = None
    try:
        server.execute("CREATE DATABASE sitelink")
        database = db.Database(server.url("sitelink"), "sitelink-test-migrate")
        db.migrate(database)
        database.close()
        stack = Stack(server.url("sitelink"), broker, tmp_path)
        yield server, stack
    finally:
        if stack is not None:
            stack.close()
        server.stop()
        remove_tree(base)
