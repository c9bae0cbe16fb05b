"""The logger: the one writer of what the monitor and the children report.

It receives events on a ZeroMQ ROUTER, writes them to PostgreSQL in batches
(one transaction per batch), and only after the commit writes the file logs,
publishes status changes on the status feed (PUB) and acknowledges the events
to their senders. While PostgreSQL is unreachable it keeps the batch, stops
reading more than one batch (the senders keep the rest), retries with
backoff, and acknowledges nothing. An event that makes the transaction fail
is isolated, recorded as a ``DB_ERROR`` and acknowledged; the rest is stored.

Run it alone with ``python -m services.logger``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import zmq
from loguru import logger

from shared import backoff, config, db, exitcodes, logs, process, protocol
from shared.protocol import (Ack, Batch, ConnectionLog, Data, DeviceChange, Envelope, MonitorCycle,
                             ParseFailure, StatusChange)
from shared.signals import SignalPipe

PAYLOAD_SAMPLE_CHARS = 5000
STREAM_IDLE_FORGET = 3600.0
#: How long the committed floor of a sender process is kept in the database
#: (long after any process could re-send).
STREAM_ROWS_KEPT = 7 * 24 * 3600.0


# --------------------------------------------------------------------- helpers

def payload_sample(payload: bytes, limit: int = PAYLOAD_SAMPLE_CHARS) -> str:
    """JSON text for ``mqtt_parsing_log.payload_sample``, whatever the bytes.

    A payload that is JSON and short enough is kept as it is; anything else
    (too long, not UTF-8, not JSON, NUL characters that jsonb cannot hold)
    becomes ``{"sample": <text cut to limit>, "truncated": bool, ...}``.
    """
    try:
        text = payload.decode("utf-8")
        valid_utf8 = True
    except UnicodeDecodeError:
        text = payload.decode("utf-8", errors="backslashreplace")
        valid_utf8 = False
    if valid_utf8 and len(text) <= limit and "\x00" not in text and "\\u0000" not in text:
        try:
            return json.dumps(json.loads(text, parse_constant=_no_constants), allow_nan=False)
        except (ValueError, RecursionError):
            pass
    sample = {"sample": text[:limit].replace("\x00", "\\x00"), "truncated": len(text) > limit,
              "bytes": len(payload)}
    if not valid_utf8:
        sample["encoding"] = "not UTF-8; invalid bytes shown as \\xNN"
    return json.dumps(sample)


def _no_constants(name: str) -> None:
    raise ValueError(name)


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


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

    feed: list[tuple[str, dict]] = field(default_factory=list)
    connection_lines: list[tuple[str, str]] = field(default_factory=list)
    parsing_lines: list[tuple[str, str]] = field(default_factory=list)

    def extend(self, other: Outcome) -> None:
        self.feed += other.feed
        self.connection_lines += other.connection_lines
        self.parsing_lines += other.parsing_lines


# ------------------------------------------------------------- batch writing

def write_batch(s: db.Session, batch: list[Envelope]) -> Outcome:
    """Write ``batch`` inside the caller's transaction; return the after-commit work."""
    out = Outcome()
    connection_logs: list[dict] = []
    parse_logs: list[dict] = []
    data: list[tuple[Envelope, Data]] = []
    for env in batch:
        ev = env.event
        at = _at(env.ts)
        if isinstance(ev, StatusChange):
            _write_status(s, env, ev, out, connection_logs)
        elif isinstance(ev, ConnectionLog):
            connection_logs.append(dict(
                connection_id=ev.connection_id, at=at, level=ev.level, message=ev.message,
                exception_type=ev.exception_type, traceback=ev.traceback,
                broker_host=ev.broker_host, retry_attempt=ev.retry_attempt))
            out.connection_lines.append((ev.level, f"[connection {ev.connection_id}] {ev.message}"))
        elif isinstance(ev, ParseFailure):
            parse_logs.append(dict(
                connection_id=ev.connection_id, at=at, topic=ev.topic, parser_name=ev.parser_name,
                error_type=ev.error_type, error_message=ev.error_message,
                exception_type=ev.exception_type, traceback=ev.traceback,
                payload_sample=payload_sample(ev.payload)))
            out.parsing_lines.append(("ERROR", f"[connection {ev.connection_id}] [{ev.error_type}] "
                                               f"{ev.topic}: {ev.error_message}"))
        elif isinstance(ev, Data):
            data.append((env, ev))
        elif isinstance(ev, MonitorCycle):
            out.connection_lines.append(("DEBUG", (
                f"[monitor {ev.instance_id}] cycle: {ev.running} running, {ev.started} started, "
                f"{ev.stopped} stopped, offline {ev.offline}, {ev.duration * 1000:.0f} ms")))
            out.feed.append((f"monitor_cycle.{ev.instance_id}", {
                "type": "monitor_cycle", "instance_id": ev.instance_id, "running": ev.running,
                "started": ev.started, "stopped": ev.stopped, "offline": ev.offline,
                "duration": ev.duration, "timestamp": at.isoformat()}))
        elif isinstance(ev, DeviceChange):
            out.feed.append(_device_feed(ev.device_kind, ev.device_id, ev.site_id, ev.name,
                                         ev.online, at))
    if connection_logs:
        s.many("connection_log_insert", connection_logs)
    if parse_logs:
        s.many("parsing_log_insert", parse_logs)
    if data:
        _write_data(s, data, out)
    return out


