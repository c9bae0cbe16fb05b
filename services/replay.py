"""Replay the quarantine: parse kept payloads again, store what now parses, once.

    python -m services.admin replay [--site NAME|ID] [--since ISO] [--until ISO]
                                    [--error-type TYPE]... [--dry-run]

Each quarantined payload that matches (``mqtt_quarantine_matching``) is
parsed again with the parser its site's connection has *now*, under the
rules of the live path (``SITELINK_MAX_PAYLOAD``, the records limit, the
logger's checks of every field). What parses is stored by the logger's own
``write_batch`` (devices registered, ``reading``'s natural key), and the row
is marked replayed (when, the outcome, the parser, the records or the new
error) in the same transaction: a row once stored is never replayed again,
and a second replay says so. Rows are taken in batches (``BATCH_ROWS``,
``BATCH_BYTES``), each locked for the batch (``SKIP LOCKED``: two replays at
once share the work instead of storing twice).

The logger is the one writer of the live path; replay writes through the same
functions in its own transactions, beside it: the inserts are all ``ON
CONFLICT`` (a device or reading the logger writes meanwhile is written once),
and the feed is not told (a snapshot shows the devices a replay registered).
"""

from __future__ import annotations

import os
import secrets
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from services.logger import write_batch
from shared import config, db, limits, parsers, protocol
from shared.protocol import Data, Envelope

#: Payloads parsed again in one transaction, at most, and their bytes.
BATCH_ROWS = 200
BATCH_BYTES = 32 * 1024 * 1024
#: Rows listed one by one in the report, per kind (the counts cover all).
LISTED = 50
#: Attempts at a batch that deadlocks with the logger (both write the same devices).
ATTEMPTS = 3

STORED, FAILED, NOT_REPLAYABLE, ALREADY = "stored", "still failing", "not replayable", "already stored"
OUTCOMES = (STORED, FAILED, NOT_REPLAYABLE, ALREADY)


class ReplayError(Exception):
    """The replay cannot run as asked (an unknown site)."""


@dataclass(frozen=True)
class Filters:
    site: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    error_types: tuple[str, ...] = ()

    def params(self, site_id: int | None) -> dict:
        return {"site_id": site_id, "since": self.since, "until": self.until,
                "error_types": list(self.error_types) or None}

    def describe(self, site: str | None) -> str:
        parts = [f"site {site}"] if site else []
        if self.since:
            parts.append(f"received since {self.since.isoformat()}")
        if self.until:
            parts.append(f"before {self.until.isoformat()}")
        if self.error_types:
            parts.append("error type " + " or ".join(self.error_types))
        return ", ".join(parts) or "every site, any time, every error type"


@dataclass(frozen=True)
class Attempt:
    """What parsing one quarantined payload again gave."""

    events: tuple[Data, ...] = ()
    parser: str | None = None
    error_type: str | None = None  # None with error: not the payload's fault (no connection, unknown parser)
    error: str | None = None

    @property
    def stored(self) -> bool:
        return self.error is None


@dataclass
class Report:
    dry_run: bool
    filters: str
    per_site: dict[str, Counter] = field(default_factory=dict)
    records: int = 0
    skipped: int = 0  # taken by another replay running at the same time
    listed: dict[str, list[str]] = field(default_factory=lambda: {FAILED: [], NOT_REPLAYABLE: []})
    unlisted: Counter = field(default_factory=Counter)

    def count(self, site: str, outcome: str, n: int = 1) -> None:
        self.per_site.setdefault(site, Counter())[outcome] += n

    def note(self, outcome: str, line: str) -> None:
        if len(self.listed[outcome]) < LISTED:
            self.listed[outcome].append(line)
        else:
            self.unlisted[outcome] += 1

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.per_site.values())

    def lines(self) -> list[str]:
        store = "would store" if self.dry_run else "stored"
        matched = sum(sum(c.values()) for c in self.per_site.values())
        head = f"replay{' (dry run: nothing is stored)' if self.dry_run else ''}: " \
               f"{matched} quarantined {_payloads(matched)} {'matches' if matched == 1 else 'match'} ({self.filters})"
        out = [head,
               f"  {store:<16} {self.total(STORED)} {_payloads(self.total(STORED))}, "
               f"{self.records} {'record' if self.records == 1 else 'records'}",
               f"  {FAILED:<16} {self.total(FAILED)} {_payloads(self.total(FAILED))}",
               f"  {NOT_REPLAYABLE:<16} {self.total(NOT_REPLAYABLE)} {_payloads(self.total(NOT_REPLAYABLE))} "
               f"(kept only in part, over SITELINK_MAX_PAYLOAD, or on a topic that is not UTF-8)",
               f"  {ALREADY:<16} {self.total(ALREADY)} {_payloads(self.total(ALREADY))} (by an earlier replay)"]
        if self.skipped:
            out.append(f"  skipped          {self.skipped} {_payloads(self.skipped)} "
                       f"(another replay was parsing them)")
        for site, counts in sorted(self.per_site.items()):
            out.append(f"  site {site}: " + ", ".join(
                f"{store if o == STORED else o} {counts[o]}" for o in OUTCOMES))
        for outcome in (FAILED, NOT_REPLAYABLE):
            if self.listed[outcome]:
                out.append(f"{outcome}:")
                out += [f"  {line}" for line in self.listed[outcome]]
                if self.unlisted[outcome]:
                    out.append(f"  ... and {self.unlisted[outcome]} more")
        return out


