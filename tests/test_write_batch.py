"""The logger's batch writer against a real PostgreSQL: a batch holding readings
already stored (a resend), or the same reading twice, still stores each
reading once and the rest of the batch."""

from __future__ import annotations

import dataclasses
import time

import psycopg

from services.logger import DeviceCache, LoggerService, Stream, write_batch
from shared import db
from shared.protocol import Data, Envelope, Flow, StatusChange

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


def _status(cid: int, seq: int, status: str, **fields) -> Envelope:
    return Envelope(sender=f"conn:{cid}", incarnation="st", seq=seq, floor=0, ts=BASE_TS + seq,
                    event=StatusChange(connection_id=cid, status=status, message=fields.pop("message", status),
                                       epoch=1, **fields))


def test_a_burst_of_statuses_applies_each_connection_s_in_order_and_skips_the_older(database_url):
    """The statuses of a batch are written a wave at a time (each connection's
    first, then its second...): the rows, the history, the log and the feed are
    those of applying them one by one, in the batch's order."""
    a, b, c = (_site(database_url, name) for name in ("st-a", "st-b", "st-c"))
    batch = [
        _status(a, 1, "connecting"), _status(b, 1, "connecting"),
        _status(a, 2, "connected"),
        Envelope(sender=f"conn:{a}", incarnation="st", seq=3, floor=0, ts=BASE_TS + 3,
                 event=Flow(connection_id=a, paused=True, unacked=5, epoch=1)),  # reads a's status: connected
        _status(c, 4, "connecting"), _status(a, 5, "error", message="connection lost", retry_attempt=2,
                                             next_retry_at=BASE_TS + 5 + 30.0),
        _status(b, 6, "disconnected", message="disconnected: cleanly, as asked"),
        _status(c, 2, "connected"),  # older than c's connecting (seq 4): not applied
    ]
    database = db.Database(database_url, "test-write-batch")
    try:
        with database.transaction() as s:
            out = write_batch(s, batch)
    finally:
        database.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, status, status_seq, error_message, mqtt_retry_count, mqtt_next_retry > now() "
            "FROM mqtt_connection")}
        history = conn.execute("SELECT connection_id, status FROM mqtt_status_history ORDER BY id").fetchall()
        logged = conn.execute("SELECT connection_id, message FROM mqtt_connection_log ORDER BY id").fetchall()
    assert rows[a] == ("error", 5, "connection lost", 2, True)
    assert rows[b][:2] == ("disconnected", 6)
    assert rows[c][:2] == ("connecting", 4)
    # (each connection's history starts with the row of its creation)
    assert [h for h in history if h[0] == a][1:] == [(a, "connecting"), (a, "connected"), (a, "error")]
    assert [h for h in history if h[0] == c][1:] == [(c, "connecting")]
    assert [m for cid, m in logged if cid == a][:2] == ["connecting", "connected"]
    assert len(logged) == 8  # every status is logged, the one not applied too, and the flow change
    statuses = [(body["connection_id"], body["status"]) for body in out.feed if body["type"] == "mqtt_status"]
    assert statuses == [(a, "connecting"), (b, "connecting"), (a, "connected"), (a, "connected"),
                        (c, "connecting"), (a, "error"), (b, "disconnected")]
    assert [body.get("paused") for body in out.feed if body["connection_id"] == a][1:3] == [False, True]
    assert any("(an older status, not applied)" in line for _, line in out.connection_lines)

    # What each status sets besides itself: connecting keeps the error and the
    # retry state, connected clears them.
    def row() -> tuple:
        with psycopg.connect(database_url, autocommit=True) as conn:
            return conn.execute("SELECT status, error_message, connection_errors, mqtt_retry_count, "
                                "mqtt_next_retry IS NOT NULL, last_connected_at IS NOT NULL "
                                "FROM mqtt_connection WHERE id = %s", (a,)).fetchone()
    database = db.Database(database_url, "test-write-batch")
    try:
        with database.transaction() as s:
            write_batch(s, [_status(a, 7, "connecting")])
        assert row() == ("connecting", "connection lost", 1, 2, True, True)
        with database.transaction() as s:
            write_batch(s, [_status(a, 8, "connected")])
        assert row() == ("connected", "", 0, 0, False, True)
    finally:
        database.close()
