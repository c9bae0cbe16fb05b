"""Benchmarks: collected only when tests/bench (or a file in it) is named on the command line.

``make test`` (pytest with testpaths = ["tests"]) walks into this directory
but finds nothing to run: benchmark files are named ``bench_*.py``, which is
not pytest's ``test_*.py`` pattern, and the hook below adds them only when
the command line names this directory, as ``make bench`` does
(``pytest tests/bench``). Naming one file (``pytest tests/bench/bench_ingest.py``)
works too: pytest always collects a file it is given.

Fixtures: a durable PostgreSQL for the whole benchmark session (the suite's
``pg_server`` runs with SITELINK_PG_FAST, which is not what throughput
should be measured on), fresh databases on it (``databases.sitelink()``,
``databases.scratch()``; a measurement repeated because something else
disturbed it gets new ones), and the suite's own ``broker`` (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import db
from tests.bench.harness import DurablePostgresServer
from tests.support import remove_tree, world_traversable_tmpdir

BENCH_DIR = Path(__file__).resolve().parent
TEMPLATE = "sitelink_bench_template"
_numbers = itertools.count(1)


def _bench_dir_named(config: pytest.Config) -> bool:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = Path(arg.split("::", 1)[0])
        path = (path if path.is_absolute() else base / path).resolve()
        if path == BENCH_DIR or BENCH_DIR in path.parents:
            return True
    return False


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if (file_path.parent == BENCH_DIR and file_path.name.startswith("bench_") and file_path.suffix == ".py"
            and not parent.session.isinitpath(file_path)  # named files pytest collects itself
            and _bench_dir_named(parent.config)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session", autouse=True)
def open_files_limit() -> None:
    """Raise RLIMIT_NOFILE (soft = hard) before the broker starts: Mosquitto, a
    child of this process, needs a descriptor per client (200 children and more)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture(scope="session")
def durable_pg() -> Iterator[DurablePostgresServer]:
    base = world_traversable_tmpdir("sitelink-bench-pg-")
    server = DurablePostgresServer(base)
    server.start()
    try:
        server.execute(f"CREATE DATABASE {TEMPLATE}")
        database = db.Database(server.url(TEMPLATE), "sitelink-bench-migrate")
        db.migrate(database)
        database.close()
        yield server
    finally:
        server.stop()
        remove_tree(base)


class Databases:
    """Fresh databases on the durable server, dropped at the end of the benchmark."""

    def __init__(self, server: DurablePostgresServer):
        self.server = server
        self.names: list[str] = []

    def _create(self, prefix: str, template: str) -> str:
        name = f"{prefix}_{os.getpid()}_{next(_numbers)}"
        self.server.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        self.names.append(name)
        return self.server.url(name)

    def sitelink(self) -> str:
        """A migrated database, as the services need it."""
        return self._create("sitelink_bench", TEMPLATE)

    def scratch(self) -> str:
        """An empty database, for the reference pipelines."""
        return self._create("bench_scratch", "template1")

    def drop_all(self) -> None:
        for name in self.names:
            self.server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def databases(durable_pg: DurablePostgresServer) -> Iterator[Databases]:
    dbs = Databases(durable_pg)
    try:
        yield dbs
    finally:
        dbs.drop_all()
