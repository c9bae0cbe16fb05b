"""The monitor's decisions, with the operating system and the database replaced
by fakes: no process, no socket, a clock the test moves. Real-process tests of
the same behaviours are in test_healing.py, test_nothing_lost.py and test_fleet.py."""

from __future__ import annotations

import hashlib
import signal

import psycopg
import pytest
from loguru import logger

from services import fleet as fleet_module
from services.fleet import Fleet, MembershipLost, Occupied, Outage, Snapshot, share
from services.monitor import CLAIM_BATCH, Monitor, Record
from services.processes import Exit, SpawnError
from services.states import CHILD_TRANSITIONS, ChildStatus, ConnState, IllegalTransition
from services.zygote import SpawnRefused
from shared import config, db, exitcodes
from shared.connections import BROKER_FIELDS
from shared.protocol import ConnectionLog, StatusChange
from tests.support import free_port

S = ConnState
ME = "me/host/1/1"
LEASE = 40.0  # renewed every 10 s, trusted for 30 s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcesses:
    """The OS side: children are numbers; the test says when they exit."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.children: dict[int, object] = {}  # pid -> settings
        self.signals: list[tuple[int, int]] = []
        self.exits: list[Exit] = []
        self.fence = 0.0
        self.next_pid = 100
        self.instance_free = True
        self.spawn_fails = False
        self.refused: set[int] = set()  # connection ids whose settings the zygote refuses
        self.stop_on_sigterm = True  # a well-behaved child exits when told to
        self.closed = False

    lock_key = "host:boot:1:2"

    def acquire_instance(self) -> bool:
        return self.instance_free

    def spawn_many(self, many) -> list:
        if self.spawn_fails:
            return [SpawnError("the zygote could not fork") for _ in many]
        assert self.clock() < self.fence, "a child started without a fence covering it"
        pids: list = []
        for settings in many:
            if settings.connection_id in self.refused:
                pids.append(SpawnRefused("the zygote refused these settings"))
                continue
            self.next_pid += 1
            self.children[self.next_pid] = settings
            pids.append(self.next_pid)
        return pids

    def signal(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))
        if pid in self.children and (sig == signal.SIGKILL or self.stop_on_sigterm):
            self.exit(pid, code=0 if sig == signal.SIGTERM else None, sig=None if sig == signal.SIGTERM else sig)

    def exit(self, pid: int, code: int | None = 0, sig: int | None = None) -> None:
        settings = self.children.pop(pid)
        status = sig if sig is not None else code << 8  # as waitpid encodes them
        self.exits.append(Exit(settings.connection_id, pid, status))

    def reap(self) -> list[Exit]:
        found, self.exits = self.exits, []
        return found

    def publish_fence(self, until: float) -> None:
        self.fence = until

    def pause(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def close(self) -> None:
        self.closed = True


def config_hash(row: dict) -> str:
    return hashlib.md5(repr([row.get(f) for f in BROKER_FIELDS]).encode()).hexdigest()


class FakeFleet:
    """The database side: rows and claims in memory, with PostgreSQL's rules."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.rows: dict[int, dict] = {}
        self.claims: dict[int, list] = {}  # id -> [owner, expires_at]
        self.epochs: dict[int, int] = {}
        self.others: list[int | None] = []  # capacities of the other live monitors
        self.down = False
        self.occupied: Occupied | None = None
        self.member = True
        self.notifications = 0
        self.left = False
        self.calls: list[str] = []
        self.locked: set[int] = set()  # rows another transaction holds: skipped by claims

    def add(self, cid: int, **columns) -> dict:
        row = {"id": cid, "site_id": cid, "broker_host": "broker", "broker_port": 1883, "topics": ["t/#"],
               "is_active": True, "status": "disconnected", "next_retry": None, **columns}
        self.rows[cid] = row
        return row

    def claim_of(self, cid: int) -> str:
        owner, expires = self.claims.get(cid, (None, 0.0))
        if expires <= self.clock():
            return "free"
        return "mine" if owner == ME else "taken"

    def take(self, cid: int, owner: str = "other") -> None:
        """Another monitor claims it (only possible once it is free)."""
        assert self.claim_of(cid) == "free"
        self.claims[cid] = [owner, self.clock() + LEASE]
        self.epochs[cid] = self.epochs.get(cid, 0) + 1

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise db.DatabaseUnavailable("OperationalError: connection refused")

    def join(self, lock_key: str):
        self._call("join")
        return self.occupied

    def snapshot(self, held: list[int], holds: int, known=None) -> Snapshot:
        self._call("snapshot")
        if not self.member:
            raise MembershipLost("another monitor took instance id 'me' over")
        rows, expiries, dues = [], [], []
        for cid, row in sorted(self.rows.items()):
            owner = self.claims.get(cid, [None])[0]
            due_in = None if row["next_retry"] is None else row["next_retry"] - self.clock()
            claim = self.claim_of(cid)
            if row["is_active"] and claim == "taken":
                expiries.append(self.claims[cid][1] - self.clock())
            if row["is_active"] and claim == "free" and due_in is not None and due_in > 0:
                dues.append(due_in)
            rows.append({**row, "config_hash": config_hash(row), "claim": claim,
                         "claimed_by": owner, "claim_epoch": self.epochs.get(cid, 0),
                         "is_due": due_in is None or due_in <= 0})
        return Snapshot(rows, [None, *self.others], expiry_in=min(expiries, default=None),
                        due_in=min(dues, default=None))

    def claim(self, ids: list[int], limit: int) -> dict[int, int]:
        self._call("claim")
        won = {}
        for cid in sorted(ids, key=lambda c: (self.claim_of(c) != "mine", c)):
            if (len(won) < limit and cid in self.rows and cid not in self.locked
                    and self.claim_of(cid) in ("free", "mine")):
                self.claims[cid] = [ME, self.clock() + LEASE]
                self.epochs[cid] = won[cid] = self.epochs.get(cid, 0) + 1
        return won

    def renew(self, ids: list[int], keep: list[int] | None = None) -> set[int]:
        self._call("renew")
        renewed = {cid for cid in ids if self.claim_of(cid) == "mine"}
        for cid in renewed:
            self.claims[cid][1] = self.clock() + LEASE
        kept = renewed if keep is None else renewed | (set(keep) - set(ids))
        for cid in [c for c in self.claims if self.claims[c][0] == ME and c not in kept]:
            del self.claims[cid]
        return renewed

    def release(self, ids: list[int]) -> None:
        self._call("release")
        for cid in ids:
            if self.claims.get(cid, [None])[0] == ME:
                del self.claims[cid]
        self.notifications += 1

    def leave(self) -> None:
        self._call("leave")
        for cid in [c for c in self.claims if self.claims[c][0] == ME]:
            del self.claims[cid]
        self.left = True
        self.notifications += 1

    def mark_offline(self) -> dict:
        self._call("mark_offline")
        return {}

    def listen_now(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeEvents:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, event) -> None:
        self.sent.append(event)

    def statuses(self, cid: int | None = None) -> list[StatusChange]:
        return [e for e in self.sent if isinstance(e, StatusChange) and cid in (None, e.connection_id)]