def _write_status(s: db.Session, env: Envelope, ev: StatusChange, out: Outcome,
                  connection_logs: list[dict]) -> None:
    at = _at(env.ts)
    row = s.one(f"status_{ev.status}", dict(
        connection_id=ev.connection_id, at=at, message=ev.message,
        retry_attempt=ev.retry_attempt,
        next_retry_at=_at(ev.next_retry_at) if ev.next_retry_at is not None else None))
    level = status_level(ev)
    message = _disconnect_message(ev.message) if ev.status == "disconnected" else ev.message
    # The log keeps every event; the row and the feed only the newest state
    # (no row: the connection was deleted, or a newer status is already in).
    connection_logs.append(dict(
        connection_id=ev.connection_id, at=at, level=level, message=message,
        exception_type=ev.exception_type, traceback=ev.traceback, broker_host=ev.broker_host,
        retry_attempt=ev.retry_attempt))
    if row is None:
        out.connection_lines.append((level, f"[connection {ev.connection_id}] {message} "
                                            f"(an older status, not applied)"))
        return
    out.connection_lines.append((level, f"[site {row['site_id']} connection {ev.connection_id}] {message}"))
    body = {"type": "mqtt_status", "site_id": row["site_id"], "connection_id": ev.connection_id,
            "status": ev.status, "is_active": row["is_active"], "timestamp": at.isoformat(),
            "message": message}
    if ev.retry_attempt is not None:
        body["retry_attempt"] = ev.retry_attempt
    if ev.next_retry_at is not None:
        body["next_retry_at"] = _at(ev.next_retry_at).isoformat()
    if ev.gave_up:
        body["gave_up"] = True
    out.feed.append((f"mqtt_status.site.{row['site_id']}.conn.{ev.connection_id}", body))


def _device_feed(kind: str, device_id: int, site_id: int, name: str, online: bool,
                 at: datetime) -> tuple[str, dict]:
    return (f"device_status.site.{site_id}.{kind}.{device_id}", {
        "type": "device_status", "kind": kind, "id": device_id, "site_id": site_id, "name": name,
        "is_online": online, "timestamp": at.isoformat()})


