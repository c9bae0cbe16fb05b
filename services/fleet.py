"""The monitor's side of the database: membership of the fleet, claims, and
the LISTEN connection that wakes it.

A fleet is every monitor on one PostgreSQL. Each has a row in
``sitelink_monitor`` (its heartbeat, written at each cycle); it is live while
that heartbeat is within its lease by PostgreSQL's clock. Each connection is
run by the monitor process holding its claim (``claim_owner``), a lease that
PostgreSQL lets nobody else take until it is released or has expired.

The share rule (``share``): with ``active`` active connections and the live
monitors' capacities ``c_i`` (SITELINK_MAX_CONNECTIONS, unlimited by
default), each monitor holds at most ``min(c_i, level)`` connections (plus
``SLACK``), ``level`` the least number with ``sum(min(c_i, level)) >= active``:
without capacities, ``ceil(active / live monitors)``; what a capped monitor
cannot take is spread over the others.

Every call is bounded (``settings.db_bound``: connect, statement, TCP) and
raises ``db.DatabaseError`` on failure; the monitor decides what it means.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from loguru import logger

from shared import backoff, config, db

#: Connections a monitor may hold beyond its share before it hands any over,
#: so that a share that moves by one does not move a connection back and forth.
SLACK = 1
#: How often a database outage is logged again while it lasts.
OUTAGE_REPORT_EVERY = 60.0
DEVICE_KINDS = ("gateway", "datalogger", "sensor")
#: Every row is read again at least this often (s), whatever changed: the
#: safety net of the reads of changes only (a trigger disabled by hand).
FULL_READ_EVERY = 600.0
#: The columns of each changed row in monitor_read, in its order.
ROW_COLUMNS = ("id", "is_active", "status", "claimed_by", "claim_epoch", "config_hash", "is_due", "claim")


def share(active: int, capacities: list[int | None], mine: int | None) -> int:
    """How many of ``active`` connections a monitor of capacity ``mine`` should hold
    among live monitors of ``capacities`` (itself included; None = unlimited)."""
    if not capacities:
        capacities = [mine]

    def covered(level: int) -> int:
        return sum(level if c is None else min(c, level) for c in capacities)
    low, high = 0, active
    while low < high:  # the least level that covers every active connection
        middle = (low + high) // 2
        if covered(middle) >= active:
            high = middle
        else:
            low = middle + 1
    return low if mine is None else min(mine, low)


class MembershipLost(db.DatabaseError):
    """Another process took this monitor's instance id over: its claims are not to be trusted."""


@dataclass(frozen=True)
class Occupied:
    """Another live monitor has this instance id."""

    host: str
    pid: int
    silent_for: float


@dataclass(frozen=True)
class Snapshot:
    """What one cycle sees: the rows it may act on and the live monitors' capacities.

    ``fresh``: the ids of the rows read by this cycle, None if it read them all;
    the others are as the previous cycle read them, unchanged since (``Fleet.snapshot``).
    ``expiry_in``: seconds until the soonest claim of another monitor on an
    active row runs out; ``due_in``: until the soonest retry time of an active,
    unclaimed row comes (each None if there is none): when to look again."""

    rows: list[dict]
    capacities: list[int | None]
    fresh: frozenset[int] | None = None
    expiry_in: float | None = None
    due_in: float | None = None

    @property
    def active(self) -> int:
        return sum(1 for r in self.rows if r["is_active"])


@dataclass
class _Seen:
    """What the previous read saw: its rows (without their settings), horizon and time."""

    rows: dict[int, dict]
    horizon: int
    as_of: datetime | None  # PostgreSQL's now() of that read
    full_at: float  # time.monotonic() of the last read of every row


