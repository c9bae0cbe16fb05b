"""The one module that holds PostgreSQL connections.

SQL text lives in ``sql/``: numbered migrations in ``sql/migrations/`` and
named queries in ``sql/queries.sql`` (each under a ``-- name: <name>``
header). Callers run queries by name. Driver errors are translated at this
boundary into our own: ``DatabaseUnavailable`` (retry later, nothing is
wrong with the data), ``DataRejected`` (this data cannot be stored as is),
``LockNotGranted`` (a lock not granted in time) and ``DatabaseError``
(anything else). Their messages are one line each, whatever
the driver's (psycopg's connection errors span several).

A connection opened with a ``bound`` has every call on it bounded: the
connect, each statement (``statement_timeout``) and a peer that vanished
(TCP keepalives and ``tcp_user_timeout``), so a silent partition fails a call
instead of holding its caller.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from loguru import logger

from shared import backoff
from shared.config import PROJECT_ROOT

SQL_DIR = PROJECT_ROOT / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
NOTIFY_CHANNEL = "sitelink_mqtt_connection"
#: Key of the advisory lock that serialises migrations ('sitelink' in hex-ish).
_MIGRATION_LOCK = 0x5173_1e1c


class DatabaseError(Exception):
    """A database operation failed."""


class DatabaseUnavailable(DatabaseError):
    """PostgreSQL cannot be reached or dropped the connection: try again later."""


class DataRejected(DatabaseError):
    """PostgreSQL refused the data (constraint, type, value): retrying will not help."""


class LockNotGranted(DatabaseError):
    """A lock was not granted in time (``lock_timeout``, ``NOWAIT``): try again later."""


class SchemaBehind(DatabaseError):
    """The database lacks migrations this code needs."""


_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def load_queries(path: Path = SQL_DIR / "queries.sql") -> dict[str, str]:
    text = path.read_text()
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in queries:
            raise ValueError(f"{path}: query {name!r} is defined twice")
        queries[name] = body.strip().rstrip(";")
    return queries


QUERIES = load_queries()


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError,
            psycopg.errors.ProgrammingError) as exc:
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            raise DatabaseError(_describe(exc)) from exc
        raise DataRejected(_describe(exc)) from exc
    except psycopg.errors.LockNotAvailable as exc:
        raise LockNotGranted(_describe(exc)) from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseUnavailable(_describe(exc)) from exc
    except psycopg.Error as exc:
        raise DatabaseError(_describe(exc)) from exc


#: Errors whose DETAIL quotes the whole failing row ("Failing row contains
#: (...)"), a broker password included: their DETAIL never reaches a message.
_ROW_QUOTING = frozenset({"23502", "23514"})  # not_null_violation, check_violation


def _describe(exc: psycopg.Error) -> str:
    if exc.diag.sqlstate in _ROW_QUOTING and exc.diag.message_primary:
        text = exc.diag.message_primary
    else:
        text = str(exc)
    text = " ".join(text.split()) or type(exc).__name__  # psycopg's messages span lines: one line
    return f"{type(exc).__name__}: {text}"


def connect_options(url: str, bound: float | None) -> dict[str, Any]:
    """libpq parameters that bound every call on a connection to about ``bound`` seconds."""
    if bound is None:
        return {"connect_timeout": 5}
    ms = max(1, int(bound * 1000))
    probe = max(1, int(bound // 3))  # keepalives count in whole seconds
    options = conninfo_to_dict(url).get("options") or ""
    return {"connect_timeout": max(2, math.ceil(bound)),  # libpq's floor is 2 s
            "keepalives": 1, "keepalives_idle": probe, "keepalives_interval": probe, "keepalives_count": 2,
            "tcp_user_timeout": ms,
            # A process frozen (SIGSTOP) in the middle of a transaction would
            # hold its row locks, and every other monitor's claims would wait
            # on them: PostgreSQL ends such a transaction itself.
            "options": f"{options} -c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}".strip()}


class Session:
    """A connection in use: run named queries."""

    def __init__(self, conn: psycopg.Connection):
        self._conn = conn

    def run(self, name: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> int:
        with translate_errors(), self._conn.cursor() as cur:
            cur.execute(QUERIES[name], params)
            return cur.rowcount

    def rows(self, name: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> list[dict]:
        with translate_errors(), self._conn.cursor(row_factory=dict_row) as cur:
            cur.execute(QUERIES[name], params)
            return cur.fetchall()

    def one(self, name: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> dict | None:
        found = self.rows(name, params)
        return found[0] if found else None

    def many(self, name: str, params_seq: Iterable[Mapping[str, Any] | Sequence[Any]]) -> None:
        with translate_errors(), self._conn.cursor() as cur:
            cur.executemany(QUERIES[name], params_seq)

    def sql(self, text: str, params: Any = None) -> None:
        """Run raw SQL text read from a file under sql/ (migrations)."""
        with translate_errors(), self._conn.cursor() as cur:
            cur.execute(text, params)

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        with translate_errors(), self._conn.transaction():
            yield


class Database:
    """One connection to PostgreSQL, reopened on demand after a failure."""

    def __init__(self, url: str, application_name: str, bound: float | None = None):
        self.url = url
        self.application_name = application_name
        self.bound = bound
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            with translate_errors():
                self._conn = psycopg.connect(self.url, application_name=self.application_name,
                                             **connect_options(self.url, self.bound))
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        conn = self._connection()
        try:
            with translate_errors(), conn.transaction():
                yield Session(conn)
        except DatabaseUnavailable:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


class Listener:
    """A dedicated connection that LISTENs; ``fileno()`` becomes readable on NOTIFY."""

    def __init__(self, url: str, channel: str = NOTIFY_CHANNEL, application_name: str = "sitelink-listen",
                 bound: float | None = None):
        with translate_errors():
            self._conn = psycopg.connect(url, autocommit=True, application_name=application_name,
                                         **connect_options(url, bound))
            self._conn.execute(f"LISTEN {channel}")

    def fileno(self) -> int:
        return self._conn.fileno()

    def drain(self) -> list[str]:
        """The payloads of every notification received so far (never blocks)."""
        with translate_errors():
            return [n.payload for n in self._conn.notifies(timeout=0)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


# --- migrations ----------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = re.match(r"^(\d+)_([a-z0-9_]+)\.sql$", path.name)
        if not match:
            raise ValueError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{directory}: two migrations share a number")
    return found


def migrate(db: Database, upto: int | None = None) -> list[Migration]:
    """Apply the missing migrations, each once, in order; return those applied.

    ``upto``: stop after that version (tests build the database of an older
    release with it). A transaction-scoped advisory lock makes two processes
    that start together take turns: the second sees what the first applied.
    """
    applied_now = []
    with db.transaction() as s:
        s.run("migration_lock", {"key": _MIGRATION_LOCK})
        s.run("migration_table")
        done = {row["version"] for row in s.rows("migration_versions")}
        for m in migrations():
            if m.version in done or (upto is not None and m.version > upto):
                continue
            s.sql(m.path.read_text())
            s.run("migration_record", {"version": m.version, "name": m.name})
            applied_now.append(m)
    return applied_now


def check_schema(db: Database) -> None:
    """Raise ``SchemaBehind`` unless every migration has been applied."""
    with db.transaction() as s:
        exists = s.one("migration_table_exists")
        done = {row["version"] for row in s.rows("migration_versions")} if exists and exists["present"] else set()
    missing = [m for m in migrations() if m.version not in done]
    if missing:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
        raise SchemaBehind(f"the database lacks migrations {names}: run `make migrate` "
                           f"(python -m services.admin migrate) first")


def wait_until_ready(url: str, application_name: str, bound: float | None = None) -> Database:
    """Connect, waiting with backoff while PostgreSQL is unreachable, and check the schema.

    Raises ``SchemaBehind`` at once if the database needs migrating: that will
    not fix itself.
    """
    database = Database(url, application_name, bound)
    attempt = 0
    while True:
        try:
            check_schema(database)
            return database
        except DatabaseUnavailable as exc:
            attempt += 1
            wait = backoff.delay(attempt, 0.5, 10.0)
            logger.warning("PostgreSQL is not reachable yet ({}); trying again in {:.1f} s", exc, wait)
            time.sleep(wait)