def _write_data(s: db.Session, items: list[tuple[Envelope, Data]], out: Outcome) -> None:
    """Devices and readings for a batch, set-based: four statements whatever its size."""
    gateways: dict[tuple[int, str], datetime] = {}
    for env, ev in items:
        key = (ev.connection_id, ev.gateway)
        gateways[key] = max(gateways.get(key, _at(0)), _at(env.ts))
    rows = s.rows("upsert_gateways", {"connection_ids": [k[0] for k in gateways],
                                      "names": [k[1] for k in gateways],
                                      "seen": list(gateways.values())})
    gateway_id = {(r["connection_id"], r["name"]): r["id"] for r in rows}
    _announce(out, "gateway", rows)

    dataloggers: dict[tuple[int, str], datetime] = {}
    for env, ev in items:
        gw = gateway_id.get((ev.connection_id, ev.gateway))
        if gw is not None and ev.datalogger is not None:
            key = (gw, ev.datalogger)
            dataloggers[key] = max(dataloggers.get(key, _at(0)), _at(env.ts))
    datalogger_id: dict[tuple[int, str], int] = {}
    if dataloggers:
        rows = s.rows("upsert_dataloggers", {"gateway_ids": [k[0] for k in dataloggers],
                                             "names": [k[1] for k in dataloggers],
                                             "seen": list(dataloggers.values())})
        datalogger_id = {(r["gateway_id"], r["name"]): r["id"] for r in rows}
        _announce(out, "datalogger", rows)

    sensors: dict[tuple[int, int | None, str], datetime] = {}
    for env, ev in items:
        gw = gateway_id.get((ev.connection_id, ev.gateway))
        if gw is None:
            continue
        dl = datalogger_id.get((gw, ev.datalogger)) if ev.datalogger is not None else None
        for name in ev.sensors:
            key = (gw, dl, name)
            sensors[key] = max(sensors.get(key, _at(0)), _at(env.ts))
    if not sensors:
        return
    rows = s.rows("upsert_sensors", {"gateway_ids": [k[0] for k in sensors],
                                     "datalogger_ids": [k[1] for k in sensors],
                                     "names": [k[2] for k in sensors],
                                     "seen": list(sensors.values())})
    sensor_id = {(r["gateway_id"], r["datalogger_id"], r["name"]): r["id"] for r in rows}
    _announce(out, "sensor", rows)

    sensor_ids, stamps, values = [], [], []
    for env, ev in items:
        gw = gateway_id.get((ev.connection_id, ev.gateway))
        if gw is None:
            continue
        dl = datalogger_id.get((gw, ev.datalogger)) if ev.datalogger is not None else None
        for name, metrics in ev.sensors.items():
            sensor_ids.append(sensor_id[(gw, dl, name)])
            stamps.append(ev.ts)
            values.append(json.dumps(metrics, allow_nan=False))
    s.run("insert_readings", {"sensor_ids": sensor_ids, "ts": stamps, "values": values})


def _announce(out: Outcome, kind: str, rows: list[dict]) -> None:
    now = datetime.now(timezone.utc)
    for r in rows:
        if r["is_new"] or r["came_online"]:
            out.feed.append(_device_feed(kind, r["id"], r["site_id"], r["name"], True, now))


def _describe_event(env: Envelope) -> str:
    body = asdict(env.event)
    if isinstance(body.get("payload"), bytes):
        body["payload"] = body["payload"].decode("utf-8", errors="backslashreplace")
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