BASE = {"SITELINK_INSTANCE_ID": "me", "SITELINK_CLAIM_LEASE": str(LEASE), "SITELINK_MONITOR_INTERVAL": "5",
        "SITELINK_STOP_GRACE": "3", "SITELINK_CRASH_LIMIT": "2", "SITELINK_RESTART_BASE": "1",
        "SITELINK_RESTART_CAP": "8", "SITELINK_RETRY_COOLDOWN": "300"}
SETTINGS = config.load(BASE)


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.processes = FakeProcesses(self.clock)
        self.fleet = FakeFleet(self.clock)
        self.events = FakeEvents()
        self.monitor = Monitor(SETTINGS, self.processes, self.fleet, self.events, clock=self.clock)

    def record(self, cid: int) -> Record:
        return self.monitor.records[cid]

    def state(self, cid: int) -> ConnState:
        return self.monitor.records[cid].state

    def pass_(self, seconds: float = 0.0, notified: bool = True) -> None:
        """One pass of the loop after ``seconds``: reap, cycle if due or ``notified``
        (as PostgreSQL does after each change of a row), leases, stops."""
        self.clock.advance(seconds)
        self.monitor.reap()
        if notified or self.monitor.wake_now or self.clock() >= self.monitor.next_cycle:
            self.monitor.wake_now = False
            self.monitor.cycle()
        elif self.monitor.member and self.clock() >= self.monitor.next_renewal:
            self.monitor._renew_between_cycles()
        self.monitor.enforce_leases()
        self.monitor.escalate_stops()

    def run_for(self, seconds: float, step: float = 1.0) -> None:
        """The loop's passes over ``seconds`` (claims renewed on time)."""
        end = self.clock() + seconds
        while self.clock() < end:
            self.pass_(min(step, end - self.clock()), notified=False)

    def pid(self, cid: int) -> int:
        pid = self.record(cid).pid
        assert pid is not None
        return pid


