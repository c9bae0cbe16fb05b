"""Retention: what grows with time, pruned after its age, a small step at a time.

Every ``SITELINK_RETENTION_INTERVAL`` seconds a round:
1. makes the partitions of ``reading`` for the weeks ahead (``AHEAD``), so
   data never waits for one and never lands in ``reading_default``;
2. deletes, oldest first, the rows older than their ``SITELINK_KEEP_*_DAYS``
   of ``mqtt_connection_log``, ``mqtt_status_history`` (each connection keeps
   its newest row at or before the cut: its state then), ``mqtt_parsing_log``
   and ``mqtt_quarantine``, at most ``SITELINK_RETENTION_BATCH`` rows per
   transaction;
3. when ``SITELINK_KEEP_READINGS_DAYS`` is set, drops the partitions of
   ``reading`` whose whole week is older, one per transaction, and deletes
   such rows from ``reading_default`` in batches.

Where it runs, and why it delays no monitor cycle: in the logger, between
two of its batches (``LoggerService`` calls ``step``), on a connection of
its own. The monitor never waits for the logger (its events are
asynchronous), and no step takes a lock the monitor's cycle needs: a DELETE
locks only the rows it deletes, in tables the monitor does not use;
dropping a partition locks ``reading`` alone. The one lock that could make a
cycle wait is ``sensor``'s, which attaching a new partition of ``reading``
takes (its foreign key) once a week: it is taken without waiting
(``NOWAIT``, so the step never queues ahead of the monitor's ``UPDATE
sensor``), held for the milliseconds an empty table takes to attach, and
tried again at the next round when it is busy. The logger itself gives
pruning at most ``SHARE`` of its time: after a step of *d* seconds the next
waits *d* x 9, so ingest slows by a tenth at worst while a large backlog is
pruned, and a step is one short transaction (its statements bounded by
``STATEMENT_TIMEOUT``, its locks by ``LOCK_TIMEOUT``). In a fleet, one
logger at a time prunes (an advisory lock); the others skip.

Why the logger rather than a program of its own: the logger is the writer
of these tables, and making the partitions of ``reading`` ahead is part of
writing readings: whoever runs a logger (the embedded stack, or
``supervisor_conf/sitelink.conf`` on a supervisord of one's own) gets it,
with nothing more to configure, deploy or forget.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from loguru import logger

from shared import config, db

#: Most of the logger's time one round's steps take together.
SHARE = 0.1
#: How long a step waits for a lock (reading's, to make or drop a partition)
#: before it leaves that task to the next round.
LOCK_TIMEOUT = 0.2
#: Longest statement (and connect) of a step: steps take milliseconds, and
#: an unreachable PostgreSQL must not hold the logger long.
STATEMENT_TIMEOUT = 2.0
#: Partitions of reading are made this far ahead; with less, the step
#: waits for sensor's lock (within LOCK_TIMEOUT) instead of trying it once.
AHEAD = 28 * 86400
PATIENT_BELOW = 7 * 86400
#: The advisory lock of the pruning logger of a database.
LOCK_KEY = 0x5173_7e7e
DAY = 86400.0


@dataclass(frozen=True)
class Task:
    table: str
    kind: str  # "rows": a batched DELETE; "add" / "drop": a partition of reading
    query: str
    keep_days: float | None = None

    def describe(self) -> str:
        if self.kind == "add":
            return f"{self.table}: partitions for the next {AHEAD // 86400} days"
        days = f"{self.keep_days:g} day{'s' if self.keep_days != 1 else ''}"
        return f"{self.table}: {'rows' if self.kind == 'rows' else 'weeks'} older than {days}"


def tasks(settings: config.Settings) -> list[Task]:
    """What a round does, in order, given the settings (a table kept forever is not pruned)."""
    found = [Task("reading", "add", "reading_partition_add")]
    for table, query, keep in (
            ("mqtt_connection_log", "prune_connection_log", settings.keep_connection_log_days),
            ("mqtt_status_history", "prune_status_history", settings.keep_status_history_days),
            ("mqtt_parsing_log", "prune_parsing_log", settings.keep_parsing_log_days),
            ("mqtt_quarantine", "prune_quarantine", settings.keep_quarantine_days)):
        if keep is not None:
            found.append(Task(table, "rows", query, keep))
    if settings.keep_readings_days is not None:
        found.append(Task("reading", "drop", "reading_partition_drop", settings.keep_readings_days))
        found.append(Task("reading_default", "rows", "prune_reading_default", settings.keep_readings_days))
    return found


@dataclass
class Round:
    started: float = field(default_factory=time.monotonic)
    rows: Counter = field(default_factory=Counter)  # table -> rows deleted
    steps: Counter = field(default_factory=Counter)  # table -> transactions
    partitions: list[str] = field(default_factory=list)  # what was made or dropped
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{table}: {n} rows deleted in {self.steps[table]} "
                 f"transaction{'s' if self.steps[table] > 1 else ''}" for table, n in self.rows.items() if n]
        parts += self.partitions + self.problems
        return "; ".join(parts)


class Retention:
    """The rounds of pruning; the logger calls ``step`` whenever it is between batches."""

    def __init__(self, settings: config.Settings, database: db.Database | None = None):
        self.settings = settings
        self.db = database or db.Database(settings.database_url, "sitelink-retention", bound=STATEMENT_TIMEOUT)
        self.tasks = tasks(settings)
        self.next_round = time.monotonic()  # the first at once: partitions ahead before anything else
        self.next_step = 0.0
        self.todo: list[Task] = []
        self.round: Round | None = None
        self.patient = False  # the partitions ahead run short: wait for sensor's lock

    def wait(self) -> float:
        """Seconds until ``step`` has something to do."""
        due = self.next_step if self.todo else self.next_round
        return max(0.0, due - time.monotonic())

    def step(self) -> bool:
        """One step of the round, if one is due: one transaction. Return whether it ran."""
        now = time.monotonic()
        if not self.todo:
            if now < self.next_round:
                return False
            self.todo, self.round = list(self.tasks), Round()
        elif now < self.next_step:
            return False
        task = self.todo[0]
        more = False
        try:
            with self.db.transaction() as s:
                if not s.one("retention_lock", {"key": LOCK_KEY})["locked"]:
                    logger.debug("retention: another logger is pruning; skipping this round")
                    self.todo = []
                else:
                    s.run("retention_lock_timeout", {"ms": f"{int(LOCK_TIMEOUT * 1000)}ms"})
                    more = self._run(s, task)
        except db.DatabaseUnavailable as exc:  # PostgreSQL away, or a step beyond STATEMENT_TIMEOUT
            self._problem(task, exc)
            self.todo = [task]  # the round ends with this step: no waiting on every task in turn
        except db.DatabaseError as exc:  # a lock not granted in time: this task waits for the next round
            self._problem(task, exc)
        spent = time.monotonic() - now
        self.next_step = time.monotonic() + spent * (1 - SHARE) / SHARE
        if not more and self.todo:
            self.todo.pop(0)
        if not self.todo:
            self._end_round()
        return True

    def _run(self, s: db.Session, task: Task) -> bool:
        """Run one step of ``task``; return whether it has more to do."""
        assert self.round is not None
        if task.kind == "rows":
            deleted = s.run(task.query, {"keep": task.keep_days * DAY, "batch": self.settings.retention_batch})
            self.round.rows[task.table] += deleted
            self.round.steps[task.table] += 1
            return deleted >= self.settings.retention_batch
        if task.kind == "add":
            ahead = s.one("reading_covered")["ahead"]
            self.patient = ahead is None or ahead < PATIENT_BELOW
            made = s.one(task.query, {"ahead": AHEAD, "patient": self.patient})["partition"]
            if made:
                self.round.partitions.append(f"partition {made} made")
            return made is not None
        dropped = s.one(task.query, {"keep": task.keep_days * DAY})["partition"]
        if dropped:
            self.round.partitions.append(f"partition {dropped} dropped")
        return dropped is not None

    def _problem(self, task: Task, exc: db.DatabaseError) -> None:
        assert self.round is not None
        if task.kind == "add" and isinstance(exc, db.LockNotGranted) and not self.patient:
            # sensor busy when tried once: weeks ahead remain, the next round tries again
            logger.debug("retention: {} not now ({}); next round", task.describe(), exc)
            return
        self.round.problems.append(f"could not do {task.describe()} ({exc})")

    def _end_round(self) -> None:
        round_, self.round = self.round, None
        self.next_round = time.monotonic() + self.settings.retention_interval
        if round_ is None:
            return
        summary = round_.summary()
        if round_.problems:
            logger.warning("retention: {} ({:.2f} s); next round in {:g} s", summary,
                           time.monotonic() - round_.started, self.settings.retention_interval)
        elif summary:
            logger.info("retention: {} ({:.2f} s)", summary, time.monotonic() - round_.started)

    def close(self) -> None:
        self.db.close()
