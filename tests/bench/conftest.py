"""Benchmarks: collected only when tests/bench (or a file in it) is named on the command line.

``make test`` (pytest with testpaths = ["tests"]) walks into this directory
but finds nothing to run: benchmark files are named ``bench_*.py``, which is
not pytest's ``test_*.py`` pattern, and the hook below adds them only when
the command line names this directory, as ``make bench`` does
(``pytest tests/bench``). Naming one file (``pytest tests/bench/bench_ingest.py``)
works too: pytest always collects a file it is given.

Fixtures: a durable PostgreSQL for the whole benchmark session (the suite's
``pg_server`` runs with SITELINK_PG_FAST, which is not what throughput
should be measured on), a fresh migrated database per benchmark, and the
suite's own ``broker`` (tests/conftest.py).
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


@pytest.fixture
def bench_db(durable_pg: DurablePostgresServer) -> Iterator[str]:
    """A fresh, migrated database on the durable server."""
    name = f"sitelink_bench_{os.getpid()}_{next(_numbers)}"
    durable_pg.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield durable_pg.url(name)
    durable_pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def scratch_db(durable_pg: DurablePostgresServer) -> Iterator[str]:
    """An empty database on the durable server, for the reference pipelines."""
    name = f"bench_scratch_{os.getpid()}_{next(_numbers)}"
    durable_pg.execute(f"CREATE DATABASE {name}")
    yield durable_pg.url(name)
    durable_pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
