"""What one transaction of the logger's status lane costs, part by part, on this machine.

Not a pytest benchmark: ``.venv/bin/python tests/bench/lane_cost.py [flushes [children]]``.
A durable PostgreSQL of its own (as the benches use, fsync on) on a free
loopback port, migrated, with 400 connections; then, for each part of what
the status lane does for some children (default 2) that each report
`connecting` and `connected` in one batch (what a mass start brings; in a
burst the lane waits for more, and ten children or more share one), N transactions in a
row on one connection: the wall time, the CPU of this process's thread
(psycopg and the logger's own code) and the CPU of the PostgreSQL backend
serving it (from /proc), each per transaction. The last line is the whole
flush as ``services.logger`` runs it (the floors read, ``write_batch``, the
floors written, the commit); the parts before it do not add up to it
exactly (each has its own BEGIN and COMMIT). It says what a started child
costs the logger and PostgreSQL beyond the child itself (RESULTS.md,
"Starting children").
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.logger import LoggerService, Outcome, _batch_context, _Statuses, write_batch  # noqa: E402
from shared import db  # noqa: E402
from shared.protocol import Envelope, StatusChange  # noqa: E402
from tests.bench.harness import run_seconds  # noqa: E402
from tests.support import PostgresServer, remove_tree, world_traversable_tmpdir  # noqa: E402

CONNECTIONS = 400
PER_FLUSH = 2  # children per transaction, two statuses each (the default)


def _connections(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO site (name) SELECT 'lane-' || g FROM generate_series(1, %s) g", (CONNECTIONS,))
        return [row[0] for row in conn.execute(
            "INSERT INTO mqtt_connection (site_id, broker_host, is_active) "
            "SELECT id, 'localhost', false FROM site ORDER BY id RETURNING id").fetchall()]


def _backend_of(url: str, application_name: str) -> int:
    """The PID of the PostgreSQL backend serving the connection named ``application_name``."""
    with psycopg.connect(url, autocommit=True) as conn:
        [(pid,)] = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                (application_name,)).fetchall()
        return pid


def main(flushes: int = 300, per_flush: int = PER_FLUSH) -> None:
    base = world_traversable_tmpdir("sitelink-lane-cost-")
    server = PostgresServer(base, fast=False)
    database = None
    try:
        server.start()
        server.execute("CREATE DATABASE lane")
        url = server.url("lane")
        database = db.Database(url, "sitelink-lane-cost")
        db.migrate(database)
        ids = _connections(url)
        backend = _backend_of(url, "sitelink-lane-cost")
        seqs = itertools.count(1)

        def batch(cids: list[int]) -> list[Envelope]:
            return [Envelope(sender=f"conn:{cid}", incarnation="lane", seq=next(seqs), floor=0, ts=time.time(),
                             event=StatusChange(connection_id=cid, status=status, message=f"{status} to localhost",
                                                broker_host="localhost", epoch=1,
                                                retry_attempt=1 if status == "connecting" else None))
                    for cid in cids for status in ("connecting", "connected")]

        def floors_read(s: db.Session, cids: list[int], items: list[Envelope]) -> None:
            s.rows("stream_floors", {"senders": [f"conn:{c}" for c in cids], "incarnations": ["lane"] * len(cids)})

        def statuses(s: db.Session, cids: list[int], items: list[Envelope]) -> None:
            lane = _Statuses(Outcome(), [], {})
            for env in items:
                lane.add(env, env.event)
            lane.apply(s)

        def floors_written(s: db.Session, cids: list[int], items: list[Envelope]) -> None:
            LoggerService._record_floors(s, {(f"conn:{c}", "lane"): next(seqs) for c in cids})

        def whole(s: db.Session, cids: list[int], items: list[Envelope]) -> None:
            floors_read(s, cids, items)
            write_batch(s, items)
            floors_written(s, cids, items)

        parts: list[tuple[str, Callable[[db.Session, list[int], list[Envelope]], None]]] = [
            ("BEGIN + COMMIT, nothing written", lambda s, cids, items: None),
            ("the senders' floors read (stream_floors)", floors_read),
            ("the batch's context (batch_context)", lambda s, cids, items: _batch_context(s, items)),
            (f"{2 * per_flush} statuses in 2 waves (status_set x 2)", statuses),
            ("the floors written (stream_commit)", floors_written),
            ("the whole flush (as the logger runs it)", whole),
        ]
        print(f"{flushes} transactions per part, {per_flush} children x 2 statuses each; per transaction:")
        for name, part in parts:
            cpu0, pg0, t0 = time.thread_time(), _cpu_of(backend), time.perf_counter()
            for k in range(flushes):
                at = (per_flush * k) % (CONNECTIONS - per_flush + 1)
                cids = ids[at:at + per_flush]
                items = batch(cids)
                with database.transaction() as s:
                    part(s, cids, items)
            wall, cpu, pg = time.perf_counter() - t0, time.thread_time() - cpu0, _cpu_of(backend) - pg0
            print(f"  {name:42s} wall {wall / flushes * 1000:5.2f} ms, this thread {cpu / flushes * 1000:5.2f} ms "
                  f"CPU, PostgreSQL {pg / flushes * 1000:5.2f} ms CPU")
    finally:
        if database is not None:
            database.close()
        server.stop()
        remove_tree(base)


def _cpu_of(pid: int) -> float:
    cpu = run_seconds(pid)
    assert cpu is not None, f"the PostgreSQL backend {pid} is gone"
    return cpu


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