class LoggerService:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 10_000)
        self.router.bind(settings.events_endpoint)
        self.feed = self.context.socket(zmq.PUB)
        self.feed.setsockopt(zmq.LINGER, 1000)
        self.feed.bind(settings.status_feed)
        self.db = db.Database(settings.database_url, "sitelink-logger")
        self.streams: dict[tuple[str, str], Stream] = {}
        self.pending: list[Envelope] = []
        self.batch_started: float | None = None
        self.db_failures = 0
        self.db_retry_at = 0.0
        self.feed_seq = 0
        self.connections_log = logs.channel("connections")
        self.parsing_log = logs.channel("parsing")
        self._last_prune = time.monotonic()

    # -- loop

    def run(self) -> None:
        signals = SignalPipe(signal.SIGTERM, signal.SIGINT)
        poller = zmq.Poller()
        poller.register(signals.fileno(), zmq.POLLIN)
        logger.info("logger ready: events on {}, status feed on {}",
                    self.settings.events_endpoint, self.settings.status_feed)
        try:
            while True:
                if signals.drain() & {signal.SIGTERM, signal.SIGINT}:
                    logger.info("stopping on signal")
                    break
                # Read no more than one batch: while PostgreSQL is down, the
                # rest waits in the senders, which keep it until acknowledged.
                can_receive = len(self.pending) < self.settings.batch_max
                poller.register(self.router, zmq.POLLIN if can_receive else 0)
                ready = dict(poller.poll(self._poll_timeout() * 1000))
                if ready.get(self.router):
                    self._receive()
                if self._batch_ready():
                    self._flush()
                self._prune()
        finally:
            self._shutdown()
            signals.close()

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        if not self.pending:
            return 1.0
        if self.db_retry_at > now:
            return self.db_retry_at - now
        assert self.batch_started is not None
        if len(self.pending) >= self.settings.batch_max:
            return 0.0
        return max(0.0, self.batch_started + self.settings.batch_wait - now)

    def _batch_ready(self) -> bool:
        if not self.pending:
            return False
        now = time.monotonic()
        if now < self.db_retry_at:
            return False
        assert self.batch_started is not None
        return (len(self.pending) >= self.settings.batch_max
                or now - self.batch_started >= self.settings.batch_wait)

    def _receive(self) -> None:
        now = time.monotonic()
        while len(self.pending) < self.settings.batch_max:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                logger.warning("dropped a message of {} frames (expected 2)", len(frames))
                continue
            identity, frame = frames
            try:
                message = protocol.decode(frame)
            except protocol.ProtocolError as exc:
                logger.warning("dropped an invalid message: {}", exc)
                continue
            if isinstance(message, Ack):
                continue
            for env in message.envelopes if isinstance(message, Batch) else (message,):
                self._take(identity, env, now)

    def _take(self, identity: bytes, env: Envelope, now: float) -> None:
        """Queue one received event for the next batch, unless already stored or queued."""
        stream = self.streams.get(env.stream)
        if stream is None:
            stream = self.streams[env.stream] = Stream()
        stream.identity = identity
        stream.last_seen = now
        if env.floor > stream.low:
            stream.low = env.floor
            stream.above = {seq for seq in stream.above if seq > env.floor}
            stream.advance()
        if env.seq <= stream.low or env.seq in stream.above:
            self._ack(env.incarnation, stream)  # a resend of something stored
            return
        if env.seq in stream.pending:
            return  # a resend of something in this batch
        stream.pending.add(env.seq)
        if not self.pending:
            self.batch_started = now
        self.pending.append(env)

    def _flush(self) -> None:
        batch = self.pending
        try:
            outcome = self._store(batch)
        except db.DatabaseError as exc:
            self.db_failures += 1
            wait = backoff.delay(self.db_failures, 0.5, self.settings.db_retry_cap)
            self.db_retry_at = time.monotonic() + wait
            logger.warning("cannot write to PostgreSQL ({}); keeping {} events unacknowledged, "
                           "attempt {} again in {:.1f} s", exc, len(batch), self.db_failures, wait)
            return
        if self.db_failures:
            logger.info("PostgreSQL is writable again after {} failed attempts; stored {} events",
                        self.db_failures, len(batch))
        self.db_failures = 0
        self.db_retry_at = 0.0
        self.pending = []
        self.batch_started = None
        self._after_commit(batch, outcome)

    def _store(self, batch: list[Envelope]) -> Outcome:
        try:
            with self.db.transaction() as s:
                out = write_batch(s, self._not_yet_stored(s, batch))
                self._record_progress(s, batch)
                return out
        except db.DataRejected as exc:
            logger.warning("a batch of {} events was rejected ({}); storing them one by one",
                           len(batch), exc)
        # Isolate the poison: each event in a savepoint of one transaction.
        out = Outcome()
        with self.db.transaction() as s:
            for env in self._not_yet_stored(s, batch):
                try:
                    with s.savepoint():
                        out.extend(write_batch(s, [env]))
                except db.DataRejected as exc:
                    self._record_rejected(s, env, exc, out)
            self._record_progress(s, batch)
        return out

    def _not_yet_stored(self, s: db.Session, batch: list[Envelope]) -> list[Envelope]:
        """Drop events an earlier logger already committed (their ack was lost)."""
        unknown = {env.stream for env in batch if not self.streams[env.stream].loaded}
        if unknown:
            rows = s.rows("stream_floors", {"senders": [k[0] for k in unknown],
                                            "incarnations": [k[1] for k in unknown]})
            for row in rows:
                stream = self.streams[(row["sender"], row["incarnation"])]
                stream.low = max(stream.low, row["committed_upto"])
                stream.advance()
            for key in unknown:
                self.streams[key].loaded = True
        return [env for env in batch if env.seq > self.streams[env.stream].low
                and env.seq not in self.streams[env.stream].above]

    def _record_progress(self, s: db.Session, batch: list[Envelope]) -> None:
        """Store, with the events, up to where each sender is now committed."""
        seqs: dict[tuple[str, str], set[int]] = {}
        for env in batch:
            seqs.setdefault(env.stream, set()).add(env.seq)
        upto = {key: self.streams[key].low_with(new) for key, new in seqs.items()}
        s.run("stream_commit", {"senders": [k[0] for k in upto], "incarnations": [k[1] for k in upto],
                                "upto": list(upto.values())})

    def _record_rejected(self, s: db.Session, env: Envelope, exc: Exception, out: Outcome) -> None:
        ev = env.event
        connection_id = getattr(ev, "connection_id", None)
        text = _describe_event(env)
        message = f"could not store a {ev.KIND} event: {exc}"
        out.parsing_lines.append(("ERROR", f"[connection {connection_id}] [DB_ERROR] {message}"))
        if connection_id is None:
            return
        try:
            with s.savepoint():
                s.run("parsing_log_insert", dict(
                    connection_id=connection_id, at=_at(env.ts), topic=getattr(ev, "topic", ""),
                    parser_name="", error_type="DB_ERROR", error_message=message,
                    exception_type=type(exc.__cause__ or exc).__name__, traceback="",
                    payload_sample=payload_sample(text.encode())))
        except db.DataRejected as again:
            logger.error("could not record the rejected event either ({}): {}", again, text[:2000])

    def _after_commit(self, batch: list[Envelope], outcome: Outcome) -> None:
        for level, line in outcome.connection_lines:
            self.connections_log.log(level, line)
        for level, line in outcome.parsing_lines:
            self.parsing_log.log(level, line)
        for topic, body in outcome.feed:
            self.feed_seq += 1
            body["seq"] = self.feed_seq
            self.feed.send_multipart([topic.encode(), json.dumps(body).encode()])
        touched: dict[str, Stream] = {}
        for env in batch:
            stream = self.streams.get(env.stream)
            if stream is None:
                continue
            stream.pending.discard(env.seq)
            if env.seq > stream.low:
                stream.above.add(env.seq)
            touched[env.incarnation] = stream
        for incarnation, stream in touched.items():
            stream.advance()
            self._ack(incarnation, stream)

    def _ack(self, incarnation: str, stream: Stream) -> None:
        try:
            self.router.send_multipart([stream.identity, protocol.encode(Ack(incarnation, stream.low))],
                                       zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the sender is gone or its queue is full; it resends and is acked then

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        for key in [k for k, st in self.streams.items()
                    if not st.pending and now - st.last_seen > STREAM_IDLE_FORGET]:
            del self.streams[key]
        try:
            with self.db.transaction() as s:
                s.run("stream_forget", {"after": STREAM_ROWS_KEPT})
        except db.DatabaseError as exc:
            logger.debug("could not prune sitelink_stream: {}", exc)

    def _shutdown(self) -> None:
        if self.pending and time.monotonic() >= self.db_retry_at:
            self._flush()
        if self.pending:
            logger.warning("exiting with {} events not stored; their senders will send them again",
                           len(self.pending))
        self.router.close(linger=0)
        self.feed.close(linger=1000)
        self.context.term()
        self.db.close()


def main() -> int:
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"sitelink logger: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    process.raise_fd_limit()
    logs.setup("logger", settings.log_level, channel_dir=settings.log_dir)
    try:
        db.wait_until_ready(settings.database_url, "sitelink-logger").close()
    except db.SchemaBehind as exc:
        logger.error("{}", exc)
        return exitcodes.CONFIG
    try:
        service = LoggerService(settings)
    except zmq.ZMQError as exc:
        logger.error("cannot bind {} / {}: {}", settings.events_endpoint, settings.status_feed, exc)
        return exitcodes.CONFIG
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