@pytest.fixture
def world() -> World:
    return World()


def running(world: World, *cids: int) -> None:
    for cid in cids:
        world.fleet.add(cid)
    world.pass_()
    assert all(world.state(cid) is S.RUNNING for cid in cids)


# --- start, stop ---------------------------------------------------------------------

def test_an_active_row_is_claimed_under_a_new_epoch_and_started_inside_its_fence(world):
    world.fleet.add(1)
    world.pass_()
    rec = world.record(1)
    assert rec.state is S.RUNNING and rec.epoch == 1
    [settings] = world.processes.children.values()
    assert settings.epoch == 1 and settings.connection_id == 1
    assert world.processes.fence == world.clock() + SETTINGS.lease_trusted
    assert world.fleet.claim_of(1) == "mine"


def test_deactivation_stops_the_child_and_releases_once_the_status_says_so(world):
    running(world, 1)
    pid = world.pid(1)
    world.fleet.rows[1]["is_active"] = False
    world.fleet.rows[1]["status"] = "connected"
    world.pass_()
    assert (pid, signal.SIGTERM) in world.processes.signals
    world.pass_()  # reaped: nothing runs, the claim is kept until the status is settled
    assert world.state(1) is S.RELEASING and world.fleet.claim_of(1) == "mine"
    world.fleet.rows[1]["status"] = "disconnected"  # the child's last word, committed
    world.pass_(5)
    assert world.state(1) is S.IDLE and world.fleet.claim_of(1) == "free"
    assert not world.events.statuses(1)  # the child reported it itself


def test_a_settings_change_restarts_the_child_under_a_new_epoch(world):
    running(world, 1)
    world.fleet.rows[1]["broker_port"] = 1884
    world.pass_()
    assert world.state(1) is S.STOPPING
    world.pass_()
    rec = world.record(1)
    assert rec.state is S.RUNNING and rec.epoch == 2 and rec.running.broker_port == 1884
    [log] = [e for e in world.events.sent if isinstance(e, ConnectionLog) and e.message.startswith("settings changed")]
    assert log.message == "settings changed: broker_port"


def test_a_deleted_row_stops_its_child_and_forgets_it(world):
    running(world, 1)
    del world.fleet.rows[1]
    world.pass_()
    world.pass_()
    assert 1 not in world.monitor.records and not world.processes.children


# --- crashes, holds, cool-downs ----------------------------------------------------------

def test_crashes_back_off_then_leave_the_connection_stopped_until_its_row_changes(world):
    running(world, 1)
    for attempt in range(1, 4):
        world.processes.exit(world.pid(1), sig=signal.SIGKILL)
        world.pass_()
        status = world.events.statuses(1)[-1]
        assert status.status == "error" and status.final and status.epoch == attempt
        if attempt <= SETTINGS.crash_limit:
            assert world.state(1) is S.BACKOFF and "restarting it in" in status.message
            world.pass_(SETTINGS.restart_cap)  # the backoff is over
            assert world.state(1) is S.RUNNING and world.record(1).epoch == attempt + 1
    assert world.state(1) is S.FATAL and "crashed 3 times in a row" in status.message
    world.run_for(600)
    assert world.state(1) is S.FATAL and not world.processes.children  # no flapping
    world.fleet.rows[1]["keepalive"] = 30
    world.pass_()
    assert world.state(1) is S.RUNNING and world.record(1).crashes == 0


