"""The logger: the one writer of what the monitor and the children report.

It receives events on a ZeroMQ ROUTER, writes them to PostgreSQL in batches
(one transaction per batch), and only after the commit writes the file logs,
publishes status changes on the status feed (PUB) and acknowledges the events
to their senders. Two lanes: status and flow changes and refusals are stored
(and published) as soon as they are read, in a short transaction of their own
before the data batch in progress; data waits to fill a batch
(SITELINK_BATCH_MAX, SITELINK_BATCH_WAIT) and is written by a thread of its
own, on a connection of its own (``DataWriter``), so that neither reading
nor the status lane waits while PostgreSQL writes a data batch. The batch
being written and the lanes being filled together hold at most one batch's
worth of events.

Its socket is a trust boundary. Only sitelink's processes can reach it (an
``ipc://`` socket in a private directory, or CURVE on TCP: ``shared/curve``),
and even so every frame is checked (``protocol.decode_events``): a frame it
cannot read is answered with a ``Refusal``; an envelope it cannot accept
(fields out of range, a child speaking for another connection, an unknown
connection) is recorded in the connection log and acknowledged with the
reason, so its sender moves on. An event PostgreSQL refuses, or that fails
in any other way than "the database is unreachable", is isolated from its
batch, recorded as a ``DB_ERROR`` and acknowledged; the rest is stored.

While PostgreSQL is unreachable it keeps one batch (at most
``SITELINK_BATCH_MAX`` events and ``MAX_BATCH_BYTES``), retries with backoff
and acknowledges nothing; it keeps reading its socket but drops what does
not fit (the senders keep it until acknowledged), and once the batch is
stored it asks the senders it dropped frames of to send again at once. Its
memory does not grow with the length of the outage.

Run it alone with ``python -m services.logger``.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import zmq
from loguru import logger

from services.retention import Retention
from shared import backoff, boot, config, curve, db, exitcodes, feed, logs, protocol, runfile
from shared.protocol import (Ack, ConnectionLog, Data, DeviceChange, Envelope, Flow, Invalid, MonitorCycle,
                             ParseFailure, Refusal, StatusChange)
from shared.signals import SignalPipe

PAYLOAD_SAMPLE_CHARS = 5000
#: A sender process silent this long is forgotten (a live one resends within
#: RESEND_CAP; a quiet site's child that speaks again has its floor read back
#: from sitelink_stream).
STREAM_IDLE_FORGET = 600.0
#: How long the committed floor of a sender process is kept in the database
#: (long after any process could re-send).
STREAM_ROWS_KEPT = 7 * 24 * 3600.0
#: A batch holds at most this many bytes of frames, whatever SITELINK_BATCH_MAX says.
MAX_BATCH_BYTES = 32 * 1024 * 1024
#: Allocations between two collections of the youngest generation (Python's default: 700).
GC_YOUNG = 20000
#: Frames queued per sender inside ZeroMQ before it blocks that sender.
RCVHWM = 1000
#: A sequence number this far above what a stream has committed is no real
#: sender's (a child holds at most SITELINK_MAX_UNACKED events).
SEQ_WINDOW = 10_000_000
#: Sender processes the logger keeps delivery state for; beyond, the idlest go
#: (their floor stays in sitelink_stream).
MAX_STREAMS = 20_000
#: Frames read in one go before the loop looks at its other sockets.
READ_BURST = 10_000
#: Once a status change is in, the logger still takes what is already queued
#: for at most this long, so that the statuses of a burst (a thousand children
#: starting, a broker coming back) share a commit instead of paying one each.
URGENT_GATHER = 0.005
#: In a burst (at least URGENT_BURST changes within URGENT_BURST_WINDOW s)
#: the statuses rarely queue up by themselves: they arrive a few ms apart.
#: The status lane then also waits up to URGENT_LINGER s for more before it
#: commits, so a start of hundreds of children pays far fewer commits, each
#: of which costs the logger and PostgreSQL CPU the starting children need
#: (tests/bench/RESULTS.md, "Child cost"). A lone change (a connection going
#: up or down, one at a time) never waits.
URGENT_LINGER = 0.02
URGENT_BURST = 16
URGENT_BURST_WINDOW = 0.1
#: How often the feed says when each site last sent data.
DATA_SEEN_EVERY = 5.0
#: Failures whose payload goes to the quarantine, for replay (a DB_ERROR is ours, not the payload's).
QUARANTINED = frozenset({"VALIDATION_ERROR", "PARSE_ERROR", "UNKNOWN_ERROR"})


# --------------------------------------------------------------------- helpers

def payload_sample(payload: bytes, limit: int = PAYLOAD_SAMPLE_CHARS, total_bytes: int | None = None) -> str:
    """JSON text for ``mqtt_parsing_log.payload_sample``, whatever the bytes.

    A payload that is JSON and short enough is kept as it is; anything else
    (too long, not UTF-8, not JSON, text that jsonb cannot hold: NUL, lone
    surrogates) becomes ``{"sample": <text cut to limit>, "truncated": bool,
    "bytes": <size>, ...}``. ``total_bytes``: the size of the whole payload
    when ``payload`` is only its beginning.
    """
    total = len(payload) if total_bytes is None else total_bytes
    try:
        text = payload.decode("utf-8")
        valid_utf8 = True
    except UnicodeDecodeError:
        text = payload.decode("utf-8", errors="backslashreplace")
        valid_utf8 = False
    if valid_utf8 and total == len(payload) and len(text) <= limit:
        try:
            out = json.dumps(json.loads(text, parse_constant=_no_constants), allow_nan=False,
                             ensure_ascii=False)
            out.encode("utf-8")  # a \ud800 escape decodes to a lone surrogate: not storable
            if "\\u0000" not in out:
                return out
        except (ValueError, RecursionError, UnicodeEncodeError):
            pass
    sample = {"sample": text[:limit].replace("\x00", "\\x00"),
              "truncated": len(text) > limit or total > len(payload), "bytes": total}
    if not valid_utf8:
        sample["encoding"] = "not UTF-8; invalid bytes shown as \\xNN"
    return json.dumps(sample)


def _no_constants(name: str) -> None:
    raise ValueError(name)


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _pg(text: str) -> str:
    """Text PostgreSQL can hold (it cannot hold NUL)."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _disconnect_message(reason: str) -> str:
    return f"Disconnected: {reason}" if reason else "Disconnected cleanly"


STATUS_LEVEL = {"connecting": "INFO", "connected": "INFO", "error": "ERROR"}


def status_level(event: StatusChange) -> str:
    if event.status == "disconnected":
        return "WARNING" if event.message else "INFO"
    return STATUS_LEVEL[event.status]