class Fleet:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.instance_id = settings.instance_id
        #: This monitor process: claims belong to it, not to the instance id.
        self.incarnation = f"{settings.instance_id}/{socket.gethostname()}/{os.getpid()}/{time.time_ns():x}"
        self.db = db.Database(settings.database_url, "sitelink-monitor", bound=settings.db_bound)
        self.listener: db.Listener | None = None
        self._listen_failures = 0
        self._listen_at = 0.0  # monotonic
        self._seen: _Seen | None = None  # what the previous snapshot read

    def _me(self) -> dict:
        return {"me": self.instance_id, "incarnation": self.incarnation}

    # -- membership

    def join(self, lock_key: str) -> Occupied | None:
        """Become the live member of this instance id; None when done.

        A predecessor with the same id is replaced once its heartbeat has
        expired, or at once if it recorded our ``lock_key``: it ran on this
        boot of this host, and we hold the lock every one of its processes
        held, so none of them is left. Its claims are then free at once.
        """
        with self.db.transaction() as s:
            row = s.one("monitor_member", {"me": self.instance_id})
            predecessor = None
            if row is not None:
                gone = row["lock_key"] == lock_key
                if not (row["expired"] or gone):
                    return Occupied(row["host"], row["pid"], row["silent_for"])
                predecessor = row["incarnation"]
                if gone:
                    s.run("release_owner", {"owner": predecessor})
            joined = s.one("monitor_join", {
                **self._me(), "host": socket.gethostname(), "pid": os.getpid(), "lock_key": lock_key,
                "lease": self.settings.claim_lease, "capacity": self.settings.max_connections,
                "predecessor": predecessor})
            if joined is None:  # another one joined between our two statements
                return Occupied("?", 0, 0.0)
            s.run("fleet_notify", {"payload": f"fleet:{self.incarnation}"})
        return None

    def snapshot(self, held: list[int], holds: int, known: Mapping[int, str] | None = None) -> Snapshot:
        """Heartbeat, the live monitors and the rows, in one transaction.

        Only the rows that changed since the previous snapshot are read
        (migration 0012): the others are as that one read them. Every row is
        read again at the first snapshot, after any failure, when the horizon
        went back (a database restored from a backup) and every FULL_READ_EVERY
        seconds, a safety net that costs what every cycle used to cost.

        ``known``: the configuration hash the caller has for each connection;
        only the rows with another one come with their broker settings (and
        the hash of those settings)."""
        known = known or {}
        seen, self._seen = self._seen, None  # restored only once this read succeeded
        if seen is not None and time.monotonic() - seen.full_at >= FULL_READ_EVERY:
            seen = None
        with self.db.transaction() as s:
            s.run("commit_without_waiting")
            if s.one("monitor_heartbeat", {**self._me(), "holds": holds,
                                           "capacity": self.settings.max_connections}) is None:
                raise MembershipLost(f"another monitor took instance id {self.instance_id!r} over")
            read = self._read(s, held, seen)
            if seen is not None and read["horizon"] < seen.horizon:
                seen = None  # PostgreSQL went back in time (restored from a backup): trust nothing
                read = self._read(s, held, seen)
            full = seen is None
            if seen is None:
                seen = _Seen({}, 0, None, time.monotonic())
            fresh = {r[0]: dict(zip(ROW_COLUMNS, r)) for r in read["changed"]}
            rows = [r for cid in read["ids"] if (r := fresh.get(cid) or seen.rows.get(cid)) is not None]
            now_seen = _Seen({r["id"]: r for r in rows}, read["horizon"], read["as_of"], seen.full_at)
            new = [r["id"] for r in rows if known.get(r["id"]) != r["config_hash"]]
            if new:
                settings = {r["id"]: r for r in s.rows("connection_settings", {"ids": new})}
                kept = []
                for r in rows:
                    if r["id"] in settings:
                        r = {**r, **settings[r["id"]]}
                    elif known.get(r["id"]) != r["config_hash"]:
                        continue  # deleted between the statements: gone, as if not read
                    kept.append(r)
                rows = kept
        self._seen = now_seen
        return Snapshot(rows, read["capacities"], None if full else frozenset(fresh),
                        read["expiry_in"], read["due_in"])

    def _read(self, s: db.Session, held: list[int], seen: _Seen | None) -> dict:
        read = s.one("monitor_read", {"incarnation": self.incarnation, "held": held,
                                      "since": None if seen is None else seen.horizon,
                                      "as_of": None if seen is None else seen.as_of})
        assert read is not None  # an aggregate: always one row
        return read

    def leave(self) -> None:
        """Release every claim and the membership; wake the others to take over at once."""
        with self.db.transaction() as s:
            s.run("release_claims_except", {**self._me(), "keep": []})
            s.run("monitor_leave", self._me())
            s.run("fleet_notify", {"payload": f"fleet:{self.incarnation}"})

    # -- claims

    def claim(self, ids: list[int], limit: int) -> dict[int, int]:
        """Claim up to ``limit`` of ``ids`` (ours first); return the epoch of each claim won."""
        if not ids or limit <= 0:
            return {}
        with self.db.transaction() as s:
            rows = s.rows("claim_connections", {**self._me(), "ids": ids, "limit": limit,
                                                "lease": self.settings.claim_lease})
        return {r["id"]: r["claim_epoch"] for r in rows}

    def renew(self, ids: list[int], keep: list[int] | None = None) -> set[int]:
        """Renew our claims on ``ids``; release those of ours neither renewed nor in ``keep``
        (claims renewed earlier, still ours); return those renewed."""
        with self.db.transaction() as s:
            renewed = {r["id"] for r in s.rows("renew_claims", {**self._me(), "ids": ids,
                                                                 "lease": self.settings.claim_lease})}
            kept = renewed if keep is None else renewed | (set(keep) - set(ids))
            s.run("release_claims_except", {**self._me(), "keep": list(kept)})
        return renewed

    def release(self, ids: list[int]) -> None:
        """Release our claims on ``ids`` and wake the other monitors to take them."""
        with self.db.transaction() as s:
            s.run("release_claims", {**self._me(), "ids": ids})
            s.run("fleet_notify", {"payload": f"fleet:{self.incarnation}"})

    # -- devices

    def mark_offline(self) -> dict[str, list[dict]]:
        after = {"gateway": self.settings.gateway_offline_after,
                 "datalogger": self.settings.datalogger_offline_after,
                 "sensor": self.settings.sensor_offline_after}
        with self.db.transaction() as s:
            return {kind: s.rows(f"mark_offline_{kind}s", {"after": after[kind]}) for kind in DEVICE_KINDS}

    # -- LISTEN: woken at once by changes of rows and of the fleet

    def listen(self) -> bool:
        """(Re-)establish the LISTEN connection when due; True when it was just made.

        Retried with backoff while it fails (the caller logs the outage)."""
        if self.listener is not None or time.monotonic() < self._listen_at:
            return False
        try:
            self.listener = db.Listener(self.settings.database_url, application_name="sitelink-monitor-listen",
                                        bound=self.settings.db_bound)
        except db.DatabaseError:
            self._listen_failures += 1
            self._listen_at = time.monotonic() + backoff.delay(
                self._listen_failures, 0.5, max(1.0, self.settings.monitor_interval))
            raise
        self._listen_failures = 0
        return True

    def listen_now(self) -> None:
        """PostgreSQL answers again: re-establish LISTEN at once, not at the end of its backoff."""
        self._listen_at = 0.0

    def fileno(self) -> int | None:
        return self.listener.fileno() if self.listener is not None else None

    def notified(self) -> bool:
        """Whether a notification that concerns us arrived (never blocks)."""
        if self.listener is None:
            return False
        try:
            payloads = self.listener.drain()
        except db.DatabaseError as exc:
            logger.warning("monitor {}: lost the LISTEN connection ({}); re-establishing it",
                           self.instance_id, exc)
            self.listener.close()
            self.listener = None
            return True  # what we may have missed meanwhile
        return any(p != f"fleet:{self.incarnation}" for p in payloads)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.db.close()


class Outage:
    """Logs a database outage once when it starts, every OUTAGE_REPORT_EVERY s
    while it lasts, and once when it ends, each on one line."""

    def __init__(self, instance_id: str, clock=time.monotonic):
        self.instance_id = instance_id
        self.clock = clock
        self.since: float | None = None
        self._reported_at = 0.0

    def failed(self, doing: str, exc: Exception, outlook: str) -> None:
        now = self.clock()
        if self.since is None:
            self.since = self._reported_at = now
            logger.warning("monitor {}: PostgreSQL unreachable ({}: {}); {}", self.instance_id, doing, exc, outlook)
        elif now - self._reported_at >= OUTAGE_REPORT_EVERY:
            self._reported_at = now
            logger.warning("monitor {}: PostgreSQL still unreachable after {:.0f} s ({}); {}",
                           self.instance_id, now - self.since, exc, outlook)

    def ended(self) -> bool:
        """A call succeeded; True if that ended an outage."""
        if self.since is None:
            return False
        logger.info("monitor {}: PostgreSQL reachable again after {:.1f} s", self.instance_id,
                    self.clock() - self.since)
        self.since = None
        return True
