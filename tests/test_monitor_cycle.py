"""What keeps the monitor's cycle cheap does not make it miss anything.

- Claims are renewed a slice at a time (``Monitor._renew_if_due``): no step
  renews them all, yet every claim is renewed within a quarter lease and the
  children's fence never runs out (the fakes of test_monitor_states.py).
- The cycle reads the broker settings of a row only when its configuration
  hash is new to the monitor (``Fleet.snapshot``, a real PostgreSQL): a change
  made in psql (a password, a topic, is_active) is still seen and acted on,
  even one whose NOTIFY never came (the periodic cycle is the safety net).
"""

from __future__ import annotations

import math

import psycopg

from services.fleet import Fleet
from services.monitor import RENEW_SLICES
from services.states import ConnState
from shared import config
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


def test_a_row_comes_with_its_settings_only_when_its_configuration_hash_is_new(stack, broker, database_url):
    cid = stack.sql.add_site("hashes", port=broker.port, username="u", password="first-secret")
    fleet = _fleet(database_url)
    try:
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
    finally:
        fleet.close()


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