@dataclass
class Outcome:
    """What to do once a batch is committed."""

    feed: list[dict] = field(default_factory=list)  # bodies (shared/feed.py), published in order
    #: site id -> (name, the latest time one of its children received data)
    data_seen: dict[int, tuple[str | None, datetime]] = field(default_factory=dict)
    connection_lines: list[tuple[str, str]] = field(default_factory=list)
    parsing_lines: list[tuple[str, str]] = field(default_factory=list)
    #: Events recorded as refused, per stream: (seq, reason), told to the sender with its ack.
    refused: dict[tuple[str, str], list[tuple[int, str]]] = field(default_factory=dict)
    #: Devices this batch wrote: (kind, key, id, the time written as their last sight), for the cache.
    devices: list[tuple[str, tuple, int, float]] = field(default_factory=list)

    def extend(self, other: Outcome) -> None:
        self.feed += other.feed
        for site_id, (name, at) in other.data_seen.items():
            self.saw_data(site_id, name, at)
        self.connection_lines += other.connection_lines
        self.parsing_lines += other.parsing_lines
        for key, items in other.refused.items():
            self.refused.setdefault(key, []).extend(items)
        self.devices += other.devices

    def refuse(self, stream: tuple[str, str], seq: int, reason: str) -> None:
        self.refused.setdefault(stream, []).append((seq, reason))

    def saw_data(self, site_id: int, name: str | None, at: datetime) -> None:
        held = self.data_seen.get(site_id)
        if held is None or held[1] < at:
            self.data_seen[site_id] = (name, at)


# ------------------------------------------------------------- batch writing

Item = Envelope | Invalid
#: Events of the status lane (with every refusal): news a user waits for, never behind a data batch.
URGENT = (StatusChange, Flow)


#: A device written (its last sight) less than this long ago is not written again.
DEVICE_REFRESH = 1.0
#: Devices the cache holds at most (beyond, the stale go, then all).
DEVICE_CACHE_MAX = 50_000


class DeviceCache:
    """Devices whose last sight this logger committed less than DEVICE_REFRESH s ago.

    Their ids are known and their row is fresh, so a batch that only sees
    them again skips their upsert (three statements per batch, and a row
    version of each device each time). A device's last sight in the
    database thus lags by at most DEVICE_REFRESH; one that went offline
    (``mark_offline_*``, hundreds of seconds without data) cannot be fresh
    here, so its coming back online is still announced. Filled only after
    a commit (an id from a rolled-back batch is no id); emptied whenever a
    batch fails, since a stale id (a device deleted meanwhile) is a
    failure the batch is then written again without.
    """

    def __init__(self, refresh: float = DEVICE_REFRESH, limit: int = DEVICE_CACHE_MAX):
        self.refresh = refresh
        self.limit = limit
        #: (kind, key) -> (id, seen written, when written: monotonic)
        self.known: dict[tuple[str, tuple], tuple[int, float, float]] = {}

    def fresh(self, kind: str, key: tuple, seen: float, now: float) -> int | None:
        """The id of a device whose written sight is recent enough to stand for ``seen``."""
        held = self.known.get((kind, key))
        if held is None:
            return None
        dev_id, written, at = held
        if now - at >= self.refresh or seen - written >= self.refresh:
            return None
        return dev_id

    def learn(self, devices: list[tuple[str, tuple, int, float]], now: float) -> None:
        known = self.known
        for kind, key, dev_id, seen in devices:
            known[(kind, key)] = (dev_id, seen, now)
        if len(known) > self.limit:
            for k in [k for k, v in known.items() if now - v[2] >= self.refresh]:
                del known[k]
            if len(known) > self.limit:
                known.clear()

    def clear(self) -> None:
        self.known.clear()


def write_batch(s: db.Session, batch: list[Item], cache: DeviceCache | None = None) -> Outcome:
    """Write ``batch`` inside the caller's transaction; return the after-commit work.

    ``cache``: devices known fresh, whose upsert is skipped (the caller
    passes ``Outcome.devices`` to it once committed).
    """
    out = Outcome()
    batch, sites = _batch_context(s, batch)
    connection_logs: list[dict] = []
    parse_logs: list[dict] = []
    data: list[tuple[Envelope, Data]] = []
    statuses = _Statuses(out, connection_logs, sites)
    for env in batch:
        if isinstance(env, Invalid):
            _record_invalid(env, out, connection_logs)
            continue
        ev = env.event
        at = _at(env.ts)
        if isinstance(ev, StatusChange):
            statuses.add(env, ev)
        elif isinstance(ev, ConnectionLog):
            connection_logs.append(dict(
                connection_id=ev.connection_id, at=at, level=ev.level, message=_pg(ev.message),
                exception_type=_pg(ev.exception_type), traceback=_pg(ev.traceback),
                broker_host=_pg(ev.broker_host), retry_attempt=ev.retry_attempt))
            out.connection_lines.append((ev.level, f"[connection {ev.connection_id}] {ev.message}"))
        elif isinstance(ev, ParseFailure):
            quarantined = ev.error_type in QUARANTINED
            parse_logs.append(dict(
                connection_id=ev.connection_id, at=at, topic=_pg(ev.topic), parser_name=_pg(ev.parser_name),
                error_type=ev.error_type, error_message=_pg(ev.error_message),
                exception_type=_pg(ev.exception_type), traceback=_pg(ev.traceback),
                payload_sample=payload_sample(ev.payload[:protocol.MAX_PAYLOAD_SAMPLE_BYTES],
                                              total_bytes=ev.payload_bytes or len(ev.payload)),
                payload=ev.payload if quarantined else None, replayable=ev.replayable,
                payload_bytes=ev.payload_bytes or len(ev.payload)))
            out.parsing_lines.append(("ERROR", f"[connection {ev.connection_id}] [{ev.error_type}] "
                                               f"{ev.topic}: {ev.error_message}"))
        elif isinstance(ev, Data):
            data.append((env, ev))
        elif isinstance(ev, Flow):
            statuses.apply(s)  # it reads the row's status
            _write_flow(s, env, ev, out, connection_logs, sites)
        elif isinstance(ev, MonitorCycle):
            out.connection_lines.append(("DEBUG", (
                f"[monitor {ev.instance_id}] cycle: {ev.running} running, {ev.started} started, "
                f"{ev.stopped} stopped, offline {ev.offline}, {ev.duration * 1000:.0f} ms (ms: {ev.parts_text()})")))
            out.feed.append({"type": "monitor_cycle", "instance_id": ev.instance_id, "running": ev.running,
                             "started": ev.started, "stopped": ev.stopped, "offline": ev.offline,
                             "duration": ev.duration, "parts": ev.parts, "timestamp": at.isoformat()})
        elif isinstance(ev, DeviceChange):
            out.feed.append({**feed.device_body(ev.device_kind, {
                "id": ev.device_id, "site_id": ev.site_id, "site": sites.get(("site", ev.site_id)),
                "name": ev.name, "last_seen_at": _at(ev.last_seen) if ev.last_seen is not None else None},
                ev.online), "timestamp": at.isoformat()})
    statuses.apply(s)
    if connection_logs:
        s.many("connection_log_insert", connection_logs)
    if parse_logs:
        s.many("parsing_log_insert", parse_logs)
    if data:
        _write_data(s, data, out, sites, cache)
    return out


Sites = dict[tuple[str, int], object]


def _batch_context(s: db.Session, batch: list[Item]) -> tuple[list[Item], Sites]:
    """Events about a connection that does not exist are refused, not silently lost.

    Also returns the batch's context for the feed: ("conn", id) -> site id and
    ("site", id) -> site name.
    """
    ids = {env.event.connection_id for env in batch
           if isinstance(env, Envelope) and hasattr(env.event, "connection_id")}
    site_ids = {env.event.site_id for env in batch if isinstance(env, Envelope) and isinstance(env.event, DeviceChange)}
    if not ids and not site_ids:
        return batch, {}
    sites: Sites = {}
    for row in s.rows("batch_context", {"connection_ids": list(ids), "site_ids": list(site_ids)}):
        if row["connection_id"] is not None:
            sites[("conn", row["connection_id"])] = row["site_id"]
        sites[("site", row["site_id"])] = row["site"]
    if all(("conn", cid) in sites for cid in ids):
        return batch, sites
    return [Invalid(reason=f"connection {env.event.connection_id} does not exist (deleted?)",
                    sender=env.sender, incarnation=env.incarnation, seq=env.seq, kind=env.event.KIND)
            if isinstance(env, Envelope) and getattr(env.event, "connection_id", None) is not None
            and ("conn", env.event.connection_id) not in sites
            else env for env in batch], sites


