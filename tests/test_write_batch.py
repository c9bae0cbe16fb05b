"""The logger's batch writer against a real PostgreSQL: a batch holding readings
already stored (a resend), or the same reading twice, still stores each
reading once and the rest of the batch."""

from __future__ import annotations

import dataclasses
import time

import psycopg

from services.logger import DeviceCache, LoggerService, Stream, write_batch
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


def _site(database_url: str, name: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES (%s) RETURNING id", (name,)).fetchone()[0]
        return conn.execute("INSERT INTO mqtt_connection (site_id, broker_host, is_active) "
                            "VALUES (%s, 'h', false) RETURNING id", (site,)).fetchone()[0]


def _last_seen(database_url: str) -> list:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT last_seen_at FROM gateway UNION ALL SELECT last_seen_at FROM datalogger "
                            "UNION ALL SELECT last_seen_at FROM sensor ORDER BY 1").fetchall()


def test_devices_just_written_are_not_upserted_again_and_their_readings_are_stored(database_url):
    cid = _site(database_url, "wb-cache")
    cache = DeviceCache(refresh=3600.0)
    database = db.Database(database_url, "test-write-batch")
    try:
        with database.transaction() as s:
            out = write_batch(s, _batch(cid, [0, 1]), cache)
        assert {kind for kind, *_ in out.devices} == {"gateway", "datalogger", "sensor"}
        cache.learn(out.devices, time.monotonic())
        seen = _last_seen(database_url)
        with database.transaction() as s:  # seen again at once: known fresh, only the readings written
            out = write_batch(s, _batch(cid, [2, 3]), cache)
        assert out.devices == [] and _last_seen(database_url) == seen
        with database.transaction() as s:  # without the cache, their last sight moves on
            write_batch(s, _batch(cid, [4]))
        assert _last_seen(database_url) > seen
    finally:
        database.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM reading").fetchone()[0] == 10


def test_a_device_older_than_the_refresh_is_written_again():
    cache = DeviceCache(refresh=1.0)
    cache.learn([("sensor", (1, None, "S"), 7, 100.0)], now=50.0)
    assert cache.fresh("sensor", (1, None, "S"), 100.5, now=50.5) == 7
    assert cache.fresh("sensor", (1, None, "S"), 100.5, now=51.0) is None  # written too long ago
    assert cache.fresh("sensor", (1, None, "S"), 101.0, now=50.5) is None  # a sight too much newer
    assert cache.fresh("gateway", (1, None, "S"), 100.5, now=50.5) is None


def test_the_cache_is_bounded():
    cache = DeviceCache(refresh=1.0, limit=10)
    cache.learn([("sensor", (1, None, str(k)), k, 0.0) for k in range(10)], now=0.0)
    cache.learn([("sensor", (2, None, str(k)), k, 0.0) for k in range(5)], now=5.0)  # the stale go
    assert len(cache.known) == 5
    cache.learn([("sensor", (3, None, str(k)), k, 0.0) for k in range(20)], now=5.0)
    assert len(cache.known) <= 10


def test_a_stale_device_id_costs_a_retry_not_the_readings(database_url):
    """A device deleted while the logger held its id: the batch is written again without the cache."""
    cid = _site(database_url, "wb-stale")
    # Only what the data lane's writer uses: its database, the streams, the device cache.
    service = object.__new__(LoggerService)
    service.data_db = db.Database(database_url, "test-write-batch")
    service.devices = DeviceCache(refresh=3600.0)
    service.streams = {}
    first, [second] = _batch(cid, [0]), _batch(cid, [1])
    second = dataclasses.replace(second, seq=2)
    service.streams[first[0].stream] = Stream(loaded=True)

    def write(batch):
        outcome = service._write_data_batch((batch, batch, service._floors(batch)))
        assert not isinstance(outcome, Exception), outcome
        return outcome
    try:
        service.devices.learn(write(first).devices, time.monotonic())
        assert service.devices.known
        with psycopg.connect(database_url, autocommit=True) as conn:
            for table in ("reading", "sensor", "datalogger", "gateway"):
                conn.execute(f"DELETE FROM {table}")
        write([second])
        assert not service.devices.known  # emptied by the failure
    finally:
        service.data_db.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM reading").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM mqtt_parsing_log").fetchone()[0] == 0