def test_a_child_that_gave_up_waits_out_the_cool_down(world):
    running(world, 1)
    world.processes.exit(world.pid(1), code=exitcodes.GAVE_UP)
    world.pass_()
    assert world.state(1) is S.HELD
    world.run_for(SETTINGS.retry_cooldown - 1)
    assert world.state(1) is S.HELD and not world.processes.children
    world.run_for(2)
    assert world.state(1) is S.RUNNING


def test_unusable_settings_are_reported_once_and_held_until_the_row_changes(world):
    world.fleet.add(1, parser_name="nope")
    world.run_for(15)
    [status] = world.events.statuses(1)
    assert status.status == "error" and "unknown parser" in status.message and status.epoch == 1
    assert world.state(1) is S.HELD and not world.processes.children
    world.fleet.rows[1]["parser_name"] = "json"
    world.pass_()
    assert world.state(1) is S.RUNNING


def test_a_child_that_reports_unusable_settings_is_held_until_the_row_changes(world):
    running(world, 1)
    world.processes.exit(world.pid(1), code=exitcodes.CONFIG)
    world.run_for(3600, step=5)
    assert world.state(1) is S.HELD and not world.processes.children
    world.fleet.rows[1]["topics"] = ["other/#"]
    world.pass_()
    assert world.state(1) is S.RUNNING and world.record(1).running.reset_session


def test_a_child_that_does_not_stop_is_killed_after_the_grace_period(world):
    running(world, 1)
    world.processes.stop_on_sigterm = False
    pid = world.pid(1)
    world.fleet.rows[1].update(is_active=False, status="connected")
    world.pass_()
    world.pass_(SETTINGS.stop_grace - 0.5)
    assert (pid, signal.SIGKILL) not in world.processes.signals
    world.pass_(1)
    world.pass_()
    assert world.processes.signals.count((pid, signal.SIGKILL)) == 1
    # Killed, it could not say so itself: the monitor settles its status, then releases it.
    assert world.state(1) is S.RELEASING
    [status] = world.events.statuses(1)
    assert status.status == "disconnected" and status.final and status.epoch == 1


def test_in_one_batch_of_starts_a_refused_row_is_held_and_the_others_run(world):
    world.processes.refused = {2}
    for cid in (1, 2, 3):
        world.fleet.add(cid)
    world.pass_()
    assert [world.state(cid) for cid in (1, 2, 3)] == [S.RUNNING, S.HELD, S.RUNNING]
    assert sorted(s.connection_id for s in world.processes.children.values()) == [1, 3]
    [status] = world.events.statuses(2)
    assert status.status == "error" and "cannot start: the zygote refused" in status.message


def test_a_failed_spawn_backs_off(world):
    world.processes.spawn_fails = True
    world.fleet.add(1)
    world.pass_()
    assert world.state(1) is S.BACKOFF
    world.processes.spawn_fails = False
    world.pass_(SETTINGS.restart_cap)
    assert world.state(1) is S.RUNNING


def test_the_monitor_refuses_an_illegal_transition(world):
    world.fleet.add(1)
    world.monitor.records[1] = Record(1)
    with pytest.raises(IllegalTransition):
        world.monitor.change_state(world.record(1), S.RUNNING)


def test_the_child_status_table_refuses_what_a_child_never_does():
    assert ChildStatus.CONNECTING not in CHILD_TRANSITIONS[ChildStatus.CONNECTED]
    assert ChildStatus.CONNECTED not in CHILD_TRANSITIONS[ChildStatus.DISCONNECTED]
    assert set(CHILD_TRANSITIONS) == set(ChildStatus)


# --- the lease is the only fence -----------------------------------------------------------

