"""The monitor: the only process that decides which connections run here.

Several monitors on one PostgreSQL are one fleet (services/fleet.py): each
holds about its share of the active connections, and runs a connection only
while it holds its claim. The loop (``run``) is the same few steps each pass,
as supervisor's:

1. signals: SIGTERM or SIGINT ends the loop;
2. reap: every child that exited changes its connection's state at once;
3. cycle, every ``SITELINK_MONITOR_INTERVAL`` seconds, when a NOTIFY came
   (a row changed; a monitor joined, left or released connections), when a
   restart is due:
   a. heartbeat, the live monitors and the rows that changed since the last
      cycle (the others as it read them then: ``Fleet.snapshot``), in one transaction;
   b. reconcile each row with its record: stop what became inactive, was
      deleted or changed, or whose claim was lost; settle statuses;
   c. renew the oldest share of the claims (each is renewed every quarter
      lease, a slice at a time: ``_renew_if_due``), release what is to go;
   d. balance: hand over what exceeds this monitor's share, claim up to it,
      start a child for each connection won;
   e. mark devices offline; log the cycle;
   (no cycle due but a renewal step is: that step alone, without reading the rows);
4. leases: a claim not renewed for three quarters of the lease (by this
   monitor's own clock: PostgreSQL may be unreachable) stops its child;
5. stops: SIGKILL what did not stop within the grace period;
6. wait for a signal, an ack, a notification or the next deadline.

Each connection has one ``Record`` whose state (services/states.py) changes
only in ``change_state``, which refuses what ``TRANSITIONS`` does not allow;
every call that changes a state is labelled ``# OLD -> NEW``. The operating
system is behind ``Processes`` (services/processes.py), the database behind
``Fleet`` (services/fleet.py): both replaceable by fakes, so the decisions are
tested without a process (tests/test_monitor_states.py).

SIGTERM or SIGINT stops every child (SIGTERM, a grace period, SIGKILL), then
releases every claim so that the other monitors take over at once. Each child
asks the kernel to be signalled if the monitor dies anyway, and stops by
itself when the monitor's fence passes (services/connection.py).
"""

from __future__ import annotations

import dataclasses
import enum
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from loguru import logger

from services.fleet import SLACK, Fleet, MembershipLost, Outage, Snapshot, share
from services.processes import Exit, Processes, SpawnError
from services.zygote import SpawnRefused
from services.states import CLAIMED, TRANSITIONS, WITH_CHILD, ConnState, IllegalTransition
from shared import backoff, boot, config, curve, db, exitcodes, runfile
from shared.connections import ConnectionSettings
from shared.events import EventSender
from shared.protocol import ConnectionLog, DeviceChange, MonitorCycle, StatusChange
from shared.signals import SignalPipe

S = ConnState
#: A child that ran at least this long before crashing starts its backoff afresh.
STABLE_AFTER = 60.0
#: Most new connections one cycle claims: between two cycles the monitor
#: learns of monitors that joined, so a fleet starting together splits the
#: work at once instead of one monitor taking everything and handing it back.
CLAIM_BATCH = 100
#: When a claim got fewer rows than asked (some were locked), the next cycle comes this soon.
CLAIM_RETRY = 0.25
#: Claims are renewed in this many steps per quarter lease, each the oldest share of them (and
#: any that would be due before the next step): one statement over 1000 rows, with the CHECK
#: constraints and triggers of mqtt_connection, took 36 ms, a quarter of it 10 ms.
RENEW_SLICES = 4
#: Devices are looked for to mark offline at most this often, as a share of the
#: shortest SITELINK_*_OFFLINE_AFTER (30 s of the default 600 s): three UPDATEs
#: every cycle of every monitor found nothing new nearly always.
OFFLINE_SCAN_SHARE = 1 / 20
FOREVER = float("inf")


class After(enum.IntEnum):
    """What follows a child's stop, weakest first: a later reason may only strengthen it."""

    RESTART = 1  # STOPPING -> BACKOFF: the settings changed
    RELEASE = 2  # STOPPING -> RELEASING: inactive, handed over, the monitor stops
    DROP = 3     # STOPPING -> IDLE: the claim is not ours any more


@dataclass
class Record:
    """Everything this monitor knows of one connection."""

    connection_id: int
    state: ConnState = S.IDLE
    # The row as last read.
    config_hash: str | None = None
    settings: ConnectionSettings | None = None
    is_active: bool = True
    status: str = "disconnected"
    # Our claim: its epoch, and when (runfile.clock) the statement that last
    # claimed or renewed it began.
    epoch: int = 0
    lease_from: float = -FOREVER
    # Our child.
    pid: int | None = None
    running: ConnectionSettings | None = None
    started_at: float = 0.0
    stop_reason: str = ""
    stop_sent_at: float | None = None
    killed: bool = False
    after_stop: After = After.RELEASE
    # Why it is not started now: BACKOFF and HELD until ``until``; HELD and
    # FATAL also until the settings are no longer ``held_for``.
    until: float = 0.0
    held_for: str | None = None
    crashes: int = 0  # crashes in a row, each soon after starting
    fresh: bool = False  # changed or re-activated: started whatever its retry state
    reset_session: bool = False  # topics or client id changed: drop the broker's old session once
    settled_epoch: int | None = None  # the last epoch whose "disconnected" was reported
    deleted: bool = False
    failure: str | None = None  # the last error handling its row raised (reported once)

    def crash_count(self, now: float) -> int:
        """Crashes in a row if its child crashed ``now``."""
        return 1 if now - self.started_at >= STABLE_AFTER else self.crashes + 1