def _record_invalid(item: Invalid, out: Outcome, connection_logs: list[dict]) -> None:
    """A refused envelope: a connection-log row when its connection exists, always a log line."""
    assert item.stream is not None and item.seq is not None
    message = f"refused an event from {item.sender} (#{item.seq}, {item.kind or 'unknown kind'}): {item.reason}"
    out.refuse(item.stream, item.seq, item.reason)
    out.connection_lines.append(("ERROR", f"[connection {item.connection_id or '-'}] {message}"))
    if item.connection_id is not None and "does not exist" not in item.reason:
        connection_logs.append(dict(
            connection_id=item.connection_id, at=datetime.now(timezone.utc), level="ERROR",
            message=_pg(message), exception_type="ProtocolError", traceback="", broker_host="",
            retry_attempt=None))


class _Statuses:
    """A batch's status changes, applied in as few statements as their order allows.

    ``add`` records each at its place in the batch (its connection-log row,
    its log line and feed body to come); ``apply`` runs them: wave k holds
    each connection's k-th status of the batch, one statement a wave, so a
    thousand children starting together cost a statement or two, not a
    thousand, and one connection's statuses still apply in their order.
    Whatever reads a row's status (a flow change) applies the statuses
    before it first.
    """

    def __init__(self, out: Outcome, connection_logs: list[dict], sites: Sites):
        self.out, self.connection_logs, self.sites = out, connection_logs, sites
        # (envelope, event, its message as logged, its places in out.connection_lines and out.feed)
        self.waiting: list[tuple[Envelope, StatusChange, str, int, int]] = []

    def add(self, env: Envelope, ev: StatusChange) -> None:
        message = _disconnect_message(ev.message) if ev.status == "disconnected" else ev.message
        # The log keeps every event; the row and the feed only the newest state.
        self.connection_logs.append(dict(
            connection_id=ev.connection_id, at=_at(env.ts), level=status_level(ev), message=_pg(message),
            exception_type=_pg(ev.exception_type), traceback=_pg(ev.traceback), broker_host=_pg(ev.broker_host),
            retry_attempt=ev.retry_attempt))
        self.out.connection_lines.append(_PLACE)
        self.out.feed.append(_PLACE)
        self.waiting.append((env, ev, message, len(self.out.connection_lines) - 1, len(self.out.feed) - 1))

    def apply(self, s: db.Session) -> None:
        if not self.waiting:
            return
        waves: list[list[tuple[Envelope, StatusChange]]] = []
        nth: dict[int, int] = {}
        for env, ev, *_ in self.waiting:
            k = nth.get(ev.connection_id, 0)
            nth[ev.connection_id] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append((env, ev))
        rows: dict[int, dict | None] = {}  # id(envelope) -> the row it updated
        for wave in waves:
            updated = {r["id"]: r for r in s.rows("status_set", _status_arrays(wave))}
            for env, ev in wave:
                rows[id(env)] = updated.get(ev.connection_id)
        for env, ev, message, line_at, feed_at in self.waiting:
            self._settled(env, ev, message, rows[id(env)], line_at, feed_at)
        self.waiting = []
        # A status not applied has no feed body; every place taken is filled now.
        self.out.feed[:] = [body for body in self.out.feed if body is not _PLACE]

    def _settled(self, env: Envelope, ev: StatusChange, message: str, row: dict | None, line_at: int,
                 feed_at: int) -> None:
        out, level = self.out, status_level(ev)
        if row is None:  # the connection was deleted, or a newer status is already in
            out.connection_lines[line_at] = (level, f"[connection {ev.connection_id}] {message} "
                                                    f"(an older status, not applied)")
            return  # its place in the feed stays _PLACE: dropped
        out.connection_lines[line_at] = (level, f"[site {row['site_id']} connection {ev.connection_id}] {message}")
        out.feed[feed_at] = feed.status_body(
            {**row, "site": self.sites.get(("site", row["site_id"]))}, message, timestamp=_at(env.ts).isoformat(),
            retry_attempt=ev.retry_attempt,
            next_retry_at=_at(ev.next_retry_at).isoformat() if ev.next_retry_at is not None else None,
            gave_up=ev.gave_up)


#: Where a status's log line and feed body go once it is applied (_Statuses).
_PLACE: typing.Any = object()


def _status_arrays(items: list[tuple[Envelope, StatusChange]]) -> dict[str, list]:
    """The parameters of ``status_set`` for ``items`` (one per connection)."""
    return {
        "ids": [ev.connection_id for _, ev in items],
        "statuses": [ev.status for _, ev in items],
        "ats": [_at(env.ts) for env, _ in items],
        "epochs": [ev.epoch for _, ev in items],
        # Applied only above the row's order (epoch, seq), never by comparing
        # the senders' clocks: ``at`` is only what people are shown.
        "seqs": [env.seq + (protocol.FINAL_RANK if ev.final else 0) for env, ev in items],
        "messages": [_pg(ev.message) for _, ev in items],
        "retry_attempts": [ev.retry_attempt for _, ev in items],
        "retry_ins": [ev.next_retry_at - env.ts if ev.next_retry_at is not None else None for env, ev in items],
    }


def _write_flow(s: db.Session, env: Envelope, ev: Flow, out: Outcome, connection_logs: list[dict],
                sites: Sites) -> None:
    at = _at(env.ts)
    if ev.paused:
        message = (f"paused: {ev.unacked} events wait for the logger to store them; not reading from the "
                   f"broker (which keeps the messages) until it catches up")
    else:
        message = "reading from the broker again: the logger caught up"
    connection_logs.append(dict(connection_id=ev.connection_id, at=at,
                                level="WARNING" if ev.paused else "INFO", message=message,
                                exception_type="", traceback="", broker_host="", retry_attempt=None))
    out.connection_lines.append(("WARNING" if ev.paused else "INFO", f"[connection {ev.connection_id}] {message}"))
    row = s.one("set_flow", dict(connection_id=ev.connection_id, paused=ev.paused, at=at, epoch=ev.epoch))
    if row is not None:
        out.feed.append(feed.status_body({**row, "site": sites.get(("site", row["site_id"]))}, message,
                                         timestamp=at.isoformat(), retry_attempt=None, next_retry_at=None,
                                         gave_up=False))


def _upsert_named(s: db.Session, out: Outcome, sites: Sites, cache: DeviceCache | None, kind: str, parent: str,
                  seen: dict[tuple[int, str], float], now: float) -> dict:
    """Upsert the ``kind`` devices (gateways under a connection, dataloggers under a
    gateway) seen in a batch, keyed by (``parent`` id, name) with their latest
    sight, except those the cache says were written just now; their ids, all of them."""
    ids, fresh = _known(cache, kind, seen, now)
    if fresh:
        rows = s.rows(f"upsert_{kind}s", {f"{parent}s": [k[0] for k in fresh], "names": [k[1] for k in fresh],
                                          "seen": [_at(ts) for ts in fresh.values()]})
        _learned(out, kind, fresh, ids, {(r[parent], r["name"]): r["id"] for r in rows})
        _announce(out, kind, rows, sites)
    return ids


