"""The monitor: the only process that decides which connections run.

Each cycle (every ``SITELINK_MONITOR_INTERVAL`` seconds, and at once when
PostgreSQL NOTIFYs a change of ``mqtt_connection``):

1. start a child for every active connection that has none and is due
   (``mqtt_next_retry`` null or past, and no crash or give-up hold);
2. stop the child of every connection that is inactive, deleted, or whose
   broker settings changed (it starts again with the new ones);
3. mark gateways, dataloggers and sensors offline past their threshold;
4. log the cycle, with this monitor's ``instance_id``.

Children are reaped as soon as they exit (SIGCHLD wakes the loop). A child
that crashes is restarted after a growing delay. SIGTERM or SIGINT stops
every child (SIGTERM, a grace period, SIGKILL) before the monitor exits, and
each child asks the kernel to be signalled if the monitor dies anyway.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import zmq
from loguru import logger

from services.zygote import SpawnRefused, Zygote
from shared import attempts, backoff, config, curve, db, exitcodes, logs, process, protocol
from shared.connections import ConnectionSettings
from shared.events import EventSender
from shared.protocol import ConnectionLog, DeviceChange, MonitorCycle, StatusChange
from shared.signals import SignalPipe

#: A child that ran at least this long before crashing starts its backoff afresh.
STABLE_AFTER = 60.0
DEVICE_KINDS = ("gateway", "datalogger", "sensor")


@dataclass
class Child:
    connection_id: int
    pid: int
    settings: ConnectionSettings
    started_at: float
    stop_reason: str | None = None
    stop_sent_at: float | None = None
    killed: bool = False


@dataclass
class Hold:
    """Why a connection is not started now, and until when."""

    until: float = 0.0  # monotonic
    fingerprint: str | None = None  # a held config problem ends when the settings change
    crashes: int = 0
    reported: set[str] = field(default_factory=set)


def alive_child(pid: int) -> bool:
    """True until our child ``pid`` has been reaped."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    return f"exit code {os.WEXITSTATUS(status)}"