def test_an_outage_shorter_than_the_lease_touches_no_child(world):
    running(world, 1, 2)
    fence = world.processes.fence
    world.fleet.down = True
    for _ in range(5):
        world.pass_(5)  # 25 s of failed cycles: less than the 30 s the lease is trusted
    assert not world.processes.signals and world.state(1) is S.RUNNING
    world.fleet.down = False
    world.pass_(5)
    assert world.record(1).lease_from == world.clock() and world.processes.fence > fence
    assert not world.processes.signals and world.monitor.outage.since is None


def test_an_outage_longer_than_the_lease_stops_the_children_in_time_and_they_restart_after(world):
    running(world, 1)
    world.fleet.down = True
    trusted_until = world.record(1).lease_from + SETTINGS.lease_trusted
    while world.clock() < trusted_until - 1:
        world.pass_(1)
    assert world.state(1) is S.RUNNING
    world.pass_(1.5)
    world.pass_(notified=False)
    assert world.state(1) is S.IDLE  # stopped (and exited) before PostgreSQL's lease ends
    assert world.clock() < trusted_until + 1 < world.fleet.claims[1][1]
    world.fleet.down = False
    world.pass_(SETTINGS.claim_lease)
    assert world.state(1) is S.RUNNING and world.record(1).epoch == 2


def test_a_fenced_child_is_no_crash(world):
    running(world, 1)
    world.processes.exit(world.pid(1), code=exitcodes.FENCED)
    world.pass_()
    assert world.record(1).crashes == 0 and not world.events.statuses(1)
    world.pass_()
    assert world.state(1) is S.RUNNING


def test_a_monitor_that_wakes_from_a_freeze_does_not_fight_for_what_others_took(world):
    running(world, 1, 2)
    # Frozen for longer than the lease: its children fenced themselves, others took over.
    world.clock.advance(LEASE + 5)
    for cid in (1, 2):
        world.processes.exit(world.pid(cid), code=exitcodes.FENCED)
        world.fleet.take(cid)
    world.fleet.others = [None]
    world.pass_()
    world.pass_()
    assert not world.processes.children and world.state(1) is S.IDLE and world.state(2) is S.IDLE
    assert set(world.fleet.calls) >= {"snapshot"} and "claim" in world.fleet.calls


def test_a_claim_of_a_monitor_that_died_is_taken_the_moment_it_runs_out(world):
    """Not up to an interval later: the cycle before the expiry schedules the next one at it."""
    world.fleet.others = [None]
    world.pass_()  # our cycles: every 5 s from here
    world.clock.advance(2.5)
    world.fleet.add(1)
    world.fleet.take(1)  # held by a monitor that then dies: nobody renews it
    expiry = world.fleet.claims[1][1]  # between two of our cycles
    world.pass_()  # the new row, as its NOTIFY says: taken by another
    while world.state(1) is S.IDLE:
        assert world.monitor.next_cycle <= expiry + 0.1  # never a cycle that overshoots it
        world.clock.now = world.monitor.next_cycle  # the loop waits exactly until its next cycle
        world.pass_(notified=False)
    assert world.state(1) is S.RUNNING and 0 <= world.clock() - expiry < 0.1


def test_a_claim_found_taken_stops_the_child_at_once(world):
    running(world, 1)
    pid = world.pid(1)
    world.fleet.claims[1] = ["other", world.clock() + LEASE]
    world.pass_()
    assert (pid, signal.SIGTERM) in world.processes.signals
    world.pass_()
    assert world.state(1) is S.IDLE and world.fleet.claims[1][0] == "other"


def test_a_lost_membership_stops_everything(world):
    running(world, 1)
    world.fleet.member = False
    world.pass_(5)
    world.pass_()
    assert world.state(1) is S.IDLE and not world.monitor.member


def test_a_second_monitor_with_the_same_id_waits(world):
    world.fleet.add(1)
    world.fleet.occupied = Occupied("elsewhere", 42, 1.5)
    world.pass_()
    world.pass_(5)
    assert "snapshot" not in world.fleet.calls and not world.processes.children
    world.fleet.occupied = None
    world.pass_(5)
    assert world.state(1) is S.RUNNING


