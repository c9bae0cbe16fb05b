"""The quarantine and its replay: a payload the parser rejects is kept whole,
and after a parser fix ``python -m services.admin replay`` stores it, once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.rows import dict_row

from services import replay
from shared import config, db
from tests.support import ROOT, Publisher, reading, wait_for


def run_replay(stack, *args: str) -> str:
    """``python -m services.admin replay ...`` as an operator runs it; its output."""
    done = subprocess.run([sys.executable, "-m", "services.admin", "replay", *args], cwd=ROOT, env=stack.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def site_readings(sql, site_id: int) -> list[tuple]:
    return [(r["gateway"], r["sensor"], r["ts"], r["values"]) for r in sql.rows(
        "SELECT g.name AS gateway, s.name AS sensor, r.ts, r.values FROM reading r "
        "JOIN sensor s ON s.id = r.sensor_id JOIN gateway g ON g.id = s.gateway_id "
        "WHERE g.site_id = %s ORDER BY r.ts, s.name", site_id)]


def at(minute: int) -> str:
    return (datetime(2026, 11, 28, 10, tzinfo=timezone.utc) + timedelta(minutes=minute)).isoformat()


#: What the gateways of q-north send since a firmware update: what they buffered, in arrays.
BATCHES = [[reading(ts=at(2 * n), **{"S-1": {"t": float(n)}}), reading(ts=at(2 * n + 1), **{"S-1": {"t": n + 0.5}})]
           for n in range(3)]
BROKEN = b'{"gateway": "GW-01", "ts": '  # cut short: no parser will ever read it
PAYLOAD_LIMIT = 8192
OVERSIZED = json.dumps([reading(ts=at(50), **{"S-1": {"t": 1.0}, "pad": {f"m{i}": 1.0 for i in range(800)}})])


def test_after_a_parser_fix_replay_stores_what_was_rejected_once(stack, broker):
    north = stack.sql.add_site("q-north", port=broker.port, stall_after=None)
    south = stack.sql.add_site("q-south", port=broker.port, stall_after=None)
    north_site, south_site = (stack.sql.value("SELECT site_id FROM mqtt_connection WHERE id = %s", c)
                              for c in (north, south))
    stack.start("logger", "monitor", SITELINK_MAX_PAYLOAD=str(PAYLOAD_LIMIT))
    for cid in (north, south):
        stack.sql.wait_status(cid, "connected")
    started = datetime.now(timezone.utc)
    publisher = Publisher(broker.port)
    try:
        for batch in BATCHES:
            publisher.publish("sites/q-north/GW-01", json.dumps(batch))
        publisher.publish("sites/q-north/GW-01", BROKEN)
        publisher.publish("sites/q-north/GW-01", OVERSIZED)
        publisher.publish("sites/q-north/GW-01", reading(ts=at(60), **{"S-1": {"t": 60.0}}))  # what json takes
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_quarantine") == 5, what="north's 5 rejected")
        split = datetime.now(timezone.utc)
        publisher.publish("sites/q-south/GW-09", json.dumps([reading(gateway="GW-09", ts=at(0), **{"S": {"t": 9.0}})]))
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_quarantine") == 6, what="south's one rejected")
        wait_for(lambda: len(site_readings(stack.sql, north_site)) == 1, what="the payload json takes, stored")

        # Kept whole, with its topic, site, connection, parser, error and time, beside its parsing-log row.
        rows = stack.sql.rows("SELECT q.*, p.topic AS log_topic, p.error_message AS log_error, p.timestamp AS log_at "
                              "FROM mqtt_quarantine q JOIN mqtt_parsing_log p ON p.id = q.parsing_log_id ORDER BY q.id")
        kept = [bytes(r["payload"]) for r in rows]
        assert kept[:5] == [json.dumps(b).encode() for b in BATCHES] + [BROKEN, OVERSIZED.encode()[:len(kept[4])]]
        assert [r["replayable"] for r in rows] == [True, True, True, True, False, True]
        assert rows[4]["payload_bytes"] == len(OVERSIZED) and "SITELINK_MAX_PAYLOAD" in rows[4]["error_message"]
        assert [r["error_type"] for r in rows] == ["VALIDATION_ERROR"] * 3 + ["PARSE_ERROR"] + ["VALIDATION_ERROR"] * 2
        for r in rows:
            assert r["site_id"] == (south_site if r is rows[5] else north_site)
            assert r["connection_id"] == (south if r is rows[5] else north) and r["parser_name"] == "json"
            assert r["topic"] == r["log_topic"] and r["error_message"] == r["log_error"]
            assert started - timedelta(seconds=1) <= r["received_at"] == r["log_at"] <= datetime.now(timezone.utc)
            assert r["replayed_at"] is None
        assert "expected a JSON object, got an array" in rows[0]["error_message"]

        # The fix: these gateways send batches now; the connections get the parser for that.
        stack.sql.rows("UPDATE mqtt_connection SET parser_name = 'json-batch' WHERE id IN (%s, %s)", north, south)
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE message LIKE "
                                         "'Successfully connected%%'") >= 4, what="both children restarted")
        for cid in (north, south):
            stack.sql.wait_status(cid, "connected")
        # The first gateway sends its first buffer again: json-batch takes it live.
        publisher.publish("sites/q-north/GW-01", json.dumps(BATCHES[0]))
        wait_for(lambda: len(site_readings(stack.sql, north_site)) == 3, what="the resent batch stored live")
    finally:
        publisher.close()
    before = site_readings(stack.sql, north_site)

    out = run_replay(stack, "--site", "q-north", "--dry-run")
    assert "replay (dry run: nothing is stored): 5 quarantined payloads match (site q-north)" in out
    assert "would store      3 payloads, 6 records" in out
    assert "still failing    1 payload" in out and "not replayable   1 payload" in out
    assert "PARSE_ERROR: payload is not JSON" in out
    assert site_readings(stack.sql, north_site) == before
    assert stack.sql.value("SELECT count(*) FROM mqtt_quarantine WHERE replayed_at IS NOT NULL") == 0

    out = run_replay(stack, "--site", "q-north")
    assert "replay: 5 quarantined payloads match (site q-north)" in out
    assert "stored           3 payloads, 6 records" in out
    assert "site q-north: stored 3, still failing 1, not replayable 1, already stored 0" in out
    after = site_readings(stack.sql, north_site)
    expected = [("GW-01", "S-1", datetime.fromisoformat(rec["ts"]), rec["sensors"]["S-1"])
                for batch in BATCHES for rec in batch] + [("GW-01", "S-1", datetime.fromisoformat(at(60)), {"t": 60.0})]
    assert after == expected  # each reading once, the live resend of the first batch too
    marks = stack.sql.rows("SELECT replay_outcome, replay_parser, replay_records, replay_error_type, replayed_at "
                           "FROM mqtt_quarantine WHERE site_id = %s ORDER BY id", north_site)
    assert [(m["replay_outcome"], m["replay_parser"], m["replay_records"], m["replay_error_type"])
            for m in marks] == [("stored", "json-batch", 2, None)] * 3 + [("failed", "json-batch", None, "PARSE_ERROR"),
                                                                         (None, None, None, None)]
    assert all(m["replayed_at"] is not None for m in marks[:4])
    assert stack.sql.value("SELECT count(*) FROM mqtt_quarantine WHERE site_id = %s AND replayed_at IS NOT NULL",
                           south_site) == 0

    out = run_replay(stack, "--site", "q-north")
    assert "stored           0 payloads, 0 records" in out and "already stored   3 payloads" in out
    assert "still failing    1 payload" in out
    assert site_readings(stack.sql, north_site) == after

    # Filters: the site by id, a time range, an error type.
    out = run_replay(stack, "--until", split.isoformat())
    assert "5 quarantined payloads match" in out and "stored           0 payloads" in out
    out = run_replay(stack, "--site", str(south_site), "--error-type", "PARSE_ERROR")
    assert "0 quarantined payloads match" in out
    out = run_replay(stack, "--site", str(south_site), "--since", (split + timedelta(hours=1)).isoformat())
    assert "0 quarantined payloads match" in out
    out = run_replay(stack, "--since", split.isoformat(), "--error-type", "VALIDATION_ERROR")
    assert "replay: 1 quarantined payload matches" in out and "site q-south: stored 1," in out
    assert site_readings(stack.sql, south_site) == [("GW-09", "S", datetime.fromisoformat(at(0)), {"t": 9.0})]


def test_replay_refuses_an_unknown_site(stack):
    done = subprocess.run([sys.executable, "-m", "services.admin", "replay", "--site", "nowhere"], cwd=ROOT,
                          env=stack.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no site named 'nowhere'" in done.stderr


# --- replay in one process, on constructed quarantines -----------------------------

@pytest.fixture
def psql(database_url: str):
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def quarantine(conn, site: int, connection: int | None, payload: bytes, received_at: datetime,
               topic: str = "t", error_type: str = "VALIDATION_ERROR") -> int:
    return conn.execute(
        "INSERT INTO mqtt_quarantine (site_id, connection_id, received_at, topic, parser_name, error_type, "
        "error_message, payload, payload_bytes, replayable) VALUES (%s, %s, %s, %s, 'json', %s, 'm', %s, %s, true) "
        "RETURNING id", (site, connection, received_at, topic, error_type, payload, len(payload))).fetchone()["id"]


def add_site(conn, name: str, parser: str | None = "json-batch") -> tuple[int, int | None]:
    site = conn.execute("INSERT INTO site (name) VALUES (%s) RETURNING id", (name,)).fetchone()["id"]
    if parser is None:
        return site, None
    cid = conn.execute("INSERT INTO mqtt_connection (site_id, broker_host, parser_name) VALUES (%s, 'h', %s) "
                       "RETURNING id", (site, parser)).fetchone()["id"]
    return site, cid


def run(database_url: str, dry_run: bool = False, **filters) -> replay.Report:
    database = db.Database(database_url, "test-replay")
    try:
        return replay.Replay(database, config.load({}), replay.Filters(**filters), dry_run).run()
    finally:
        database.close()


NOW = datetime.now(timezone.utc)


def test_replay_goes_in_batches_and_two_at_once_store_each_payload_once(psql, database_url, monkeypatch):
    monkeypatch.setattr(replay, "BATCH_ROWS", 7)
    site, cid = add_site(psql, "many")
    for n in range(60):
        quarantine(psql, site, cid, json.dumps([reading(ts=at(n), **{"S": {"n": float(n)}})]).encode(), NOW)
    statements = []
    original = db.Session.rows

    def counting(self, name, params=None):
        found = original(self, name, params)
        if name == "quarantine_replay_take":
            statements.append(len(found))
        return found
    monkeypatch.setattr(db.Session, "rows", counting)
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(run(database_url))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reports) == 2 and sum(r.total(replay.STORED) for r in reports) == 60
    assert sum(statements) == 60 and max(statements) == 7  # in batches of at most 7, each payload once
    assert psql.execute("SELECT count(*) FROM reading").fetchone()["count"] == 60
    stored = psql.execute("SELECT count(*) FROM mqtt_quarantine WHERE replay_outcome = 'stored'").fetchone()
    assert stored["count"] == 60


def test_what_the_live_path_refuses_replay_refuses(psql, database_url):
    site, cid = add_site(psql, "strict")
    nobody, _ = add_site(psql, "unconnected", parser=None)
    _, odd = add_site(psql, "odd-parser", parser="json")
    psql.execute("UPDATE mqtt_connection SET parser_name = 'no-such-parser' WHERE id = %s", (odd,))
    big = quarantine(psql, site, cid, json.dumps(reading(pad="x" * 300_000)).encode(), NOW)
    gone = quarantine(psql, nobody, None, json.dumps(reading()).encode(), NOW)
    unknown = quarantine(psql, psql.execute("SELECT site_id FROM mqtt_connection WHERE id = %s", (odd,))
                         .fetchone()["site_id"], odd, json.dumps(reading()).encode(), NOW)
    future = quarantine(psql, site, cid, json.dumps(reading(ts=(NOW + timedelta(days=3)).isoformat())).encode(), NOW)
    report = run(database_url)
    assert report.total(replay.FAILED) == 4 and report.total(replay.STORED) == 0
    errors = {r["id"]: r for r in psql.execute("SELECT * FROM mqtt_quarantine")}
    assert "SITELINK_MAX_PAYLOAD" in errors[big]["replay_error"]
    assert errors[big]["replay_error_type"] == "VALIDATION_ERROR"
    assert "no connection" in errors[gone]["replay_error"]
    assert "unknown parser 'no-such-parser'" in errors[unknown]["replay_error"]
    assert errors[future]["replay_error_type"] == "VALIDATION_ERROR" and "ts" in errors[future]["replay_error"]
    assert psql.execute("SELECT count(*) FROM reading").fetchone()["count"] == 0


def test_an_old_payload_replayed_brings_no_device_back_online(psql, database_url):
    site, cid = add_site(psql, "sleepy")
    psql.execute("INSERT INTO gateway (site_id, name, last_seen_at, is_online) VALUES (%s, 'GW-01', %s, false)",
                 (site, NOW - timedelta(hours=1)))
    quarantine(psql, site, cid, json.dumps(reading(**{"S-1": {"t": 1.0}})).encode(), NOW - timedelta(days=2))
    assert run(database_url).total(replay.STORED) == 1
    gateway = psql.execute("SELECT * FROM gateway WHERE site_id = %s", (site,)).fetchone()
    assert gateway["is_online"] is False and gateway["last_seen_at"] == NOW - timedelta(hours=1)
    assert psql.execute("SELECT count(*) FROM reading").fetchone()["count"] == 1


def test_a_payload_postgresql_refuses_fails_alone(psql, database_url):
    site, cid = add_site(psql, "picky")
    psql.execute("ALTER TABLE gateway ADD CONSTRAINT no_poison CHECK (name <> 'POISON')")
    good = quarantine(psql, site, cid, json.dumps(reading()).encode(), NOW)
    bad = quarantine(psql, site, cid, json.dumps(reading(gateway="POISON")).encode(), NOW)
    report = run(database_url)
    assert (report.total(replay.STORED), report.total(replay.FAILED)) == (1, 1)
    rows = {r["id"]: r for r in psql.execute("SELECT * FROM mqtt_quarantine")}
    assert rows[good]["replay_outcome"] == "stored"
    assert rows[bad]["replay_outcome"] == "failed" and "no_poison" in rows[bad]["replay_error"]