def _payloads(n: int) -> str:
    return "payload" if n == 1 else "payloads"


def parse_again(row: dict, max_payload: int) -> Attempt:
    """The live path's verdict on a quarantined payload today (``services.connection``'s ``_report``)."""
    if row["connection_id"] is None:
        return Attempt(error="its site has no connection now (no parser to use)")
    name = row["parser_name"]
    try:
        parser = parsers.get(name)
    except parsers.UnknownParser as exc:
        return Attempt(parser=name, error=str(exc))
    payload = bytes(row["payload"])
    if len(payload) > max_payload:
        return Attempt(parser=name, error_type="VALIDATION_ERROR",
                       error=f"payload of {len(payload)} bytes exceeds the limit of {max_payload} bytes "
                             f"(SITELINK_MAX_PAYLOAD)")
    try:
        records = parsers.parse_message(parser, payload, row["topic"])
        events = tuple(Data(connection_id=row["connection_id"], topic=row["topic"], gateway=r.gateway,
                            datalogger=r.datalogger, ts=r.ts, sensors=r.sensors) for r in records)
    except Exception as exc:  # a parser's bug is the payload's UNKNOWN_ERROR, as live
        return Attempt(parser=name, error_type=parsers.classify(exc), error=limits.cut(str(exc)))
    for event in events:
        problem = protocol.problem(event)  # what the logger's socket would refuse
        if problem:
            return Attempt(parser=name, error_type="VALIDATION_ERROR",
                           error=f"the logger would refuse its data: {problem}")
    return Attempt(events=events, parser=name)


