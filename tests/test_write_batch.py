"""The logger's batch writer against a real PostgreSQL: a batch holding readings
already stored (a resend), or the same reading twice, still stores each
reading once and the rest of the batch."""

from __future__ import annotations

import time

import psycopg

from services.logger import write_batch
from shared import db
from shared.protocol import Data, Envelope

BASE_TS = 1795860000  # 2026-11-28T10:00:00Z


def _batch(cid: int, numbers: list[int]) -> list[Envelope]:
    return [Envelope(sender=f"conn:{cid}", incarnation="wb", seq=k + 1, floor=0, ts=time.time(),
                     event=Data(connection_id=cid, topic="t", gateway="GW", datalogger="DL", ts=BASE_TS + n,
                                sensors={"S": {"n": float(n)}, "T": {"n": n + 100.0}}))
            for k, n in enumerate(numbers)]


def test_resent_and_repeated_readings_are_stored_once_with_the_new_ones(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('wb') RETURNING id").fetchone()[0]
        cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host, is_active) "
                           "VALUES (%s, 'h', false) RETURNING id", (site,)).fetchone()[0]
    database = db.Database(database_url, "test-write-batch")
    try:
        with database.transaction() as s:
            write_batch(s, _batch(cid, list(range(10))))
        with database.transaction() as s:  # 5..9 again (a resend), 10..14 new, 12 twice
            write_batch(s, _batch(cid, [*range(5, 15), 12]))
    finally:
        database.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT s.name, r.\"values\"->>'n' FROM reading r JOIN sensor s ON s.id = r.sensor_id "
                            "ORDER BY r.ts, s.name").fetchall()
    assert rows == [(name, str(float(n) + extra)) for n in range(15) for name, extra in (("S", 0), ("T", 100))]