class Monitor:
    def __init__(self, settings: config.Settings, database: db.Database):
        self.settings = settings
        self.db = database
        self.instance_id = settings.instance_id
        self.context = zmq.Context(io_threads=1)
        self.events = EventSender(self.context, settings.events_endpoint, f"monitor:{self.instance_id}",
                                  resend_after=settings.resend_after,
                                  curve=curve.for_client(settings.events_endpoint, settings.runtime_dir))
        self.children: dict[int, Child] = {}  # by connection id
        self.by_pid: dict[int, Child] = {}
        self.holds: dict[int, Hold] = {}
        self.settled: set[int] = set()  # inactive connections already reported disconnected
        # Last configuration seen per connection: (its hash, its settings).
        self.known: dict[int, tuple[str, ConnectionSettings]] = {}
        self.fresh: set[int] = set()  # changed or re-activated: start regardless of retry state
        self.reset_sessions: set[int] = set()  # topics changed: drop the broker's old session once
        self.renewed_at = time.monotonic()
        self.renew_now = True  # claim state unknown until the first renewal
        self.attempt_slots = attempts.create()
        # Children are forked by the zygote and adopted by us: we reap them and
        # are their parent for PR_SET_PDEATHSIG.
        process.become_subreaper()
        self.zygote = Zygote()
        self.zygote.start()
        self.early_exits: dict[int, int] = {}
        self.identity = db.SessionLock(settings.database_url, "instance_lock", {"me": self.instance_id},
                                       "sitelink-monitor-lock")
        self.identity_held = False
        self.identity_warned = False
        self.listener: db.Listener | None = None
        self.wake_now = True
        self.started_since_cycle = 0
        self.stopped_since_cycle = 0

    # -- the loop: signals, reap, reconcile, wait

    def run(self) -> int:
        signals = SignalPipe(signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        logger.info("monitor {} started (interval {:g} s)", self.instance_id, self.settings.monitor_interval)
        next_cycle = 0.0
        try:
            while True:
                caught = signals.drain()
                if caught & {signal.SIGTERM, signal.SIGINT}:
                    logger.info("monitor {} stopping on signal", self.instance_id)
                    break
                self.reap()
                self._listen()
                now = time.monotonic()
                if self.wake_now or now >= next_cycle:
                    self.wake_now = False
                    if self._hold_identity():
                        self.cycle()
                    next_cycle = time.monotonic() + self.settings.monitor_interval
                self._escalate_stops()
                self._wait(signals, next_cycle)
        finally:
            self.stop_all()
            if self.identity_held:
                self._release_all()
            self.identity.release()
            self.attempt_slots.unlink(missing_ok=True)
            self.events.flush(self.settings.ack_linger)
            self.events.close()
            self.context.term()
            if self.listener is not None:
                self.listener.close()
            self.db.close()
            signals.close()
            logger.info("monitor {} stopped", self.instance_id)
        return 0

    def _wait(self, signals: SignalPipe, next_cycle: float) -> None:
        now = time.monotonic()
        timeout = max(0.0, next_cycle - now)
        holds = [h.until for cid, h in self.holds.items() if h.until > now and cid not in self.children]
        if holds:
            timeout = min(timeout, max(0.0, min(holds) - now) + 0.01)
        if any(c.stop_sent_at is not None for c in self.children.values()):
            timeout = min(timeout, 0.2)
        timeout = self.events.bound(timeout)
        poller = zmq.Poller()
        poller.register(signals.fileno(), zmq.POLLIN)
        poller.register(self.events.socket, zmq.POLLIN)
        if self.listener is not None:
            poller.register(self.listener.fileno(), zmq.POLLIN)
        ready = dict(poller.poll(timeout * 1000))
        if ready.get(self.events.socket):
            self.events.receive_acks()
        if self.listener is not None and ready.get(self.listener.fileno()):
            self._drain_notifications()
        if any(h.until <= time.monotonic() and h.until > now for h in self.holds.values()):
            self.wake_now = True

    def _listen(self) -> None:
        if self.listener is not None:
            return
        try:
            self.listener = db.Listener(self.settings.database_url, application_name="sitelink-monitor-listen")
            self.wake_now = True  # we may have missed notifications meanwhile
        except db.DatabaseError as exc:
            logger.warning("cannot LISTEN for changes ({}); relying on the {:g} s poll",
                           exc, self.settings.monitor_interval)

    def _drain_notifications(self) -> None:
        try:
            if self.listener is not None and self.listener.drain():
                self.wake_now = True
        except db.DatabaseError as exc:
            logger.warning("lost the LISTEN connection ({}); re-establishing it", exc)
            if self.listener is not None:
                self.listener.close()
            self.listener = None

    def _hold_identity(self) -> bool:
        """Be the only monitor of this instance id on this database, or run nothing."""
        try:
            if self.identity.acquire():
                if not self.identity_held:
                    logger.info("monitor {} holds its instance lock", self.instance_id)
                self.identity_held = True
                return True
            reason = f"another monitor with instance id {self.instance_id!r} runs on this database"
        except db.DatabaseError as exc:
            reason = f"cannot take the instance lock ({exc})"
        if self.identity_held or not self.identity_warned:
            logger.warning("monitor {}: {}; running nothing until it is free", self.instance_id, reason)
            self.identity_warned = True
        self.identity_held = False
        for child in list(self.children.values()):
            self._stop(child, "this monitor lost its instance lock")
        return False

    # -- one cycle

    def cycle(self) -> None:
        started_at = time.monotonic()
        try:
            with self.db.transaction() as s:
                rows = s.rows("monitor_connections", {"me": self.instance_id, "running": list(self.children)})
        except db.DatabaseError as exc:
            logger.warning("monitor {}: cannot read connections ({}); children keep running",
                           self.instance_id, exc)
            self._fence()
            return
        seen: set[int] = set()
        to_start: list[ConnectionSettings] = []
        for row in rows:
            seen.add(row["id"])
            try:
                settings = self._reconcile(row)
            except Exception as exc:  # one bad row must never stop the monitor
                logger.exception("monitor {}: connection {} could not be handled", self.instance_id, row["id"])
                self._report_once(row["id"], f"crash:{exc}", ConnectionLog(
                    connection_id=row["id"], level="ERROR",
                    message=f"the monitor could not handle this connection: {type(exc).__name__}: {exc}",
                    exception_type=type(exc).__name__))
                continue
            if settings is not None:
                to_start.append(settings)
        for cid in list(self.children):
            if cid not in seen:
                self._stop(self.children[cid], "the connection was deleted")
        for table in (self.holds, self.known):
            for cid in [cid for cid in table if cid not in seen]:
                del table[cid]
        self.settled &= seen
        self.fresh &= seen
        self.reset_sessions &= seen
        self._claim_and_start(to_start)
        self._renew_claims()
        offline = self._mark_offline()
        duration = time.monotonic() - started_at
        logger.info("monitor {} cycle: {} running, {} started, {} stopped, offline {}, {:.0f} ms",
                    self.instance_id, len(self.children), self.started_since_cycle,
                    self.stopped_since_cycle, offline, duration * 1000)
        self.events.send(MonitorCycle(instance_id=self.instance_id, running=len(self.children),
                                      started=self.started_since_cycle, stopped=self.stopped_since_cycle,
                                      offline=offline, duration=duration))
        self.started_since_cycle = self.stopped_since_cycle = 0

    def _reconcile(self, row: dict) -> ConnectionSettings | None:
        """Act on one row; return its settings if a child should start for it."""
        cid = row["id"]
        child = self.children.get(cid)
        settings = self._settings_for(row)
        hold = self.holds.get(cid)
        if hold is not None and hold.fingerprint is not None and hold.fingerprint != settings.fingerprint:
            del self.holds[cid]  # the row changed: whatever held it may be fixed
            hold = None
        if not row["is_active"]:
            if child is not None:
                self._stop(child, "is_active is false")
            elif row["status"] != "disconnected" and cid not in self.settled:
                self.events.send(StatusChange(connection_id=cid, status="disconnected", message="",
                                              broker_host=row["broker_host"]))
            self.settled.add(cid)
            self.holds.pop(cid, None)
            self.fresh.add(cid)  # is_active off and on again: start at once
            return None
        self.settled.discard(cid)
        if not row["is_claimable"]:
            if child is not None:
                self._stop(child, f"monitor {row['claimed_by']} holds this connection now")
            return None
        if child is not None:
            if child.settings.fingerprint != settings.fingerprint and child.stop_reason is None:
                self._stop(child, "its broker settings changed", restart=True)
            return None
        if hold is not None and hold.until > time.monotonic():
            return None
        if not row["is_due"] and cid not in self.fresh:
            return None
        problems = settings.problems()
        if problems:
            self._hold_unusable(settings, "cannot start: " + "; ".join(problems))
            return None
        return settings

    def _hold_unusable(self, settings: ConnectionSettings, message: str) -> None:
        """Status error with the reason, once; no start until the row changes."""
        cid = settings.connection_id
        self.holds[cid] = Hold(until=float("inf"), fingerprint=settings.fingerprint)
        self._report_once(cid, message, StatusChange(connection_id=cid, status="error", message=message,
                                                     broker_host=settings.broker_host))

    def _settings_for(self, row: dict) -> ConnectionSettings:
        """The row's settings, rebuilt only when its configuration changed.

        Every cycle reads every row; PostgreSQL hashes each row's
        configuration so that an unchanged row costs a comparison, not
        an object and a digest (10,000 rows in a few ms).
        """
        cid = row["id"]
        known = self.known.get(cid)
        if known is not None and known[0] == row["config_hash"]:
            return known[1]
        settings = ConnectionSettings.from_mapping(row, monitor_pid=os.getpid(),
                                                   attempt_slots=str(self.attempt_slots))
        self.known[cid] = (row["config_hash"], settings)
        if known is not None and known[1].fingerprint != settings.fingerprint:
            self._note_changes(cid, known[1], settings)
        return settings

    def _note_changes(self, cid: int, before: ConnectionSettings, settings: ConnectionSettings) -> None:
        """Log which settings of a connection changed (names only, never values)."""
        fields = settings.changed_fields(before)
        self.fresh.add(cid)  # a changed row connects at once, whatever its retry state
        if "topics" in fields or "client_id" in fields:
            self.reset_sessions.add(cid)
        self.events.send(ConnectionLog(connection_id=cid, level="INFO",
                                       message=f"settings changed: {', '.join(fields)}",
                                       broker_host=settings.broker_host))

    # -- claims: never two clients for one site, even with two monitors

    def _claim_and_start(self, to_start: list[ConnectionSettings]) -> None:
        if not to_start:
            return
        try:
            with self.db.transaction() as s:
                won = {r["id"] for r in s.rows("claim_connections", {
                    "me": self.instance_id, "lease": self.settings.claim_lease,
                    "ids": [c.connection_id for c in to_start]})}
        except db.DatabaseError as exc:
            logger.warning("monitor {}: cannot claim connections ({}); trying next cycle", self.instance_id, exc)
            return
        for settings in to_start:
            if settings.connection_id in won:
                cid = settings.connection_id
                self.fresh.discard(cid)
                if cid in self.reset_sessions:
                    self.reset_sessions.discard(cid)
                    settings = dataclasses.replace(settings, reset_session=True)
                self._spawn(settings)
            else:
                logger.info("connection {} is held by another monitor; not starting it", settings.connection_id)

    def _claimed(self) -> set[int]:
        """Connections this monitor keeps: running, or waiting to be restarted by it."""
        now = time.monotonic()
        return set(self.children) | {cid for cid, h in self.holds.items() if h.until > now}

    def _renew_claims(self) -> None:
        # Renewing rewrites every claimed row: once a third of the lease has
        # passed is often enough, whatever wakes the cycles (NOTIFY) meanwhile.
        if time.monotonic() - self.renewed_at < self.settings.claim_lease / 3 and not self.renew_now:
            return
        self.renew_now = False
        keep = self._claimed()
        try:
            with self.db.transaction() as s:
                renewed = {r["id"] for r in s.rows("renew_claims", {
                    "me": self.instance_id, "lease": self.settings.claim_lease, "ids": list(keep)})}
                s.run("release_claims", {"me": self.instance_id, "keep": list(keep)})
        except db.DatabaseError as exc:
            logger.warning("monitor {}: cannot renew claims ({})", self.instance_id, exc)
            self._fence()
            return
        self.renewed_at = time.monotonic()
        for cid in set(self.children) - renewed:
            self._stop(self.children[cid], "this monitor's claim on it was lost")

    def _fence(self) -> None:
        """Past our lease another monitor may start our connections: stop ours first."""
        if self.children and time.monotonic() - self.renewed_at > self.settings.claim_lease:
            for child in list(self.children.values()):
                self._stop(child, f"claims not renewed for {self.settings.claim_lease:g} s "
                                  f"(database unreachable); another monitor may take over")

    def _release_all(self) -> None:
        try:
            with self.db.transaction() as s:
                s.run("release_claims", {"me": self.instance_id, "keep": []})
        except db.DatabaseError as exc:
            logger.warning("monitor {}: could not release its claims ({}); they expire in {:g} s",
                           self.instance_id, exc, self.settings.claim_lease)

    def _report_once(self, cid: int, key: str, event: protocol.Event) -> None:
        hold = self.holds.setdefault(cid, Hold())
        if key not in hold.reported:
            hold.reported.add(key)
            self.events.send(event)

    # -- children

    def _spawn(self, settings: ConnectionSettings) -> None:
        cid = settings.connection_id
        try:
            pid = self.zygote.spawn(settings)
        except SpawnRefused as exc:  # these settings' fault, not the zygote's: it keeps serving
            self._hold_unusable(settings, f"cannot start: {exc}")
            return
        except (OSError, ChildProcessError) as exc:
            logger.warning("the zygote failed ({}); starting a new one", exc)
            self.zygote.discard()
            try:
                pid = self.zygote.spawn(settings)
            except (OSError, ChildProcessError, SpawnRefused) as again:
                logger.error("cannot start a child for connection {}: {}", cid, again)
                self.zygote.discard()
                self.events.send(ConnectionLog(connection_id=cid, level="ERROR",
                                               message=f"cannot start a child process: {again}",
                                               exception_type=type(again).__name__))
                self._hold_after_crash(cid, started_at=time.monotonic())
                return
        child = Child(connection_id=cid, pid=pid, settings=settings, started_at=time.monotonic())
        self.children[cid] = child
        self.by_pid[pid] = child
        self.started_since_cycle += 1
        logger.info("started connection {} (pid {})", cid, pid)
        status = self.early_exits.pop(pid, None)
        if status is not None:  # it exited before we knew its PID
            del self.children[cid]
            del self.by_pid[pid]
            self._exited(child, status)

    def _stop(self, child: Child, reason: str, restart: bool = False) -> None:
        if child.stop_sent_at is not None:
            return
        logger.info("stopping connection {} (pid {}): {}", child.connection_id, child.pid, reason)
        child.stop_reason = reason
        child.stop_sent_at = time.monotonic()
        self.events.send(ConnectionLog(connection_id=child.connection_id, level="INFO",
                                       message=f"stopping: {reason}"))
        self._signal(child, signal.SIGTERM)
        if restart:
            self.holds.pop(child.connection_id, None)

    def _signal(self, child: Child, sig: int) -> None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def _escalate_stops(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if (child.stop_sent_at is not None and not child.killed
                    and now - child.stop_sent_at > self.settings.stop_grace):
                logger.warning("connection {} (pid {}) did not stop within {:g} s; killing it",
                               child.connection_id, child.pid, self.settings.stop_grace)
                self._signal(child, signal.SIGKILL)
                child.killed = True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.zygote.pid:
                logger.warning("the zygote (pid {}) exited ({}); a new one starts with the next child",
                               pid, describe_exit(status))
                self.zygote.close()
                continue
            child = self.by_pid.pop(pid, None)
            if child is None:
                # A child can exit before the zygote has told us its PID.
                self.early_exits[pid] = status
                while len(self.early_exits) > 1000:
                    self.early_exits.pop(next(iter(self.early_exits)))
                continue
            del self.children[child.connection_id]
            self._exited(child, status)

    def _exited(self, child: Child, status: int) -> None:
        cid = child.connection_id
        how = describe_exit(status)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if child.stop_reason is not None:
            self.stopped_since_cycle += 1
            logger.info("connection {} (pid {}) stopped ({}; {})", cid, child.pid, child.stop_reason, how)
            self.wake_now = True  # a changed connection starts again at once
            return
        if code == exitcodes.GAVE_UP:
            logger.info("connection {} gave up; waiting out the {:g} s cool-down", cid,
                        self.settings.retry_cooldown)
            self.holds[cid] = Hold(until=time.monotonic() + self.settings.retry_cooldown,
                                   fingerprint=child.settings.fingerprint)
            return
        if code == exitcodes.CONFIG:
            # The child reported why; it stays stopped until the row changes.
            self.holds[cid] = Hold(until=float("inf"), fingerprint=child.settings.fingerprint)
            self.events.send(ConnectionLog(connection_id=cid, level="ERROR",
                                           message="the connection's settings are unusable; "
                                                   "it starts again once its row changes"))
            return
        wait = self._hold_after_crash(cid, child.started_at, child.settings.fingerprint)
        crashes = self.holds[cid].crashes
        if crashes > self.settings.crash_limit:
            self.holds[cid].until = float("inf")
            message = (f"the connection's process crashed {crashes} times in a row soon after starting "
                       f"(last: {how}); left stopped until its row changes or is_active is switched "
                       f"off and on")
            logger.error("connection {} (pid {}): {}", cid, child.pid, message)
            self.events.send(StatusChange(connection_id=cid, status="error", message=message))
            return
        message = f"the connection's process crashed ({how}); restarting it in {wait:.1f} s"
        logger.warning("connection {} (pid {}): {}", cid, child.pid, message)
        self.events.send(StatusChange(connection_id=cid, status="error", message=message,
                                      next_retry_at=time.time() + wait))

    def _hold_after_crash(self, cid: int, started_at: float, fingerprint: str | None = None) -> float:
        hold = self.holds.get(cid) or Hold()
        ran = time.monotonic() - started_at
        hold.crashes = 1 if ran >= STABLE_AFTER else hold.crashes + 1
        wait = backoff.delay(hold.crashes, self.settings.restart_base, self.settings.restart_cap)
        hold.until = time.monotonic() + wait
        hold.fingerprint = fingerprint
        self.holds[cid] = hold
        return wait

    def stop_all(self) -> None:
        """SIGTERM every child, reap while waiting up to the grace period, SIGKILL, reap."""
        for child in self.children.values():
            self._stop(child, "the monitor is stopping")
        deadline = time.monotonic() + self.settings.stop_grace
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for child in self.children.values():
            self._signal(child, signal.SIGKILL)
        zygote = self.zygote.pid
        self.zygote.close()  # it exits when its control socket closes
        deadline = time.monotonic() + 5
        while (self.children or (zygote and alive_child(zygote))) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)

    # -- devices

    def _mark_offline(self) -> dict[str, int]:
        counts = {kind: 0 for kind in DEVICE_KINDS}
        after = {"gateway": self.settings.gateway_offline_after,
                 "datalogger": self.settings.datalogger_offline_after,
                 "sensor": self.settings.sensor_offline_after}
        try:
            with self.db.transaction() as s:
                found = {kind: s.rows(f"mark_offline_{kind}s", {"after": after[kind]}) for kind in DEVICE_KINDS}
        except db.DatabaseError as exc:
            logger.warning("monitor {}: cannot mark devices offline ({})", self.instance_id, exc)
            return counts
        for kind, rows in found.items():
            counts[kind] = len(rows)
            for r in rows:
                self.events.send(DeviceChange(device_kind=kind, device_id=r["id"], site_id=r["site_id"],
                                              name=r["name"], online=False))
        return counts


def main() -> int:
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"sitelink monitor: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    process.raise_fd_limit()
    logs.setup("monitor", settings.log_level)
    try:
        database = db.wait_until_ready(settings.database_url, "sitelink-monitor")
    except db.SchemaBehind as exc:
        logger.error("{}", exc)
        return exitcodes.CONFIG
    return Monitor(settings, database).run()


if __name__ == "__main__":
    sys.exit(main())