def test_a_monitor_waits_while_a_predecessor_of_its_instance_still_runs_here(world):
    world.fleet.add(1)
    world.processes.instance_free = False
    world.pass_()
    assert "join" not in world.fleet.calls
    world.processes.instance_free = True
    world.pass_(0.5)
    assert world.state(1) is S.RUNNING


# --- work shared across monitors ----------------------------------------------------------

def test_the_share_rule():
    assert share(600, [None, None, None], None) == 200
    assert share(601, [None, None, None], None) == 201
    assert share(10, [None, None, None], None) == 4
    assert share(0, [None], None) == 0
    # A capped monitor's unused share goes to the others.
    assert share(600, [50, None, None], None) == 275
    assert share(600, [50, None, None], 50) == 50
    # All capped below the work: each at its cap.
    assert share(600, [100, 100], 100) == 100


def test_a_joining_monitor_gets_the_excess_by_hand_over(world):
    running(world, *range(1, 7))
    world.fleet.others = [None]  # a second monitor joined: share 3 of 6
    world.pass_(5)
    stopping = sorted(cid for cid, r in world.monitor.records.items() if r.state is S.STOPPING)
    assert stopping == [4, 5, 6]
    assert all(world.fleet.claim_of(cid) == "mine" for cid in stopping)  # not released before they exit
    world.pass_()
    assert all(world.fleet.claim_of(cid) == "free" for cid in stopping) and world.fleet.notifications
    world.pass_(5)
    assert sum(r.state is S.RUNNING for r in world.monitor.records.values()) == 3


def test_a_monitor_claims_only_its_share_and_takes_more_when_another_leaves(world):
    world.fleet.others = [None]
    for cid in range(1, 7):
        world.fleet.add(cid)
    for cid in (4, 5, 6):
        world.fleet.take(cid)
    world.pass_()
    assert sorted(c for c, r in world.monitor.records.items() if r.state is S.RUNNING) == [1, 2, 3]
    world.fleet.others = []
    for cid in (4, 5, 6):
        del world.fleet.claims[cid]  # it left cleanly, releasing everything
    world.pass_()
    assert all(r.state is S.RUNNING for r in world.monitor.records.values())


def test_rows_skipped_because_they_were_locked_are_claimed_soon_after(world):
    world.fleet.add(1)
    world.fleet.add(2)
    world.fleet.locked = {2}  # the logger is writing its status
    world.pass_()
    assert world.state(1) is S.RUNNING and world.state(2) is S.IDLE
    world.fleet.locked = set()
    world.pass_(0.3, notified=False)
    assert world.state(2) is S.RUNNING


def test_more_rows_than_a_batch_are_claimed_by_cycles_that_follow_at_once(world):
    for cid in range(1, 2 * CLAIM_BATCH + 51):
        world.fleet.add(cid)
    world.pass_()
    assert sum(r.state is S.RUNNING for r in world.monitor.records.values()) == CLAIM_BATCH
    assert world.monitor.wake_now  # the loop's wait does not wait then
    world.pass_(notified=False)
    world.pass_(notified=False)
    assert all(r.state is S.RUNNING for r in world.monitor.records.values())
    assert not world.monitor.wake_now
    # One fence covers every child, published before the first of them.
    assert world.processes.fence == world.clock() + SETTINGS.lease_trusted


def test_a_batch_cut_short_by_locked_rows_is_retried_soon_not_in_a_busy_loop(world):
    for cid in range(1, 2 * CLAIM_BATCH + 1):
        world.fleet.add(cid)
    world.fleet.locked = set(range(1, CLAIM_BATCH + 2))  # more than a batch wanted, fewer won
    world.pass_()
    assert not world.monitor.wake_now
    assert world.monitor.next_cycle <= world.clock() + 0.25
    world.fleet.locked = set()
    world.pass_(0.3, notified=False)
    world.pass_(notified=False)
    assert all(r.state is S.RUNNING for r in world.monitor.records.values())