def _write_data(s: db.Session, items: list[tuple[Envelope, Data]], out: Outcome, sites: Sites,
                cache: DeviceCache | None = None) -> None:
    """Devices and readings for a batch, set-based: at most four statements whatever its size.

    A device ``cache`` holds fresh is not upserted again (its id is known).
    """
    now = time.monotonic()
    # Times kept as epoch seconds, made datetimes once per device (not per reading).
    gateways: dict[tuple[int, str], float] = {}
    site_seen: dict[int, float] = {}
    for env, ev in items:
        key = (ev.connection_id, ev.gateway)
        ts = env.ts
        if gateways.get(key, -1.0) < ts:
            gateways[key] = ts
        site_id = sites.get(("conn", ev.connection_id))
        if site_id is not None and site_seen.get(site_id, -1.0) < ts:
            site_seen[site_id] = ts
    for site_id, ts in site_seen.items():
        out.saw_data(site_id, sites.get(("site", site_id)), _at(ts))
    gateway_id = _upsert_named(s, out, sites, cache, "gateway", "connection_id", gateways, now)

    dataloggers: dict[tuple[int, str], float] = {}
    for env, ev in items:
        gw = gateway_id.get((ev.connection_id, ev.gateway))
        if gw is not None and ev.datalogger is not None:
            key = (gw, ev.datalogger)
            if dataloggers.get(key, -1.0) < env.ts:
                dataloggers[key] = env.ts
    datalogger_id = _upsert_named(s, out, sites, cache, "datalogger", "gateway_id", dataloggers, now)

    sensors: dict[tuple[int, int | None, str], float] = {}
    for env, ev in items:
        gw = gateway_id.get((ev.connection_id, ev.gateway))
        if gw is None:
            continue
        dl = datalogger_id.get((gw, ev.datalogger)) if ev.datalogger is not None else None
        ts = env.ts
        for name in ev.sensors:
            key = (gw, dl, name)
            if sensors.get(key, -1.0) < ts:
                sensors[key] = ts
    if not sensors:
        return
    sensor_id, sensors = _known(cache, "sensor", sensors, now)
    if sensors:
        rows = s.rows("upsert_sensors", {"gateway_ids": [k[0] for k in sensors],
                                         "datalogger_ids": [k[1] for k in sensors],
                                         "names": [k[2] for k in sensors],
                                         "seen": [_at(ts) for ts in sensors.values()]})
        _learned(out, "sensor", sensors, sensor_id,
                 {(r["gateway_id"], r["datalogger_id"], r["name"]): r["id"] for r in rows})
        _announce(out, "sensor", rows, sites)

    sensor_ids, stamps, values = [], [], []
    for env, ev in items:
        gw = gateway_id.get((ev.connection_id, ev.gateway))
        if gw is None:
            continue
        dl = datalogger_id.get((gw, ev.datalogger)) if ev.datalogger is not None else None
        for name, metrics in ev.sensors.items():
            sensor_ids.append(sensor_id[(gw, dl, name)])
            stamps.append(ev.ts)
            values.append(metrics)
    s.run("insert_readings", {"sensor_ids": sensor_ids, "ts": stamps, "values": _json(values)})


def _known(cache: DeviceCache | None, kind: str, seen: dict, now: float) -> tuple[dict, dict]:
    """Split a batch's devices: (ids of those ``cache`` holds fresh, the others with their sight)."""
    if cache is None or not cache.known:
        return {}, seen
    ids, rest = {}, {}
    for key, ts in seen.items():
        dev_id = cache.fresh(kind, key, ts, now)
        if dev_id is None:
            rest[key] = ts
        else:
            ids[key] = dev_id
    return ids, rest


def _learned(out: Outcome, kind: str, written: dict, ids: dict, rows: dict) -> None:
    """Add the upserted devices' ids to ``ids`` and to what the cache learns after the commit."""
    ids.update(rows)
    out.devices += [(kind, key, rows[key], ts) for key, ts in written.items() if key in rows]


#: One encoder for every batch (json.dumps with an option builds a new one per
#: call); the protocol admits finite numbers only, so NaN never reaches it.
_json = json.JSONEncoder(allow_nan=False).encode


def _announce(out: Outcome, kind: str, rows: list[dict], sites: Sites) -> None:
    now = datetime.now(timezone.utc).isoformat()
    for r in rows:
        if r["is_new"] or r["came_online"]:
            out.feed.append({**feed.device_body(kind, {**r, "site": sites.get(("site", r["site_id"]))}, True),
                             "timestamp": now})


def _describe_event(env: Envelope) -> str:
    body = asdict(env.event)
    if isinstance(body.get("payload"), bytes):  # its beginning: what a parsing-log sample can show
        body["payload"] = body["payload"][:protocol.MAX_PAYLOAD_SAMPLE_BYTES].decode("utf-8", errors="backslashreplace")
    return json.dumps({"kind": env.event.KIND, "sender": env.sender, "seq": env.seq, **body},
                      default=str)


# ----------------------------------------------------------------- the service

@dataclass
class Stream:
    """Delivery state of one sender process: what is committed, what is pending."""

    identity: bytes = b""
    low: int = 0  # every seq <= low is committed
    above: set[int] = field(default_factory=set)  # committed seqs > low
    pending: set[int] = field(default_factory=set)  # received, not yet committed
    last_seen: float = 0.0
    loaded: bool = False  # its committed floor was read from the database

    def low_with(self, committed: set[int]) -> int:
        """What ``low`` becomes once ``committed`` is stored too."""
        low = self.low
        while low + 1 in self.above or low + 1 in committed:
            low += 1
        return low

    def advance(self) -> None:
        while self.low + 1 in self.above:
            self.low += 1
            self.above.discard(self.low)


#: What storing a batch came to: what to do once committed, or why to try again later.
Result = Outcome | Exception
#: A data batch to write: the batch, the part of it not yet stored, and each sender's floor once it is.
Job = tuple[list[Item], list[Item], dict[tuple[str, str], int]]