class Replay:
    def __init__(self, database: db.Database, settings: config.Settings, filters: Filters, dry_run: bool):
        self.db = database
        self.settings = settings
        self.filters = filters
        self.dry_run = dry_run
        self.incarnation = f"{os.getpid()}.{secrets.token_hex(4)}"

    def run(self) -> Report:
        site_id, site = self._site()
        params = self.filters.params(site_id)
        report = Report(self.dry_run, self.filters.describe(site))
        with self.db.transaction() as s:
            for row in s.rows("quarantine_replay_summary", params):
                report.count(row["site"], ALREADY, row["already_stored"])
                report.count(row["site"], NOT_REPLAYABLE, row["not_replayable"])
            for row in s.rows("quarantine_not_replayable", {**params, "limit": LISTED}):
                cut = (f"only the first {row['kept_bytes']} of {row['payload_bytes']} bytes kept; "
                       if row["kept_bytes"] < row["payload_bytes"] else "")
                report.note(NOT_REPLAYABLE, f"{_where(row)}: {cut}was {row['error_type']}: "
                                            f"{limits.printable(row['error_message'][:300])}")
            report.unlisted[NOT_REPLAYABLE] = max(0, report.total(NOT_REPLAYABLE) - LISTED)
        after = 0
        while True:
            with self.db.transaction() as s:
                ids = _batch(s.rows("quarantine_replay_next", {**params, "after": after, "limit": BATCH_ROWS}))
            if not ids:
                return report
            after = ids[-1]
            self._batch(ids, report)

    def _site(self) -> tuple[int | None, str | None]:
        wanted = self.filters.site
        if wanted is None:
            return None, None
        with self.db.transaction() as s:
            rows = s.rows("site_by_name_or_id", {"name": wanted,
                                                 "id": int(wanted) if wanted.isdigit() and len(wanted) < 19 else None})
        if not rows:
            raise ReplayError(f"no site named {wanted!r}" + (" or with that id" if wanted.isdigit() else ""))
        return rows[0]["id"], rows[0]["name"]

    def _batch(self, ids: list[int], report: Report) -> None:
        for tries in range(1, ATTEMPTS + 1):
            try:
                with self.db.transaction() as s:
                    results = self._replay(s, s.rows("quarantine_replay_take", {"ids": ids}))
                break
            except db.DatabaseUnavailable:  # a deadlock with the logger over the same devices, say
                if tries == ATTEMPTS:
                    raise
        report.skipped += len(ids) - len(results)
        for row, attempt in results:
            if attempt.stored:
                report.count(row["site"], STORED)
                report.records += len(attempt.events)
            else:
                report.count(row["site"], FAILED)
                same = (attempt.error_type, attempt.error) == (row["error_type"], row["error_message"])
                was = "as when received" if same else \
                    f"was {row['error_type']}: {limits.printable(row['error_message'][:200])}"
                report.note(FAILED, f"{_where(row)}: {attempt.error_type or 'cannot replay'}: "
                                    f"{limits.printable(attempt.error or '')[:300]} ({was})")

    def _replay(self, s: db.Session, rows: list[dict]) -> list[tuple[dict, Attempt]]:
        results = [(row, parse_again(row, self.settings.max_payload)) for row in rows]
        if self.dry_run:
            return results
        try:
            with s.savepoint():
                refused = self._store(s, results)
        except db.DataRejected:
            # One payload's data that PostgreSQL refuses must not hold back the others.
            refused = {}
            for row, attempt in results:
                try:
                    with s.savepoint():
                        refused.update(self._store(s, [(row, attempt)]))
                except db.DataRejected as exc:
                    refused[row["id"]] = f"PostgreSQL refused its data: {exc}"
        results = [(row, Attempt(parser=a.parser, error=refused[row["id"]]) if row["id"] in refused else a)
                   for row, a in results]
        s.run("quarantine_mark_replayed", {
            "ids": [row["id"] for row, _ in results],
            "outcomes": ["stored" if a.stored else "failed" for _, a in results],
            "parsers": [a.parser for _, a in results],
            "records": [len(a.events) if a.stored else None for _, a in results],
            "error_types": [a.error_type for _, a in results],
            "errors": [None if a.stored else a.error for _, a in results]})
        return results

    def _store(self, s: db.Session, results: list[tuple[dict, Attempt]]) -> dict[int, str]:
        """Store the data of the payloads that parsed, through the logger's own path;
        return the payloads it refused (their connection is gone), with why."""
        envelopes, owner = [], {}
        for row, attempt in results:
            for event in attempt.events:
                seq = len(envelopes) + 1
                envelopes.append(Envelope(sender="replay", incarnation=self.incarnation, seq=seq, floor=0,
                                          ts=row["received_at"].timestamp(), event=event))
                owner[seq] = row["id"]
        if not envelopes:
            return {}
        outcome = write_batch(s, envelopes)
        return {owner[seq]: reason for items in outcome.refused.values() for seq, reason in items}


def _batch(rows: list[dict]) -> list[int]:
    """The ids of the first rows that fit BATCH_BYTES (at least one)."""
    ids, size = [], 0
    for row in rows:
        if ids and size + row["bytes"] > BATCH_BYTES:
            break
        ids.append(row["id"])
        size += row["bytes"]
    return ids


def _where(row: dict) -> str:
    return (f"#{row['id']} {row['site']} {row['received_at'].astimezone().strftime('%Y-%m-%d %H:%M:%S')} "
            f"{limits.printable(row['topic'][:200])}")


def replay(settings: config.Settings, filters: Filters, dry_run: bool,
           say: Callable[[str], None] = print) -> int:
    database = db.Database(settings.database_url, "sitelink-replay")
    try:
        report = Replay(database, settings, filters, dry_run).run()
    except ReplayError as exc:
        print(f"sitelink replay: {exc}", file=sys.stderr)
        return 2
    finally:
        database.close()
    for line in report.lines():
        say(line)
    return 0