def test_a_restart_skipped_because_its_row_was_locked_is_tried_again_soon(world):
    running(world, 1)
    world.processes.exit(world.pid(1), sig=signal.SIGKILL)
    world.pass_()
    world.fleet.locked = {1}
    world.run_for(SETTINGS.restart_cap)  # due, but its row is locked by a status being written
    assert world.state(1) is S.BACKOFF and world.fleet.claim_of(1) == "mine"
    world.fleet.locked = set()
    world.pass_(0.3, notified=False)
    assert world.state(1) is S.RUNNING


def test_a_connection_handed_over_while_its_retry_is_pending_starts_when_it_is_due(world):
    world.fleet.add(1, next_retry=world.clock() + 3)  # its previous child's next attempt
    world.pass_()
    assert world.state(1) is S.IDLE
    world.pass_(3.02, notified=False)  # before the next poll (5 s)
    assert world.state(1) is S.RUNNING


def test_an_inactive_row_nobody_runs_is_reported_disconnected_once(world):
    world.fleet.add(1, is_active=False, status="connected")
    world.pass_()
    world.pass_(5)
    [status] = world.events.statuses(1)
    assert status.status == "disconnected" and status.final and status.epoch == 1
    world.fleet.rows[1]["status"] = "disconnected"
    world.pass_(5)
    world.pass_(5)
    assert world.state(1) is S.IDLE and world.fleet.claim_of(1) == "free" and len(world.events.statuses(1)) == 1


def test_a_clean_stop_stops_every_child_then_releases_everything(world):
    running(world, 1, 2)
    world.monitor.shutdown()
    assert not world.processes.children and world.fleet.left and world.processes.closed
    assert world.fleet.claim_of(1) == "free"


# --- outage logging ---------------------------------------------------------------------

def test_an_outage_is_logged_once_at_start_slowly_while_it_lasts_and_once_at_the_end():
    clock = Clock()
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        outage = Outage("a", clock)
        exc = db.DatabaseUnavailable("OperationalError: connection refused")
        for _ in range(130):
            outage.failed("reading the connections", exc, "no connection running here")
            clock.advance(1)
        outage.ended()
        outage.ended()
    finally:
        logger.remove(sink)
    assert [line.split(" (")[0] for line in lines] == [
        "monitor a: PostgreSQL unreachable", "monitor a: PostgreSQL still unreachable after 60 s",
        "monitor a: PostgreSQL still unreachable after 120 s", "monitor a: PostgreSQL reachable again after 130.0 s"]
    assert fleet_module.OUTAGE_REPORT_EVERY == 60


def test_driver_messages_become_one_line():
    with pytest.raises(db.DatabaseUnavailable) as caught:
        with db.translate_errors():
            raise psycopg.OperationalError('connection failed: connection to server at "127.0.0.1" failed:\n'
                                           '\tIs the server running on that host?\n')
    assert "\n" not in str(caught.value) and "failed: Is the server" in str(caught.value)


def test_the_listen_connection_is_retried_with_backoff_not_on_every_pass():
    fleet = Fleet(config.load({"SITELINK_DATABASE_URL": f"postgresql://x@127.0.0.1:{free_port()}/x"}))
    with pytest.raises(db.DatabaseUnavailable):
        fleet.listen()  # nothing listens there: refused at once
    assert fleet.listen() is False  # not tried again before its backoff


def test_every_database_call_of_the_monitor_is_bounded_well_inside_the_lease():
    settings = config.load({"SITELINK_CLAIM_LEASE": "90"})
    options = db.connect_options("postgresql://u@h/d?options=-c%20search_path%3Dx", settings.db_bound)
    assert settings.db_bound == 5.0 < settings.claim_lease - settings.lease_trusted
    assert options["options"] == ("-c search_path=x -c statement_timeout=5000 "
                                  "-c idle_in_transaction_session_timeout=5000")
    assert options["tcp_user_timeout"] == 5000 and options["keepalives"] == 1
    assert options["connect_timeout"] == 5
    assert config.load({"SITELINK_CLAIM_LEASE": "3", "SITELINK_MONITOR_INTERVAL": "1"}).db_bound == 0.75