class DataWriter:
    """The data lane's writer: one batch at a time, on a thread of its own.

    While PostgreSQL writes a data batch (its statements and its durable
    commit, the longest wait of the logger), the main loop keeps reading its
    socket and stores and publishes status news on its own connection. The
    thread only runs ``store``, the database work; the main loop hands it a
    batch when none is in flight (``submit``) and takes the result back
    (``take``) when ``wake`` is readable, so the delivery state, the acks,
    the feed and the file logs stay on the main thread. ``job`` is the batch
    in flight, None when the writer is idle.
    """

    def __init__(self, context: zmq.Context, store: Callable[[Job], Result]):
        self.store = store
        self.job: Job | None = None
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        address = f"inproc://sitelink-data-writer-{id(self)}"
        self.wake = context.socket(zmq.PAIR)
        self.wake.setsockopt(zmq.LINGER, 0)
        self.wake.bind(address)
        self._ring = context.socket(zmq.PAIR)  # used by the thread only, from here on
        self._ring.setsockopt(zmq.LINGER, 0)
        self._ring.connect(address)
        self._thread = threading.Thread(target=self._run, name="data-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def batch(self) -> list[Item]:
        """The events of the batch in flight."""
        return self.job[0] if self.job is not None else []

    @property
    def senders(self) -> dict[tuple[str, str], int]:
        """The senders whose floors the batch in flight writes (with those floors)."""
        return self.job[2] if self.job is not None else {}

    def submit(self, job: Job) -> None:
        assert self.job is None
        self.job = job
        self.jobs.put(job)

    def take(self, block: bool = False) -> tuple[Job, Result] | None:
        """The batch in flight and its result, once written (``block``: wait for it)."""
        if self.job is None:
            return None
        try:
            self.wake.recv(0 if block else zmq.NOBLOCK)  # rung once the result is in
        except zmq.Again:
            return None
        job, self.job = self.job, None
        return job, self.results.get_nowait()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                result: Result = self.store(job)
            except Exception as exc:  # store() returns its failures; this is a bug of ours
                result = exc
            self.results.put(result)
            self._ring.send(b"")
        self._ring.close()

    def close(self) -> None:
        """Stop the thread (after the batch in flight, if any: take it first)."""
        self.jobs.put(None)
        self._thread.join()
        self.wake.close()


class Bursts:
    """Whether status news comes in a burst: URGENT_BURST changes within URGENT_BURST_WINDOW s."""

    def __init__(self) -> None:
        self.arrivals: deque[float] = deque(maxlen=URGENT_BURST)

    def arrived(self, now: float) -> bool:
        """Count one change that arrived at ``now``; True if it is part of a burst."""
        self.arrivals.append(now)
        return len(self.arrivals) == URGENT_BURST and now - self.arrivals[0] < URGENT_BURST_WINDOW


def _bind_events(context: zmq.Context, settings: config.Settings) -> tuple[zmq.Socket, curve.Gatekeeper | None]:
    """The ROUTER of the events: only sitelink's processes may talk to it."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, RCVHWM)
    router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
    gate = None
    endpoint = settings.events_endpoint
    if endpoint.startswith("ipc://"):
        # The directory is the guard: 0700, this user's.
        runfile.private_dir(Path(endpoint[len("ipc://"):]).parent)
    elif curve.needed(endpoint):
        keys = curve.load(settings.runtime_dir, server=True)
        gate = curve.Gatekeeper(context, keys.client_public)
        keys.secure_server(router)
    router.bind(endpoint)
    return router, gate


class LoggerService:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.context = zmq.Context()
        self.router, self.gate = _bind_events(self.context, settings)
        self.feed = self.context.socket(zmq.PUB)
        self.feed.setsockopt(zmq.LINGER, 1000)
        self.feed.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscriptions are short topic prefixes
        self.feed.bind(settings.status_feed)
        self.publisher = feed.Publisher(self.feed, f"{socket.gethostname()}/{os.getpid()}.{secrets.token_hex(3)}")
        self.snapshots = self.context.socket(zmq.ROUTER)
        self.snapshots.setsockopt(zmq.LINGER, 0)
        self.snapshots.setsockopt(zmq.MAXMSGSIZE, 4096)  # requests are a few bytes
        self.snapshots.setsockopt(zmq.SNDHWM, 100)
        self.snapshots.bind(settings.snapshot_endpoint)
        #: site id -> (name, latest data time) not yet said on the feed, and when it last was
        self.data_seen: dict[int, tuple[str | None, datetime]] = {}
        self.data_said_at = 0.0
        self.db = db.Database(settings.database_url, "sitelink-logger")
        self.streams: dict[tuple[str, str], Stream] = {}
        #: The data lane: readings, logs, parse failures; stored once full or SITELINK_BATCH_WAIT old.
        self.pending: list[Item] = []
        #: The status lane: status and flow changes and refusals, stored in a short
        #: transaction of their own before any data, as soon as they are read
        #: (in a burst: URGENT_LINGER later at most).
        self.urgent: list[Item] = []
        #: When the status lane is due: at once, or URGENT_LINGER after its first event in a burst.
        self.urgent_due = 0.0
        self.bursts = Bursts()
        self.pending_bytes = 0  # of both lanes
        #: The bytes of the data batch the writer is storing (they count against the bound too).
        self.inflight_bytes = 0
        #: Senders' floors committed (in memory) but not yet in sitelink_stream.
        self.floors_owed: dict[tuple[str, str], int] = {}
        self.batch_started: float | None = None
        self.db_failures = 0
        self.db_retry_at = 0.0
        #: Senders whose frames were dropped while the batch could not be stored.
        self.owed_resend: set[bytes] = set()
        self.dropped_frames = 0
        self.connections_log = logs.channel("connections")
        self.parsing_log = logs.channel("parsing")
        self.throttle = logs.Throttle()
        self._last_prune = time.monotonic()
        #: Pruning by age (services/retention.py), between batches, on a connection of its own.
        self.retention = Retention(settings)
        #: Devices whose last sight was just written: not upserted again for DEVICE_REFRESH s.
        #: (A device marked offline must not still be fresh here: at most half its offline delay.)
        self.devices = DeviceCache(min(DEVICE_REFRESH, settings.gateway_offline_after / 2,
                                       settings.datalogger_offline_after / 2, settings.sensor_offline_after / 2))
        #: The data lane's own connection, used by the writer's thread only (with the device cache).
        self.data_db = db.Database(settings.database_url, "sitelink-logger-data")
        self.writer = DataWriter(self.context, self._write_data_batch)

    # -- loop

    def run(self) -> None:
        signals = SignalPipe(signal.SIGTERM, signal.SIGINT)
        poller = zmq.Poller()
        poller.register(signals.fileno(), zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.snapshots, zmq.POLLIN)
        poller.register(self.writer.wake, zmq.POLLIN)
        if self.gate is not None:
            poller.register(self.gate.socket, zmq.POLLIN)
        logger.info("logger ready: events on {}{}, status feed on {} (snapshots on {}), as {}",
                    self.settings.events_endpoint, " (CURVE)" if self.gate is not None else "",
                    self.settings.status_feed, self.settings.snapshot_endpoint, self.publisher.incarnation)
        try:
            while True:
                if signals.drain() & {signal.SIGTERM, signal.SIGINT}:
                    logger.info("stopping on signal")
                    break
                # Full while a batch is being written: nothing to read until it is.
                waiting = self._full() and self.writer.busy
                poller.modify(self.router, 0 if waiting else zmq.POLLIN)
                ready = dict(poller.poll(self._poll_timeout() * 1000))
                if self.gate is not None and ready.get(self.gate.socket):
                    self.gate.answer()
                if ready.get(self.writer.wake):
                    self._take_written()
                if ready.get(self.router):
                    self._receive()
                if self._batch_ready():
                    self._flush()
                if ready.get(self.snapshots):
                    self._answer_snapshot()
                self._say_data_seen()
                self.publisher.heartbeat()
                self._prune()
                if not self.pending and not self.urgent and not self.writer.busy and not self.db_failures:
                    self._pay_floors()
                    if not self.db_failures:
                        self.retention.step()
        finally:
            self._shutdown()
            signals.close()

    def _full(self) -> bool:
        """Both lanes and the batch being written together hold at most
        SITELINK_BATCH_MAX events and MAX_BATCH_BYTES."""
        return (len(self.pending) + len(self.urgent) + len(self.writer.batch) >= self.settings.batch_max
                or self.pending_bytes + self.inflight_bytes >= MAX_BATCH_BYTES)

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        if not self.pending and not self.urgent:
            return min(1.0, feed.HEARTBEAT_EVERY, self.retention.wait())
        if self.db_retry_at > now:
            return self.db_retry_at - now
        if self._full() and (self.urgent or not self.writer.busy):
            return 0.0
        due = self.urgent_due if self.urgent else now + 1.0
        if self.pending and not self.writer.busy:
            assert self.batch_started is not None
            due = min(due, self.batch_started + self.settings.batch_wait)
        elif self.writer.busy and not self.urgent:
            return 1.0  # the writer's wake ends the wait
        return max(0.0, due - now)

    def _data_ready(self, now: float) -> bool:
        if not self.pending:
            return False
        assert self.batch_started is not None
        return self._full() or now - self.batch_started >= self.settings.batch_wait

    def _batch_ready(self) -> bool:
        now = time.monotonic()
        if now < self.db_retry_at:
            return False
        return self._urgent_ready(now) or (self._data_ready(now) and not self.writer.busy)

    def _urgent_ready(self, now: float) -> bool:
        return bool(self.urgent) and (now >= self.urgent_due or self._full())

    def _receive(self) -> None:
        now = time.monotonic()
        gather_until = None
        for _ in range(READ_BURST):
            if self._full() and now >= self.db_retry_at:
                return  # store this batch first; the rest waits in ZeroMQ's queue
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0]
            if self._full():
                # PostgreSQL is away and the batch is full: keep nothing more
                # (the sender keeps it), ask for it again once stored.
                self.owed_resend.add(identity)
                self.dropped_frames += 1
                continue
            try:
                self._take_frame(identity, frames, now)
            except Exception:  # a frame must never stop the logger
                logger.exception("could not take a frame of {} bytes; dropped it",
                                 sum(len(f) for f in frames))
            if self.urgent and now >= self.db_retry_at:
                # Status news is stored and published first: what is queued
                # already joins it for URGENT_GATHER at most (never waiting for
                # more); the rest waits in ZeroMQ's queue.
                if gather_until is None:
                    gather_until = time.monotonic() + URGENT_GATHER
                elif time.monotonic() >= gather_until:
                    return

    def _take_frame(self, identity: bytes, frames: list[bytes], now: float) -> None:
        if len(frames) != 2:
            self.throttle.warning("frames", "dropped a message of {} frames (expected 2)", len(frames))
            self._reply(identity, protocol.encode(Refusal(f"a message has {len(frames) - 1} frames, not 1")))
            return
        frame = frames[1]
        try:
            items = protocol.decode_events(frame)
        except protocol.ProtocolError as exc:
            self.throttle.warning("invalid", "dropped an invalid frame of {} bytes: {}", len(frame), exc)
            self._reply(identity, protocol.encode(Refusal(str(exc))))
            return
        size = len(frame) // len(items) + 1
        for item in items:
            if isinstance(item, Envelope):
                self._take(identity, item, item.seq, now, size)
            elif item.stream is None or item.seq is None:
                self.throttle.warning("unattributable", "dropped an envelope nobody can be told about: {}",
                                      item.reason)
            else:
                self.throttle.warning("refused", "refusing an event from {} (#{}): {}", item.sender,
                                      item.seq, item.reason)
                self._take(identity, item, item.seq, now, size)

    def _take(self, identity: bytes, item: Item, seq: int, now: float, size: int) -> None:
        """Queue one received item for the next batch, unless already stored or queued."""
        key = (item.sender, item.incarnation)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = Stream()
        stream.identity = identity
        stream.last_seen = now
        if seq <= stream.low or seq in stream.above:
            self._ack(item.incarnation, stream)  # a resend of something stored
            return
        if seq in stream.pending:
            return  # a resend of something in this batch
        if stream.loaded and seq > stream.low + SEQ_WINDOW and isinstance(item, Envelope):
            item = Invalid(f"sequence number {seq} is far beyond what this sender has stored ({stream.low})",
                           sender=item.sender, incarnation=item.incarnation, seq=seq, kind=item.event.KIND,
                           connection_id=getattr(item.event, "connection_id", None))
        stream.pending.add(seq)
        self.pending_bytes += size
        if isinstance(item, Invalid) or isinstance(item.event, URGENT):
            burst = self.bursts.arrived(now)
            if not self.urgent:
                self.urgent_due = now + URGENT_LINGER if burst else now
            self.urgent.append(item)
            return
        if not self.pending:
            self.batch_started = now
        self.pending.append(item)

    def _flush(self, everything: bool = False) -> None:
        """The status lane first, in its own transaction; then the data batch, if it is
        due, to the writer (``everything``: and wait until it is written).

        A status event thus never waits for a data batch being filled or
        written. The order per sender still holds where it matters: a status
        row only takes a newer (epoch, seq); the sender's floor and acks count
        only what is committed, whichever lane committed it.
        """
        if self.urgent and (everything or self._urgent_ready(time.monotonic())) and not self._flush_urgent():
            return
        if self.pending and not self.writer.busy and (everything or self._data_ready(time.monotonic())):
            self._hand_over()
            if everything:
                self._take_written(block=True)
        if not self.pending and not self.urgent:
            self.pending_bytes = 0

    def _flush_urgent(self) -> bool:
        """Store the status lane on the main connection; False if it has to wait.

        The floors of senders with events in the batch being written are left
        to the writer (owed, see ``_take_written``): the two lanes' transactions
        never update the same ``sitelink_stream`` row at once, so neither waits
        for the other's commit.
        """
        batch, busy = self.urgent, self.writer.senders

        def prepare(s: db.Session) -> tuple[list[Item], dict[tuple[str, str], int]]:
            kept = self._not_yet_stored(batch, s)
            return kept, {key: upto for key, upto in self._floors(batch).items() if key not in busy}
        if not self._settle(batch, self._attempt(batch, self.db, None, prepare)):
            return False
        for key in {(item.sender, item.incarnation) for item in batch} & busy.keys():
            stream = self.streams.get(key)
            if stream is not None:  # committed now: owed (only after the commit, never before)
                self.floors_owed[key] = max(stream.low, self.floors_owed.get(key, 0))
        self.urgent = []
        return True

    def _hand_over(self) -> None:
        """Give the data batch to the writer; the main loop goes on reading meanwhile."""
        batch = self.pending
        try:
            kept = self._not_yet_stored(batch)
        except db.DatabaseError as exc:
            self._retry_later(exc, len(self.pending) + len(self.urgent))
            return
        floors = self._floors(batch)
        for key, upto in self.floors_owed.items():
            floors[key] = max(upto, floors.get(key, 0))
        self.inflight_bytes = self.pending_bytes
        self.pending, self.pending_bytes, self.batch_started = [], 0, None
        self.writer.submit((batch, kept, floors))

    def _write_data_batch(self, job: Job) -> Result:
        """The writer thread's work: touches only its connection and the device cache."""
        batch, kept, floors = job
        return self._attempt(batch, self.data_db, self.devices, lambda s: (kept, floors))

    def _take_written(self, block: bool = False) -> None:
        """The data batch is written (or has to wait): settle it."""
        done = self.writer.take(block)
        if done is None:
            return
        (batch, _, floors), result = done
        held, self.inflight_bytes = self.inflight_bytes, 0
        if isinstance(result, Exception):  # to be tried again: in front of what came meanwhile
            self.pending = batch + self.pending
            self.pending_bytes += held
            self.batch_started = self.batch_started or time.monotonic()
        if not self._settle(batch, result):
            return
        # A status lane that committed meanwhile may have moved a floor past
        # what this batch wrote: owed, and written with the next data batch or
        # once the logger is idle (a restart before would store those statuses
        # again), not in a commit of its own per batch.
        owed = self.floors_owed
        for key, upto in floors.items():
            if owed.get(key, -1) <= upto:
                owed.pop(key, None)
            stream = self.streams.get(key)
            if stream is not None and stream.low > upto:
                owed[key] = stream.low

    def _pay_floors(self) -> None:
        """Write the floors owed (see ``_take_written``) while there is nothing else to do."""
        if not self.floors_owed:
            return
        owed, self.floors_owed = self.floors_owed, {}
        try:
            with self.db.transaction() as s:
                self._record_floors(s, owed)
        except db.DatabaseError as exc:
            self._retry_later(exc, 0)
            for key, upto in owed.items():
                self.floors_owed[key] = max(upto, self.floors_owed.get(key, 0))

    def _attempt(self, batch: list[Item], database: db.Database, devices: DeviceCache | None,
                 prepare: Callable[[db.Session], tuple[list[Item], dict[tuple[str, str], int]]]) -> Result:
        """Store ``batch``: the outcome, or the failure that says to try again later
        (PostgreSQL unreachable, or a systemic error such as privileges)."""
        try:
            return self._store(batch, database, devices, prepare)
        except db.DatabaseUnavailable as exc:
            return exc
        except db.DatabaseError as exc:
            if isinstance(exc, db.DataRejected):
                return self._give_up_on(batch, exc)
            return exc  # nothing wrong with the events: try again
        except Exception as exc:  # a bug of ours must not stop every site: record, ack, go on
            logger.exception("could not store a batch of {} events", len(batch))
            return self._give_up_on(batch, exc)

    def _settle(self, batch: list[Item], result: Result) -> bool:
        """After a batch: acks, feed and logs once committed; False if it has to wait."""
        if isinstance(result, Exception):
            self._retry_later(result, len(self.pending) + len(self.urgent) + len(self.writer.batch))
            return False
        outcome = result
        if self.db_failures:
            logger.info("PostgreSQL is writable again after {} failed attempts; stored {} events{}",
                        self.db_failures, len(batch),
                        f", dropped {self.dropped_frames} frames meanwhile (their senders send them again)"
                        if self.dropped_frames else "")
        self.db_failures = 0
        self.db_retry_at = 0.0
        self.dropped_frames = 0
        self._after_commit(batch, outcome)
        return True

    def _retry_later(self, exc: Exception, events: int) -> None:
        self.db_failures += 1
        wait = backoff.delay(self.db_failures, 0.5, self.settings.db_retry_cap)
        self.db_retry_at = time.monotonic() + wait
        logger.warning("cannot write to PostgreSQL ({}); keeping {} events unacknowledged, "
                       "attempt {} again in {:.1f} s", exc, events, self.db_failures, wait)

    def _store(self, batch: list[Item], database: db.Database, devices: DeviceCache | None,
               prepare: Callable[[db.Session], tuple[list[Item], dict[tuple[str, str], int]]]) -> Outcome:
        """Write ``batch`` on ``database``; ``prepare`` gives, inside each attempt's
        transaction, what of it is not yet stored and each sender's floor once it is."""
        def forget_devices() -> None:  # a failed batch may have failed on a stale id
            if devices is not None:
                devices.clear()
        # With the devices known fresh first; if that fails, once more without
        # them (an id may be stale: a device deleted meanwhile), then one by one.
        for cache in ((devices, None) if devices is not None and devices.known else (None,)):
            try:
                with database.transaction() as s:
                    kept, floors = prepare(s)
                    out = write_batch(s, kept, cache)
                    self._record_floors(s, floors)
                    return out
            except db.DatabaseUnavailable:
                forget_devices()
                raise
            except db.DatabaseError as exc:
                forget_devices()
                if not isinstance(exc, db.DataRejected):
                    raise
                if cache is None:
                    logger.warning("a batch of {} events was rejected ({}); storing them one by one",
                                   len(batch), exc)
            except Exception as exc:  # e.g. a value our own code cannot convert
                forget_devices()
                if cache is None:
                    logger.warning("a batch of {} events failed ({}: {}); storing them one by one",
                                   len(batch), type(exc).__name__, exc)
        # Isolate the poison: each event in a savepoint of one transaction.
        out = Outcome()
        with database.transaction() as s:
            kept, floors = prepare(s)
            for env in kept:
                try:
                    with s.savepoint():
                        out.extend(write_batch(s, [env]))
                except db.DatabaseUnavailable:
                    raise
                except Exception as exc:
                    if isinstance(exc, db.DatabaseError) and not isinstance(exc, db.DataRejected):
                        raise
                    self._record_rejected(s, env, exc, out)
            self._record_floors(s, floors)
        return out

    def _give_up_on(self, batch: list[Item], exc: Exception) -> Outcome:
        """The last resort when even one by one fails: say so, acknowledge, go on."""
        out = Outcome()
        reason = f"the logger could not store it: {type(exc).__name__}: {exc}"[:protocol.MAX_REASON_CHARS]
        for item in batch:
            out.refuse((item.sender, item.incarnation), item.seq, reason)
        logger.error("acknowledging {} events that could not be stored ({})", len(batch), reason)
        return out

    def _not_yet_stored(self, batch: list[Item], s: db.Session | None = None) -> list[Item]:
        """Drop events an earlier logger already committed (their ack was lost).

        The floors of senders not seen yet are read in ``s``, or in a
        transaction of the main connection's own.
        """
        unknown = {(item.sender, item.incarnation) for item in batch
                   if not self.streams[(item.sender, item.incarnation)].loaded}
        if unknown:
            params = {"senders": [k[0] for k in unknown], "incarnations": [k[1] for k in unknown]}
            if s is None:
                with self.db.transaction() as own:
                    rows = own.rows("stream_floors", params)
            else:
                rows = s.rows("stream_floors", params)
            for row in rows:
                stream = self.streams[(row["sender"], row["incarnation"])]
                stream.low = max(stream.low, row["committed_upto"])
                stream.advance()
            for key in unknown:
                self.streams[key].loaded = True
        kept = []
        for item in batch:
            stream = self.streams[(item.sender, item.incarnation)]
            if item.seq > stream.low and item.seq not in stream.above:
                kept.append(item)
        return kept

    def _floors(self, batch: list[Item]) -> dict[tuple[str, str], int]:
        """Up to where each sender of ``batch`` is committed once it is."""
        seqs: dict[tuple[str, str], set[int]] = {}
        for item in batch:
            seqs.setdefault((item.sender, item.incarnation), set()).add(item.seq)
        return {key: self.streams[key].low_with(new) for key, new in seqs.items()}

    @staticmethod
    def _record_floors(s: db.Session, floors: dict[tuple[str, str], int]) -> None:
        """Store, with the events, up to where each sender is committed (in the
        senders' order, so that two transactions lock their rows alike; the two
        lanes do not even share rows: ``_flush_urgent``)."""
        if not floors:
            return
        keys = sorted(floors)
        s.run("stream_commit", {"senders": [k[0] for k in keys], "incarnations": [k[1] for k in keys],
                                "upto": [floors[k] for k in keys]})

    def _record_rejected(self, s: db.Session, env: Item, exc: Exception, out: Outcome) -> None:
        if isinstance(env, Invalid):  # its own row failed: the log line and the ack remain
            out.refuse((env.sender, env.incarnation), env.seq, env.reason)
            return
        ev = env.event
        connection_id = getattr(ev, "connection_id", None)
        text = _describe_event(env)
        message = f"could not store a {ev.KIND} event: {exc}"
        out.parsing_lines.append(("ERROR", f"[connection {connection_id}] [DB_ERROR] {message}"))
        out.refuse(env.stream, env.seq, message[:protocol.MAX_REASON_CHARS])
        if connection_id is None:
            return
        try:
            with s.savepoint():
                s.run("parsing_log_insert", dict(
                    connection_id=connection_id, at=_at(env.ts), topic=_pg(getattr(ev, "topic", "")),
                    parser_name="", error_type="DB_ERROR", error_message=_pg(message),
                    exception_type=type(exc.__cause__ or exc).__name__, traceback="",
                    payload_sample=payload_sample(text.encode()), payload=None, replayable=None,
                    payload_bytes=None))
        except db.DatabaseUnavailable:
            raise
        except db.DataRejected as again:
            logger.error("could not record the rejected event either ({}): {}", again, text[:2000])

    def _after_commit(self, batch: list[Item], outcome: Outcome) -> None:
        if outcome.devices:
            self.devices.learn(outcome.devices, time.monotonic())
        for level, line in outcome.connection_lines:
            self.connections_log.log(level, line)
        for level, line in outcome.parsing_lines:
            self.parsing_log.log(level, line)
        for body in outcome.feed:
            self.publisher.publish(body)
        for site_id, (name, at) in outcome.data_seen.items():
            held = self.data_seen.get(site_id)
            if held is None or held[1] < at:
                self.data_seen[site_id] = (name, at)
        touched: dict[tuple[str, str], Stream] = {}
        for item in batch:
            key = (item.sender, item.incarnation)
            stream = self.streams.get(key)
            if stream is None:
                continue
            stream.pending.discard(item.seq)
            if item.seq > stream.low:
                stream.above.add(item.seq)
            touched[key] = stream
        owed, self.owed_resend = self.owed_resend, set()
        for key, stream in touched.items():
            stream.advance()
            self._ack(key[1], stream, outcome.refused.get(key, ()), resend=stream.identity in owed)
        for key, stream in self.streams.items():
            if stream.identity in owed and key not in touched:
                self._ack(key[1], stream, resend=True)

    def _ack(self, incarnation: str, stream: Stream, refused: Iterable[tuple[int, str]] = (),
             resend: bool = False) -> None:
        refused = tuple(refused)
        # An ack holds a bounded number of refusals; more are told in the next ones.
        while True:
            message = Ack(incarnation, stream.low, refused[:protocol.MAX_REFUSALS_PER_ACK], resend)
            try:
                self.router.send_multipart([stream.identity, protocol.encode(message)], zmq.NOBLOCK)
            except zmq.ZMQError:
                return  # the sender is gone or its queue is full; it resends and is acked then
            refused = refused[protocol.MAX_REFUSALS_PER_ACK:]
            if not refused:
                return

    def _say_data_seen(self) -> None:
        """When each site last sent data, at most every DATA_SEEN_EVERY s (not per reading)."""
        now = time.monotonic()
        if not self.data_seen or now - self.data_said_at < DATA_SEEN_EVERY:
            return
        self.data_said_at = now
        seen, self.data_seen = self.data_seen, {}
        for site_id, (name, at) in sorted(seen.items()):
            self.publisher.publish({"type": "site_data", "site_id": site_id, "site": name,
                                    "last_data_at": at.isoformat(), "timestamp": at.isoformat()})

    def _answer_snapshot(self) -> None:
        """One snapshot request per loop pass: the whole state, valid at the feed's current seq."""
        try:
            frames = self.snapshots.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        # From a REQ socket: identity, empty delimiter, request; from a DEALER maybe no delimiter.
        head = frames[:2] if len(frames) >= 3 and frames[1] == b"" else frames[:1]
        try:
            with self.db.transaction() as s:
                connections = s.rows("feed_connections")
                devices = s.rows("feed_devices")
                sites = s.rows("feed_site_data")
        except db.DatabaseError as exc:
            reply = feed.snapshot_error(f"cannot read PostgreSQL: {exc}")
        else:
            reply = self.publisher.snapshot_reply(
                [feed.status_body(r, r["error_message"], timestamp=feed.iso(r["status_changed_at"]),
                                  retry_attempt=r["mqtt_retry_count"], next_retry_at=feed.iso(r["mqtt_next_retry"]),
                                  gave_up=False) for r in connections],
                [*(feed.device_body(r["kind"], r, r["is_online"]) for r in devices),
                 *({"type": "site_data", "site_id": r["site_id"], "site": r["site"],
                    "last_data_at": feed.iso(r["last_data_at"])} for r in sites)])
        try:
            self.snapshots.send_multipart([*head, *reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the asker is gone or does not read; it asks again

    def _reply(self, identity: bytes, frame: bytes) -> None:
        try:
            self.router.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < 60 and len(self.streams) <= MAX_STREAMS:
            return
        self._last_prune = now
        idle = sorted((st.last_seen, key) for key, st in self.streams.items() if not st.pending)
        excess = max(0, len(self.streams) - MAX_STREAMS)
        for last_seen, key in idle:
            if now - last_seen > STREAM_IDLE_FORGET or excess > 0:
                del self.streams[key]
                excess -= 1
        try:
            with self.db.transaction() as s:
                s.run("stream_forget", {"after": STREAM_ROWS_KEPT})
        except db.DatabaseError as exc:
            logger.debug("could not prune sitelink_stream: {}", exc)

    def _shutdown(self) -> None:
        self._take_written(block=True)
        if (self.pending or self.urgent) and time.monotonic() >= self.db_retry_at:
            self._flush(everything=True)
        self.writer.close()
        if not self.pending and not self.urgent and time.monotonic() >= self.db_retry_at:
            self._pay_floors()
        if self.pending or self.urgent:
            logger.warning("exiting with {} events not stored; their senders will send them again",
                           len(self.pending) + len(self.urgent))
        self.router.close(linger=0)
        self.snapshots.close(linger=0)
        self.feed.close(linger=1000)
        if self.gate is not None:
            self.gate.close()
        self.context.term()
        self.db.close()
        self.data_db.close()
        self.retention.close()


def main() -> int:
    settings = boot.start("logger", lambda s: "sitelink: logger", "sitelink-logger", files=True)
    try:
        service = LoggerService(settings)
    except (zmq.ZMQError, OSError, ValueError) as exc:
        logger.error("cannot listen on {} / {}: {}", settings.events_endpoint, settings.status_feed, exc)
        return exitcodes.CONFIG
    # Everything made so far lives as long as the process: frozen, no
    # collection walks it again. A data batch is thousands of young dicts that
    # die by reference count once written: collected every GC_YOUNG
    # allocations instead of 700, they are mostly gone by then. Under ingest
    # the defaults paused the logger about once a second for 12-39 ms (a full
    # collection over the imported modules) and often for 3-23 ms (younger
    # ones): the tail of the status feed's latency. With both, the feed bench
    # saw one pause above 3 ms in its 45 s.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 10, 10)
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