@dataclass
class Tally:
    """What happened since the last cycle was logged."""

    started: int = 0
    stopped: int = 0


class Monitor:
    def __init__(self, settings: config.Settings, processes: Processes, fleet: Fleet, events: EventSender,
                 clock: Callable[[], float] = runfile.clock):
        self.settings = settings
        self.processes = processes
        self.fleet = fleet
        self.events = events
        self.clock = clock
        self.records: dict[int, Record] = {}
        self.instance_id = settings.instance_id
        self.member = False
        self.waiting_for: str | None = None
        self.outage = Outage(self.instance_id, self.clock)
        self.tally = Tally()
        self.wake_now = True
        self.next_cycle = 0.0
        self.cycle_started = -FOREVER
        #: Where this cycle's time went so far (s, by part), and when the last part ended.
        self.cycle_parts: dict[str, float] = {}
        self.cycle_mark = 0.0
        self.cycle_read = (0, 0)  # rows the last read brought (changed), of those it may act on
        self.next_renewal = -FOREVER
        self.released_at = -FOREVER  # when our claims not kept were last released
        self.next_offline_scan = -FOREVER
        self.fence_published = 0.0
        self.share_seen = (0, 0, 0)  # share, active, live monitors

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        signals = SignalPipe(signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        logger.info("monitor {} started (interval {:g} s, lease {:g} s, capacity {})", self.instance_id,
                    self.settings.monitor_interval, self.settings.claim_lease,
                    "unlimited" if self.settings.max_connections is None else self.settings.max_connections)
        try:
            while True:
                if signals.drain() & {signal.SIGTERM, signal.SIGINT}:
                    logger.info("monitor {} stopping on signal", self.instance_id)
                    break
                self.reap()
                self.listen()
                if self.wake_now or self.clock() >= self.next_cycle:
                    self.wake_now = False
                    self.cycle()
                elif self.member and self.clock() >= self.next_renewal:
                    self._renew_between_cycles()
                self.enforce_leases()
                self.escalate_stops()
                self.wait(signals)
        finally:
            self.shutdown()
            signals.close()
            logger.info("monitor {} stopped", self.instance_id)
        return 0

    def listen(self) -> None:
        try:
            if self.fleet.listen():
                self.wake_now = True  # we may have missed notifications meanwhile
        except db.DatabaseError as exc:
            self._db_failed("LISTEN for changes", exc)

    def wait(self, signals: SignalPipe) -> None:
        now = self.clock()
        timeout = max(0.0, min(self.next_cycle, self.next_renewal if self.member else FOREVER) - now)
        if self.wake_now:
            # Another cycle at once (more to claim than one batch, a release to act on):
            # only look at what is ready, do not wait for the next ack or notification.
            timeout = 0.0
        ends = [end for r in self.records.values()
                if r.state in CLAIMED and (end := r.lease_from + self.settings.lease_trusted) > now]
        if ends:
            timeout = min(timeout, max(0.0, min(ends) - now) + 0.001)
        if any(r.state is S.STOPPING and not r.killed for r in self.records.values()):
            timeout = min(timeout, 0.2)
        timeout = self.events.bound(timeout)
        poller = zmq.Poller()
        poller.register(signals.fileno(), zmq.POLLIN)
        poller.register(self.events.socket, zmq.POLLIN)
        listening = self.fleet.fileno()
        if listening is not None:
            poller.register(listening, zmq.POLLIN)
        ready = dict(poller.poll(timeout * 1000))
        if ready.get(self.events.socket):
            self.events.receive_acks()
        if listening is not None and ready.get(listening) and self.fleet.notified():
            self.wake_now = True

    # ---------------------------------------------------------- the cycle

    def cycle(self) -> None:
        """One cycle, in parts whose durations it reports (``_lap``): ``read``
        the rows, ``reconcile`` them with our records, ``renew`` and release
        claims, ``balance`` the share (hand-overs), ``claim`` new rows,
        ``start`` their children, publish the ``fence``, mark devices
        ``offline``. A slow cycle thus says where its time went."""
        started = self.cycle_started = self.cycle_mark = self.clock()
        self.cycle_parts = {}
        self.next_cycle = started + self.settings.monitor_interval
        if not self._take_part():
            return
        try:
            snapshot = self.fleet.snapshot(held=self._held_ids(), holds=len(self._counted()),
                                           known={cid: r.config_hash for cid, r in self.records.items()
                                                  if r.settings is not None and r.config_hash is not None})
        except MembershipLost as exc:
            self._membership_lost(exc)
            return
        except db.DatabaseError as exc:
            self._db_failed("reading the connections", exc)
            return
        self._lap("read")
        self.cycle_read = (len(snapshot.rows) if snapshot.fresh is None else len(snapshot.fresh), len(snapshot.rows))
        if self.outage.ended():
            self.fleet.listen_now()
        seen = {row["id"] for row in snapshot.rows}
        for cid in [cid for cid in self.records if cid not in seen]:
            self._row_gone(self.records[cid])
        now = self.clock()
        if snapshot.expiry_in is not None:
            # Another monitor's claim on an active row: a live holder renews long before
            # it runs out; one that died or froze does not: look again the moment it
            # does, not a whole interval later.
            self.next_cycle = min(self.next_cycle, now + max(0.0, snapshot.expiry_in) + 0.05)
        if snapshot.due_in is not None:
            # A previous child's retry time (mqtt_next_retry) has not come, by
            # PostgreSQL's clock: look again then.
            self.next_cycle = min(self.next_cycle, now + snapshot.due_in + 0.01)
        starts: list[Record] = []
        reports: list[Record] = []
        fresh = snapshot.fresh
        for row in snapshot.rows:
            rec = self.records.get(row["id"])
            if rec is None:
                rec = self.records[row["id"]] = Record(row["id"])
            elif fresh is not None and rec.state is S.RUNNING and rec.failure is None and row["id"] not in fresh:
                continue  # running, and its row unchanged since it was last handled: nothing to do
            try:
                want = self._reconcile(rec, row)
            except IllegalTransition:
                raise  # a bug of ours: let supervisord restart the monitor
            except Exception as exc:  # one bad row must never stop the monitor
                self._row_failed(rec, exc)
                continue
            rec.failure = None
            if want == "start":
                starts.append(rec)
            elif want == "report":
                reports.append(rec)
        self._lap("reconcile")
        claims_held = self._renew_if_due() and self._release()
        self._lap("renew")
        if claims_held:
            self._balance(snapshot, starts, reports)
        self._publish_fence()
        self._lap("fence")
        offline = self._mark_offline()
        self._lap("offline")
        self._log_cycle(started, offline)

    def _lap(self, part: str) -> None:
        """The cycle's time since the last part ended goes to ``part``."""
        now = self.clock()
        self.cycle_parts[part] = self.cycle_parts.get(part, 0.0) + max(0.0, now - self.cycle_mark)
        self.cycle_mark = now

    def _take_part(self) -> bool:
        """Be the one live monitor of this instance id (on this host and in the fleet)."""
        if self.member:
            return True
        if not self.processes.acquire_instance():
            self._waiting(f"another monitor with instance id {self.instance_id!r} runs on this host, "
                          f"or its processes have not all exited yet")
            self.next_cycle = self.cycle_started + min(0.5, self.settings.monitor_interval)
            return False
        try:
            occupied = self.fleet.join(self.processes.lock_key)
        except db.DatabaseError as exc:
            self._db_failed("joining the fleet", exc)
            return False
        self.outage.ended()
        if occupied is not None:
            self._waiting(f"another monitor with instance id {self.instance_id!r} runs on host "
                          f"{occupied.host} (pid {occupied.pid}, heartbeat {occupied.silent_for:.1f} s ago)")
            return False
        if self.waiting_for is not None:
            logger.info("monitor {}: the other monitor with this instance id is gone", self.instance_id)
        self.waiting_for = None
        self.member = True
        logger.info("monitor {} joined the fleet", self.instance_id)
        return True

    def _waiting(self, why: str) -> None:
        if why != self.waiting_for:
            logger.warning("monitor {}: {}; running nothing until it is gone", self.instance_id, why)
            self.waiting_for = why

    def _membership_lost(self, exc: Exception) -> None:
        logger.error("monitor {}: {}; stopping every connection", self.instance_id, exc)
        self.member = False
        for rec in list(self.records.values()):
            self._claim_lost(rec, "another monitor took over this monitor's instance id")

    # -- 3b. one row

    def _reconcile(self, rec: Record, row: dict) -> str | None:
        """Act on one row; return "start" or "report" if it needs a claim of ours for that."""
        now = self.clock()
        settings = self._settings_for(rec, row)
        rec.is_active, rec.status = row["is_active"], row["status"]
        if rec.state in CLAIMED and row["claim"] != "mine":
            holder = row["claimed_by"] if row["claim"] == "taken" else None
            self._claim_lost(rec, f"monitor {holder} holds it now" if holder else "its claim expired")
        if not row["is_active"]:
            return self._inactive(rec, row)
        if rec.state is S.RUNNING:
            assert rec.running is not None
            if rec.running.fingerprint != settings.fingerprint:
                self._stop(rec, "its broker settings changed", After.RESTART)
            return None
        if rec.state in (S.HELD, S.FATAL) and rec.held_for != settings.fingerprint:
            # HELD -> BACKOFF, FATAL -> BACKOFF: the row changed, whatever held it may be fixed
            self.change_state(rec, S.BACKOFF, until=now)
        elif rec.state is S.HELD and rec.until <= now:
            # HELD -> BACKOFF: the cool-down is over
            self.change_state(rec, S.BACKOFF, until=now)
        if rec.state is S.BACKOFF:
            return "start" if rec.until <= now else None  # our own delay, by our own clock
        if rec.state is not S.IDLE or row["claim"] == "taken":
            return None  # not ours to start (another monitor's claim: the cycle looks again when it runs out)
        # Not due yet: the cycle looks again when its retry time comes.
        return "start" if row["is_due"] or rec.fresh else None

    def _inactive(self, rec: Record, row: dict) -> str | None:
        rec.fresh = True  # is_active off and on again: start at once
        if rec.state is S.RUNNING:
            self._stop(rec, "is_active is false", After.RELEASE)
        elif rec.state is S.STOPPING:
            rec.after_stop = max(rec.after_stop, After.RELEASE)
        elif rec.state in (S.BACKOFF, S.HELD, S.FATAL):
            self._settle(rec)
            # BACKOFF/HELD/FATAL -> RELEASING: nothing to run
            self.change_state(rec, S.RELEASING)
        elif rec.state is S.RELEASING:
            self._settle(rec)
        elif (rec.state is S.IDLE and row["status"] != "disconnected" and row["claim"] == "free"
              and rec.settled_epoch != row["claim_epoch"]):
            return "report"  # nobody runs it and its status still says otherwise
        return None

    def _settle(self, rec: Record) -> None:
        """Report an inactive connection without a child disconnected, once per epoch."""
        if rec.status != "disconnected" and rec.settled_epoch != rec.epoch:
            self._report(rec, "disconnected", "")

    def _settings_for(self, rec: Record, row: dict) -> ConnectionSettings:
        """The row's settings, rebuilt only when its configuration changed.

        Every cycle reads every row it may act on; PostgreSQL hashes each
        row's configuration so that an unchanged row costs a comparison, not
        an object and a digest, and its settings are not even read
        (``Fleet.snapshot``: only rows with a hash we do not know come with them).
        """
        if rec.settings is not None and rec.config_hash == row["config_hash"]:
            return rec.settings
        settings = ConnectionSettings.from_mapping(row)
        before = rec.settings
        rec.config_hash, rec.settings = row["config_hash"], settings
        if before is not None and before.fingerprint != settings.fingerprint:
            fields = settings.changed_fields(before)
            rec.fresh = True  # a changed row connects at once, whatever its retry state
            if "topics" in fields or "client_id" in fields:
                rec.reset_session = True
            if rec.state in CLAIMED:  # logged by the monitor that runs it, not by the whole fleet
                self.events.send(ConnectionLog(connection_id=rec.connection_id, level="INFO",
                                               message=f"settings changed: {', '.join(fields)}",
                                               broker_host=settings.broker_host))
        return settings

    def _row_gone(self, rec: Record) -> None:
        rec.deleted = True
        if rec.state in WITH_CHILD:
            self._stop(rec, "the connection was deleted", After.DROP)
            return
        if rec.state is not S.IDLE:
            # BACKOFF/HELD/FATAL/RELEASING -> IDLE: there is no row to hold
            self.change_state(rec, S.IDLE)
        del self.records[rec.connection_id]

    def _row_failed(self, rec: Record, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text != rec.failure:
            logger.opt(exception=exc).error("monitor {}: connection {} could not be handled",
                                            self.instance_id, rec.connection_id)
            rec.failure = text
            self.events.send(ConnectionLog(connection_id=rec.connection_id, level="ERROR",
                                           message=f"the monitor could not handle this connection: {text}",
                                           exception_type=type(exc).__name__))

    # -- 3c. claims kept and released

    def _renew_if_due(self) -> bool:
        """Renew claims, a slice at a time; False if the database failed.

        Every ``renew_every / RENEW_SLICES`` seconds, the oldest
        ``1 / RENEW_SLICES`` of the claims we keep are renewed, and any claim
        that would otherwise be renewed more than half a step late: each claim
        is still renewed every quarter lease, but no step renews them all at
        once (claims won together are spread over the first steps). Our other
        claims (none we keep) are released, at every step, or every quarter
        lease while we keep none.
        """
        now = self.clock()
        if now < self.next_renewal:
            return True
        step = self.settings.renew_every / RENEW_SLICES
        held = [r for r in self.records.values()
                if r.state in CLAIMED and not (r.state is S.STOPPING and r.after_stop is After.DROP)]
        if not held and now < self.released_at + self.settings.renew_every:
            self.next_renewal = now + step
            return True
        held.sort(key=lambda r: (r.lease_from, r.connection_id))
        quota = -(-len(held) // RENEW_SLICES)
        due = [r for i, r in enumerate(held)
               if i < quota or r.lease_from + self.settings.renew_every <= now + step / 2]
        try:
            renewed = self.fleet.renew([r.connection_id for r in due], keep=[r.connection_id for r in held])
        except db.DatabaseError as exc:
            self._db_failed("renewing claims", exc)
            # Tried again soon (between cycles too), never in a busy loop.
            self.next_renewal = now + min(step, max(1.0, self.settings.db_bound))
            return False
        self.next_renewal = now + step
        self.released_at = now
        for rec in due:
            if rec.connection_id in renewed:
                rec.lease_from = now  # measured from before the statement began
            else:
                self._claim_lost(rec, "its claim expired before it could be renewed")
        return True

    def _renew_between_cycles(self) -> None:
        """A renewal step when no cycle is due: no need to read the rows for it."""
        if self._renew_if_due():
            self._publish_fence()

    def _release(self) -> bool:
        """Release what is to go (once an inactive row's status says so); False if the database failed."""
        ready = [r for r in self.records.values() if r.state is S.RELEASING
                 and (r.is_active or r.status == "disconnected" or r.deleted)]
        if not ready:
            return True
        try:
            self.fleet.release([r.connection_id for r in ready])
        except db.DatabaseError as exc:
            self._db_failed("releasing claims", exc)
            return False
        for rec in ready:
            # RELEASING -> IDLE
            self.change_state(rec, S.IDLE)
            if rec.is_active:
                self.wake_now = True  # active again meanwhile: another cycle may take it at once
        return True

    # -- 3d. the share: hand over, claim, start

    def _counted(self) -> list[Record]:
        """Records that count against this monitor's share: active connections it keeps."""
        return [r for r in self.records.values()
                if r.state in (S.RUNNING, S.BACKOFF, S.HELD, S.FATAL)
                or (r.state is S.STOPPING and r.after_stop is After.RESTART)]

    def _held_ids(self) -> list[int]:
        return [cid for cid, r in self.records.items() if r.state is not S.IDLE]

    def _balance(self, snapshot: Snapshot, starts: list[Record], reports: list[Record]) -> bool:
        """Hand over what exceeds our share, claim up to it; False if the database failed."""
        target = share(snapshot.active, snapshot.capacities, self.settings.max_connections)
        self.share_seen = (target, snapshot.active, len(snapshot.capacities))
        counted = self._counted()
        if len(counted) > target + SLACK:
            why = (f"handing it over to balance the fleet: this monitor's share is {target} of "
                   f"{snapshot.active} active connections ({len(snapshot.capacities)} monitors)")
            for rec in sorted(counted, key=lambda r: r.connection_id, reverse=True)[:len(counted) - target]:
                self._hand_over(rec, why)
        own = [r for r in starts if r.state is S.BACKOFF]
        new = [r for r in starts if r.state is S.IDLE]
        room = max(0, target - len(self._counted()))
        self._lap("balance")
        claimed_at = self.clock()
        try:
            won = self.fleet.claim([r.connection_id for r in own + reports], len(own) + len(reports))
            won |= self.fleet.claim([r.connection_id for r in new], min(room, CLAIM_BATCH))
        except db.DatabaseError as exc:
            self._db_failed("claiming connections", exc)
            return False
        finally:
            self._lap("claim")
        wanted = min(room, len(new))
        won_new = sum(1 for r in new if r.connection_id in won)
        if wanted > CLAIM_BATCH and won_new == CLAIM_BATCH:
            # More to take than one full batch: another cycle at once (``wait`` does not
            # wait then). A batch not full had rows locked: the retry below, not a busy loop.
            self.wake_now = True
        elif (won_new < min(wanted, CLAIM_BATCH)
              or any(r.connection_id not in won for r in own)):
            # Rows locked at that moment (a status being written, another monitor's
            # claim) were skipped: look again soon rather than at the next poll. Our
            # own stay ours meanwhile (the snapshot said so); the next one tells.
            self.next_cycle = min(self.next_cycle, self.clock() + CLAIM_RETRY)
        starting = [r for r in own + new if r.connection_id in won]
        if starting:
            # One fence for the whole batch, before its first child: it must cover each of
            # them (claimed at claimed_at), and working it out per child cost O(records).
            self._publish_fence(also=claimed_at + self.settings.lease_trusted)
            started = self._start(starting, won, claimed_at)
            if started:
                # One line per batch, not one per child.
                logger.info("started {} connection(s): {}", len(started),
                            ", ".join(f"{rec.connection_id} (pid {pid}, epoch {rec.epoch})" for rec, pid in started))
            self._lap("start")
        for rec in reports:
            if rec.connection_id in won:
                # IDLE -> RELEASING: claimed to say that nobody runs it
                self.change_state(rec, S.RELEASING, epoch=won[rec.connection_id], lease_from=claimed_at)
                self._settle(rec)
        return True

    def _hand_over(self, rec: Record, why: str) -> None:
        if rec.state is S.RUNNING:
            self._stop(rec, why, After.RELEASE)  # released once its child has exited
        elif rec.state is S.STOPPING:
            rec.after_stop = max(rec.after_stop, After.RELEASE)
        else:
            # BACKOFF/HELD/FATAL -> RELEASING
            self.change_state(rec, S.RELEASING)

    def _start(self, starting: list[Record], won: dict[int, int], claimed_at: float) -> list[tuple[Record, int]]:
        """Start a child for each connection just claimed (under the epoch ``won``
        says); return those started, with their PIDs.

        The caller has published a fence that covers ``claimed_at`` (``_publish_fence``)."""
        ready: list[tuple[Record, ConnectionSettings]] = []
        for rec in starting:
            assert rec.settings is not None
            epoch = won[rec.connection_id]
            problems = rec.settings.problems()
            if problems:
                # IDLE -> HELD, BACKOFF -> HELD: a row we cannot start, reported under our claim
                self.change_state(rec, S.HELD, until=FOREVER, held_for=rec.settings.fingerprint,
                                  epoch=epoch, lease_from=claimed_at)
                self._report(rec, "error", "cannot start: " + "; ".join(problems))
                continue
            # IDLE -> STARTING, BACKOFF -> STARTING
            self.change_state(rec, S.STARTING, epoch=epoch, lease_from=claimed_at)
            ready.append((rec, dataclasses.replace(rec.settings, epoch=epoch, reset_session=rec.reset_session)))
        # All at once: the zygote forks them in a row (cheaper than one by one).
        answers = self.processes.spawn_many([settings for _, settings in ready]) if ready else []
        started = []
        for (rec, settings), answer in zip(ready, answers):
            if isinstance(answer, SpawnRefused):  # these settings' fault, not the zygote's: it keeps serving
                # STARTING -> HELD: reported under our claim, until the row changes
                self.change_state(rec, S.HELD, until=FOREVER, held_for=rec.settings.fingerprint)
                self._report(rec, "error", f"cannot start: {answer}")
            elif isinstance(answer, SpawnError):
                logger.error("cannot start a child for connection {}: {}", rec.connection_id, answer)
                self.events.send(ConnectionLog(connection_id=rec.connection_id, level="ERROR",
                                               message=f"cannot start a child process: {answer}",
                                               exception_type=type(answer.__cause__ or answer).__name__))
                # STARTING -> BACKOFF
                self.change_state(rec, S.BACKOFF, until=self.clock() + backoff.delay(
                    rec.crashes + 1, self.settings.restart_base, self.settings.restart_cap))
            else:
                # STARTING -> RUNNING
                self.change_state(rec, S.RUNNING, pid=answer, running=settings, reset_session=False)
                started.append((rec, answer))
        return started

    def _publish_fence(self, also: float | None = None) -> None:
        """Tell the children until when our claims on them hold (they stop by themselves after);
        ``also``: the end of claims just won for children about to start."""
        trusted = self.settings.lease_trusted
        ends = [r.lease_from + trusted for r in self.records.values()
                if r.state in (S.STARTING, S.RUNNING)
                or (r.state is S.STOPPING and r.after_stop is not After.DROP)]
        if also is not None:
            ends.append(also)
        if ends and min(ends) > self.fence_published:
            self.fence_published = min(ends)
            self.processes.publish_fence(self.fence_published)

    # -- 3e. devices, and the cycle's log

    def _mark_offline(self) -> dict[str, int]:
        now = self.clock()
        if now < self.next_offline_scan:
            return {}
        try:
            found = self.fleet.mark_offline()
        except db.DatabaseError as exc:
            self._db_failed("marking devices offline", exc)
            return {}
        s = self.settings
        self.next_offline_scan = now + OFFLINE_SCAN_SHARE * min(
            s.gateway_offline_after, s.datalogger_offline_after, s.sensor_offline_after)
        for kind, rows in found.items():
            for r in rows:
                self.events.send(DeviceChange(device_kind=kind, device_id=r["id"], site_id=r["site_id"],
                                              last_seen=r.get("last_seen"),
                                              name=r["name"], online=False))
        return {kind: len(rows) for kind, rows in found.items()}

    def _log_cycle(self, started: float, offline: dict[str, int]) -> None:
        duration = self.clock() - started
        running = sum(1 for r in self.records.values() if r.state in WITH_CHILD)
        target, active, live = self.share_seen
        event = MonitorCycle(instance_id=self.instance_id, running=running, started=self.tally.started,
                             stopped=self.tally.stopped, offline=offline, duration=duration, parts=self.cycle_parts)
        logger.info("monitor {} cycle: {} running, {} started, {} stopped, share {} of {} active "
                    "({} monitors), offline {}, {} of {} rows read, {:.0f} ms (ms: {})", self.instance_id, running,
                    self.tally.started, self.tally.stopped, target, active, live, offline, *self.cycle_read,
                    duration * 1000, event.parts_text())
        self.events.send(event)
        self.tally = Tally()

    # ------------------------------------------------ states and children

    def change_state(self, rec: Record, new: ConnState, **facts) -> None:
        """The one place a connection's state changes; counters change only here."""
        old = rec.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"connection {rec.connection_id}: {old.name} -> {new.name}")
        now = self.clock()
        if old is S.RUNNING and new in (S.BACKOFF, S.FATAL):
            rec.crashes = rec.crash_count(now)
        elif old is S.STARTING and new is S.BACKOFF:
            rec.crashes += 1  # it could not even be started
        elif new is S.RELEASING or (old in (S.HELD, S.FATAL) and new is S.BACKOFF):
            rec.crashes = 0
        if old is S.STARTING and new is S.RUNNING:
            self.tally.started += 1
            rec.started_at = now
            rec.fresh = False
        if old is S.STOPPING:
            self.tally.stopped += 1
            rec.stop_sent_at = None
        if new not in WITH_CHILD:
            rec.pid = rec.running = None
        if new is S.IDLE:
            rec.lease_from = -FOREVER
        for name, value in facts.items():
            setattr(rec, name, value)
        rec.state = new
        if new in (S.BACKOFF, S.HELD) and now < rec.until < self.next_cycle:
            self.next_cycle = rec.until  # the cycle that starts it again
        logger.debug("connection {}: {} -> {}", rec.connection_id, old.name, new.name)

    def _report(self, rec: Record, status: str, message: str, **extra) -> None:
        """A status this monitor issues itself, ranked after everything the child of this epoch sent."""
        self.events.send(StatusChange(connection_id=rec.connection_id, status=status, message=message,
                                      broker_host=rec.settings.broker_host if rec.settings else "",
                                      epoch=rec.epoch, final=True, **extra))
        if status == "disconnected":
            rec.settled_epoch = rec.epoch

    def _stop(self, rec: Record, reason: str, after: After) -> None:
        if rec.state is S.STOPPING:
            rec.after_stop = max(rec.after_stop, after)
            return
        assert rec.pid is not None
        logger.info("stopping connection {} (pid {}): {}", rec.connection_id, rec.pid, reason)
        self.events.send(ConnectionLog(connection_id=rec.connection_id, level="INFO", message=f"stopping: {reason}"))
        self.processes.signal(rec.pid, signal.SIGTERM)
        # RUNNING -> STOPPING
        self.change_state(rec, S.STOPPING, stop_reason=reason, stop_sent_at=self.clock(), killed=False,
                          after_stop=after)

    def _claim_lost(self, rec: Record, reason: str) -> None:
        if rec.state is S.RUNNING:
            self._stop(rec, f"this monitor's claim on it was lost ({reason})", After.DROP)
        elif rec.state is S.STOPPING:
            rec.after_stop = After.DROP
        elif rec.state in CLAIMED:
            # BACKOFF/HELD/FATAL/RELEASING -> IDLE: not ours to hold any more
            self.change_state(rec, S.IDLE)

    def enforce_leases(self) -> None:
        """Past three quarters of the lease since the last renewal began, another monitor may
        soon take over: stop first, whether or not PostgreSQL can be reached."""
        now = self.clock()
        for rec in list(self.records.values()):
            if rec.state in CLAIMED and rec.lease_from + self.settings.lease_trusted <= now:
                self._claim_lost(rec, f"not renewed for {self.settings.lease_trusted:g} s, PostgreSQL "
                                      f"unreachable; another monitor may take it over")

    def escalate_stops(self) -> None:
        now = self.clock()
        for rec in self.records.values():
            if (rec.state is S.STOPPING and not rec.killed and rec.stop_sent_at is not None
                    and now - rec.stop_sent_at > self.settings.stop_grace):
                logger.warning("connection {} (pid {}) did not stop within {:g} s; killing it",
                               rec.connection_id, rec.pid, self.settings.stop_grace)
                assert rec.pid is not None
                self.processes.signal(rec.pid, signal.SIGKILL)
                rec.killed = True

    def reap(self) -> None:
        for ex in self.processes.reap():
            rec = self.records.get(ex.connection_id)
            if rec is not None and rec.pid == ex.pid:
                self._exited(rec, ex)

    def _exited(self, rec: Record, ex: Exit) -> None:
        cid, now = rec.connection_id, self.clock()
        if rec.state is S.STOPPING:
            logger.info("connection {} (pid {}) stopped ({}; {})", cid, ex.pid, rec.stop_reason, ex.description)
            if ex.code in (exitcodes.OK, exitcodes.FENCED):
                rec.settled_epoch = rec.epoch  # it reported its last status itself
            self.wake_now = True  # a changed connection starts again at once; a released one is released
            if rec.after_stop is After.RESTART:
                # STOPPING -> BACKOFF: started again at once, with the new settings
                self.change_state(rec, S.BACKOFF, until=now)
            elif rec.after_stop is After.RELEASE:
                # STOPPING -> RELEASING
                self.change_state(rec, S.RELEASING)
            else:
                # STOPPING -> IDLE: the claim is not ours any more
                self.change_state(rec, S.IDLE)
            if rec.deleted:
                del self.records[cid]
            return
        assert rec.running is not None
        fingerprint = rec.running.fingerprint
        if ex.code == exitcodes.FENCED:
            logger.warning("connection {} (pid {}) stopped itself: this monitor's lease on it could no "
                           "longer be trusted", cid, ex.pid)
            # RUNNING -> IDLE: claimed again if it may be
            self.change_state(rec, S.IDLE)
            self.wake_now = True
            return
        if ex.code == exitcodes.GAVE_UP:
            logger.info("connection {} gave up; waiting out the {:g} s cool-down", cid, self.settings.retry_cooldown)
            # RUNNING -> HELD: the cool-down, unless the row changes
            self.change_state(rec, S.HELD, until=now + self.settings.retry_cooldown, held_for=fingerprint)
            return
        if ex.code == exitcodes.CONFIG:
            # RUNNING -> HELD: the child reported why; until the row changes
            self.change_state(rec, S.HELD, until=FOREVER, held_for=fingerprint)
            self.events.send(ConnectionLog(connection_id=cid, level="ERROR",
                                           message="the connection's settings are unusable; "
                                                   "it starts again once its row changes"))
            return
        crashes = rec.crash_count(now)
        if crashes > self.settings.crash_limit:
            message = (f"the connection's process crashed {crashes} times in a row soon after starting "
                       f"(last: {ex.description}); left stopped until its row changes or is_active is "
                       f"switched off and on")
            logger.error("connection {} (pid {}): {}", cid, ex.pid, message)
            # RUNNING -> FATAL
            self.change_state(rec, S.FATAL, held_for=fingerprint)
            self._report(rec, "error", message)
            return
        wait = backoff.delay(crashes, self.settings.restart_base, self.settings.restart_cap)
        message = f"the connection's process crashed ({ex.description}); restarting it in {wait:.1f} s"
        logger.warning("connection {} (pid {}): {}", cid, ex.pid, message)
        # RUNNING -> BACKOFF
        self.change_state(rec, S.BACKOFF, until=now + wait)
        self._report(rec, "error", message, next_retry_at=time.time() + wait)

    def shutdown(self) -> None:
        """SIGTERM every child, reap while waiting up to the grace period, SIGKILL, reap;
        then release every claim, so that the other monitors take over at once."""
        for rec in list(self.records.values()):
            if rec.state in WITH_CHILD:
                self._stop(rec, "the monitor is stopping", After.RELEASE)
        self._reap_while_children(self.settings.stop_grace)
        for rec in self.records.values():
            if rec.state in WITH_CHILD and rec.pid is not None:
                self.processes.signal(rec.pid, signal.SIGKILL)
        self._reap_while_children(5.0)
        self.processes.close()
        if self.member:
            try:
                self.fleet.leave()
            except db.DatabaseError as exc:
                logger.warning("monitor {}: could not release its claims ({}); they expire in {:g} s",
                               self.instance_id, exc, self.settings.claim_lease)
        self.fleet.close()

    def _reap_while_children(self, seconds: float) -> None:
        deadline = self.clock() + seconds
        while any(r.state in WITH_CHILD for r in self.records.values()) and self.clock() < deadline:
            self.reap()
            self.processes.pause(0.02)

    # -------------------------------------------------------- the database

    def _db_failed(self, doing: str, exc: db.DatabaseError) -> None:
        """Every failed database call: logged by the outage, or as itself; the next cycle comes soon."""
        if isinstance(exc, db.DatabaseUnavailable):
            self.outage.failed(doing, exc, self._outlook())
        else:
            logger.warning("monitor {}: {} failed ({})", self.instance_id, doing, exc)
        retry = min(self.settings.monitor_interval, max(1.0, self.settings.db_bound))
        self.next_cycle = min(self.next_cycle, self.clock() + retry)

    def _outlook(self) -> str:
        ends = [r.lease_from + self.settings.lease_trusted for r in self.records.values()
                if r.state in WITH_CHILD]
        if not ends:
            return "no connection running here"
        left = max(0.0, min(ends) - self.clock())
        return (f"{len(ends)} connections keep running while their lease holds ({left:.1f} s more "
                f"without a renewal)")


def main() -> int:
    loaded = boot.settings("monitor")
    settings = boot.start("monitor", lambda s: f"sitelink: monitor {s.instance_id}", "sitelink-mon",
                          bound=loaded.db_bound, loaded=loaded)
    try:
        keys = curve.for_client(settings.events_endpoint, settings.runtime_dir)
        processes = Processes(settings)
    except (OSError, ValueError) as exc:  # a runtime directory of another user, open to others...
        logger.error("cannot start: {}", exc)
        return exitcodes.CONFIG
    context = zmq.Context(io_threads=1)
    events = EventSender(context, settings.events_endpoint, f"monitor:{settings.instance_id}",
                         resend_after=settings.resend_after, curve=keys)
    try:
        return Monitor(settings, processes, Fleet(settings), events).run()
    finally:
        events.flush(settings.ack_linger)
        events.close()
        context.term()


if __name__ == "__main__":
    sys.exit(main())
