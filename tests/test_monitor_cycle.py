"""What keeps the monitor's cycle cheap does not make it miss anything.

- Claims are renewed a slice at a time (``Monitor._renew_if_due``): no step
  renews them all, yet every claim is renewed within a quarter lease and the
  children's fence never runs out (the fakes of test_monitor_states.py).
- The cycle reads the broker settings of a row only when its configuration
  hash is new to the monitor (``Fleet.snapshot``, a real PostgreSQL): a change
  made in psql (a password, a topic, is_active) is still seen and acted on,
  even one whose NOTIFY never came (the periodic cycle is the safety net).
- The cycle reads only the rows that changed since its previous read
  (``Fleet.snapshot``, migration 0012, a real PostgreSQL): every kind of
  change is still seen, by whoever and however it was written, in a
  transaction that was open during the previous read, or by the clock alone
  (a claim running out, a retry time coming); a claim renewed is not a change.
"""

from __future__ import annotations

import math

import psycopg
import pytest

from services import fleet as fleet_module
from services.fleet import Fleet
from services.monitor import RENEW_SLICES
from services.states import ConnState
from shared import config, db
from tests.support import wait_for
from tests.test_monitor_states import LEASE, SETTINGS, World, running

S = ConnState


# --- claims renewed a slice at a time (fakes) -------------------------------------------

def test_claims_are_renewed_a_slice_at_a_time_and_each_within_a_quarter_lease():
    world = World()
    renewals: list[list[int]] = []
    renew = world.fleet.renew

    def recording(ids, keep=None):
        renewals.append(list(ids))
        return renew(ids, keep=keep)
    world.fleet.renew = recording
    cids = list(range(1, 13))
    running(world, *cids)
    assert all(world.state(c) is S.RUNNING for c in cids)
    renewed_at = {c: world.record(c).lease_from for c in cids}
    worst = 0.0
    for _ in range(int(3 * LEASE * 4)):  # three leases, in steps of a quarter second
        world.pass_(0.25, notified=False)
        for c in cids:
            rec = world.record(c)
            assert rec.state is S.RUNNING, f"connection {c} lost its claim"
            if rec.lease_from != renewed_at[c]:
                worst = max(worst, rec.lease_from - renewed_at[c])
                renewed_at[c] = rec.lease_from
            # the children's fence always covers every claim's trusted lease
            assert world.processes.fence > world.clock()
    assert worst <= SETTINGS.renew_every + 0.25  # each renewed every quarter lease (a pass late at most)
    steps = [ids for ids in renewals if ids]
    assert steps, "nothing was renewed"
    quota = math.ceil(len(cids) / RENEW_SLICES)
    # After the first quarter lease (all claimed at once), no step renews more than its slice.
    assert max(len(ids) for ids in steps[RENEW_SLICES:]) <= quota
    assert {c for ids in steps for c in ids} == set(cids)
    # Every claim is still ours in the database: none was released by a step that skipped it.
    assert all(world.fleet.claim_of(c) == "mine" for c in cids)


# --- settings read only when the configuration changed (real PostgreSQL) ----------------

def _fleet(database_url: str) -> Fleet:
    settings = config.load({"SITELINK_DATABASE_URL": database_url, "SITELINK_INSTANCE_ID": "cycle-test"})
    fleet = Fleet(settings)
    assert fleet.join("cycle-test-lock") is None
    return fleet


def test_a_row_comes_with_its_settings_only_when_its_configuration_hash_is_new(stack, broker, reader):
    cid = stack.sql.add_site("hashes", port=broker.port, username="u", password="first-secret")
    fleet = reader.fleet
    [row] = [r for r in fleet.snapshot(held=[], holds=0).rows if r["id"] == cid]
    assert row["password"] == "first-secret" and row["site_name"] == "hashes"
    known = {cid: row["config_hash"]}
    [same] = [r for r in fleet.snapshot(held=[], holds=0, known=known).rows if r["id"] == cid]
    assert "password" not in same and "broker_host" not in same  # unchanged: no settings read
    assert same["config_hash"] == row["config_hash"] and same["is_active"]
    for change, check in [("password = 'second-secret'", lambda r: r["password"] == "second-secret"),
                          ("topics = ARRAY['sites/hashes/other/#']",
                           lambda r: r["topics"] == ["sites/hashes/other/#"])]:
        stack.sql.rows(f"UPDATE mqtt_connection SET {change} WHERE id = %s", cid)
        [new] = [r for r in fleet.snapshot(held=[], holds=0, known=known).rows if r["id"] == cid]
        assert new["config_hash"] != known[cid] and check(new)
        known[cid] = new["config_hash"]
    stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
    [off] = [r for r in fleet.snapshot(held=[cid], holds=0, known=known).rows if r["id"] == cid]
    assert off["is_active"] is False and "password" not in off  # is_active is read every cycle


def _row(snapshot, cid: int) -> dict | None:
    return next((r for r in snapshot.rows if r["id"] == cid), None)


class Reader:
    """A monitor's side of the reads: a Fleet that remembers the configuration
    hashes its snapshots bring, as a monitor's records do."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.known: dict[int, str] = {}

    def read(self, held=()):
        snap = self.fleet.snapshot(held=list(held), holds=0, known=self.known)
        self.known.update({r["id"]: r["config_hash"] for r in snap.rows})
        return snap


@pytest.fixture
def reader(database_url):
    fleet = _fleet(database_url)
    yield Reader(fleet)
    fleet.close()


def test_a_cycle_reads_only_the_rows_that_changed_and_misses_no_kind_of_change(stack, broker, database_url,
                                                                              reader):
    cid = stack.sql.add_site("changes", port=broker.port)
    quiet = stack.sql.add_site("changes-quiet", port=broker.port)
    first = reader.read()
    assert first.fresh is None and {cid, quiet} <= {r["id"] for r in first.rows}  # every row
    again = reader.read()
    assert again.fresh == frozenset() and _row(again, cid) == {k: v for k, v in _row(first, cid).items()
                                                               if k in _row(again, cid)}
    assert _row(again, quiet)["is_active"]  # unchanged rows are still there, as last read

    def changed(sql: str, *params) -> dict:
        stack.sql.rows(sql, *params)
        snap = reader.read()
        assert cid in snap.fresh and quiet not in snap.fresh, sql
        return _row(snap, cid)
    assert changed("UPDATE mqtt_connection SET status = 'connected' WHERE id = %s", cid)["status"] == "connected"
    assert changed("UPDATE mqtt_connection SET password = 'other', username = 'u' WHERE id = %s",
                   cid)["password"] == "other"  # with its new settings
    # Another monitor claims it: taken. Its renewals are no change; its release is.
    row = changed("UPDATE mqtt_connection SET claim_owner = 'other/x', claimed_by = 'other', "
                  "claim_expires_at = now() + interval '60 s' WHERE id = %s", cid)
    assert row["claim"] == "taken"
    stack.sql.rows("UPDATE mqtt_connection SET claim_expires_at = now() + interval '90 s' WHERE id = %s", cid)
    renewed = reader.read()
    assert cid not in renewed.fresh and _row(renewed, cid)["claim"] == "taken"
    assert 80 < renewed.expiry_in <= 90  # when to look again: the soonest expiry, as renewed
    # An expiry moved earlier or cleared by hand is a change.
    assert changed("UPDATE mqtt_connection SET claim_expires_at = now() - interval '1 s' "
                   "WHERE id = %s", cid)["claim"] == "free"
    changed("UPDATE mqtt_connection SET claim_expires_at = now() + interval '60 s' WHERE id = %s", cid)
    assert changed("UPDATE mqtt_connection SET claim_expires_at = NULL WHERE id = %s", cid)["claim"] == "free"
    # A write in replica mode (no ordinary trigger runs) and one that sets the
    # change marker itself are seen all the same.
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("UPDATE mqtt_connection SET status = 'error' WHERE id = %s", (cid,))
    snap = reader.read()
    assert cid in snap.fresh and _row(snap, cid)["status"] == "error"
    assert changed("UPDATE mqtt_connection SET status = 'connecting', monitor_change = '1' "
                   "WHERE id = %s", cid)["status"] == "connecting"
    assert stack.sql.value("SELECT monitor_change::text::bigint > 1 FROM mqtt_connection WHERE id = %s", cid)
    # A counter of the logger's is no change; a row deleted or added is.
    stack.sql.rows("UPDATE mqtt_connection SET connection_errors = connection_errors + 1, "
                   "error_message = 'x' WHERE id = %s", cid)
    assert cid not in reader.read().fresh
    stack.sql.rows("DELETE FROM site WHERE id = (SELECT site_id FROM mqtt_connection WHERE id = %s)", quiet)
    assert _row(reader.read(), quiet) is None
    added = stack.sql.add_site("changes-added", port=broker.port)
    snap = reader.read()
    assert added in snap.fresh and _row(snap, added)["site_name"] == "changes-added"


def test_a_change_committed_after_a_read_that_could_not_see_it_is_read_by_the_next(
        stack, broker, database_url, reader):
    """A transaction that changed a row before a read and committed after it:
    the read did not see it, and its change is older than the read."""
    cid = stack.sql.add_site("late-commit", port=broker.port)
    reader.read()
    with psycopg.connect(database_url) as late:
        late.execute("UPDATE mqtt_connection SET is_active = false WHERE id = %s", (cid,))
        before = reader.read([cid])  # the change is not committed yet
        assert cid not in before.fresh and _row(before, cid)["is_active"] is True
        late.commit()
    for _ in range(2):  # read at the next cycle, and still right after it
        after = reader.read([cid])
        assert _row(after, cid)["is_active"] is False


def test_every_row_is_read_again_after_a_failed_read_a_restored_database_and_periodically(
        stack, broker, reader, monkeypatch):
    cid = stack.sql.add_site("full-reads", port=broker.port)
    assert reader.read().fresh is None
    assert reader.read().fresh == frozenset()
    # As if PostgreSQL had been restored from a backup: its transaction ids went back.
    reader.fleet._seen.horizon += 10**9
    snap = reader.read()
    assert snap.fresh is None and _row(snap, cid) is not None
    # A read that failed (the database refused it): the next one trusts nothing it kept.
    with pytest.raises(db.DatabaseError):
        reader.fleet.snapshot(held=["not an id"], holds=0)
    assert reader.read().fresh is None
    monkeypatch.setattr(fleet_module, "FULL_READ_EVERY", 0.0)
    assert reader.read().fresh is None


def test_a_claim_that_runs_out_and_a_retry_time_that_comes_are_read_as_changes(stack, broker, reader):
    """Nobody writes the row: only the clock makes it free or due, and the read sees it."""
    taken = stack.sql.add_site("clock-taken", port=broker.port)
    later = stack.sql.add_site("clock-later", port=broker.port)
    stack.sql.rows("UPDATE mqtt_connection SET claim_owner = 'other/x', claimed_by = 'other', "
                   "claim_expires_at = now() + interval '1 s' WHERE id = %s", taken)
    stack.sql.rows("UPDATE mqtt_connection SET mqtt_next_retry = now() + interval '1.5 s' WHERE id = %s", later)
    snap = reader.read()
    assert _row(snap, taken)["claim"] == "taken" and _row(snap, later)["is_due"] is False
    assert 0 < snap.expiry_in <= 1 and 0 < snap.due_in <= 1.5
    assert {taken, later}.isdisjoint(reader.read().fresh)
    free = wait_for(lambda: _row(s := reader.read(), taken)["claim"] == "free" and s,
                    timeout=10, what="the expired claim to be read as free")
    assert taken in free.fresh
    due = wait_for(lambda: _row(s := reader.read(), later)["is_due"] and s,
                   timeout=10, what="the retry time to be read as come")
    assert later in due.fresh
    assert due.due_in is None or due.due_in > 1


def test_a_change_whose_notify_never_came_is_acted_on_by_the_periodic_cycle(stack, broker):
    cid = stack.sql.add_site("no-notify", port=broker.port, topics=["sites/no-notify/a/#"])
    other = stack.sql.add_site("no-notify-other", port=broker.port)
    stack.start("logger", "monitor", SITELINK_MONITOR_INTERVAL="2")
    stack.sql.wait_status(cid, "connected")
    stack.sql.wait_status(other, "connected")
    # Triggers off for this one statement (replica mode): no NOTIFY reaches the monitor,
    # as if it had been lost; only the periodic read can notice the new topic.
    with psycopg.connect(stack.sql.url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute("UPDATE mqtt_connection SET topics = ARRAY['sites/no-notify/b/#'] WHERE id = %s", (cid,))
    rows = wait_for(lambda: stack.sql.rows("SELECT message FROM mqtt_connection_log WHERE connection_id = %s "
                                           "AND message LIKE 'settings changed%%'", cid),
                    timeout=20, what="the monitor to notice the change at its periodic cycle")
    assert rows[0]["message"] == "settings changed: topics"
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE connection_id = %s "
                                     "AND message LIKE 'Successfully connected%%'", cid) == 2,
             timeout=20, what="the child restarted with the new topic")
    assert not stack.sql.rows("SELECT 1 FROM mqtt_connection_log WHERE connection_id = %s "
                              "AND message LIKE 'settings changed%%'", other)


def test_renewal_steps_are_not_retried_in_a_busy_loop_while_postgres_is_down():
    world = World()
    running(world, 1, 2, 3)
    world.fleet.down = True
    world.fleet.calls.clear()
    for _ in range(200):  # 10 s of passes, 50 ms apart (the loop as it runs between cycles)
        world.pass_(0.05, notified=False)
    renewals = world.fleet.calls.count("renew")
    assert 1 <= renewals <= 10 / min(SETTINGS.renew_every / RENEW_SLICES, max(1.0, SETTINGS.db_bound)) + 2
    world.fleet.down = False
    world.run_for(SETTINGS.renew_every)
    assert all(world.state(c) is S.RUNNING for c in (1, 2, 3))
