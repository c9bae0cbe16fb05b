"""The public status feed: its format, and a subscriber any user can import.

One module owns the feed: the logger builds and publishes every message with
it, ``admin watch``, the status page and the tests read them with it. The
feed is for everyone (any ZeroMQ client in any language): each message is two
frames, a topic (UTF-8, dotted, so a subscriber filters by prefix) and a JSON
object. Every body carries:

``v``           the format version, ``FEED_VERSION`` (a new field is not a new
                version; a changed or removed one is)
``type``        ``mqtt_status``, ``device_status``, ``site_data``, ``monitor_cycle``
                or ``heartbeat``
``publisher``   the publishing logger's incarnation (a new one at each start)
``seq``         that publisher's message number: 1, 2, 3... (a heartbeat
                repeats the last one)
``timestamp``   ISO-8601, when the change happened

and, per type, the fields of ``STATUS_FIELDS``, ``DEVICE_FIELDS`` and
``CYCLE_FIELDS`` (README, "The status feed", documents each).

Late joiners and gaps (the ZeroMQ guide's "Clone" pattern): each logger also
answers snapshot requests (``SITELINK_SNAPSHOT_ENDPOINT``) with the full
current state, every connection and every device, read from PostgreSQL, and
the ``seq`` of its feed that state is valid at. A subscriber subscribes first,
then asks for the snapshot, then applies what the feed says after that
``seq``; a jump in ``seq`` (or a heartbeat ahead of what it saw, or a
publisher it does not know) means it missed something, and it asks again.
``FeedClient`` does all of that.

A fleet has one logger per host, each with its feed and snapshot endpoint;
PostgreSQL is shared, so any one snapshot holds the state of the whole fleet.
``FeedClient`` takes every host's endpoints, tracks each publisher's ``seq``
apart, and orders two changes of one connection by ``order`` (assigned by
PostgreSQL, comparable across hosts), never by the hosts' clocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import zmq

FEED_VERSION = 1
#: Largest feed message or snapshot frame a subscriber reads.
MAX_MESSAGE_BYTES = 1 << 20
#: A logger says it is alive this often; a subscriber that hears nothing for
#: several times this long asks for a snapshot again.
HEARTBEAT_EVERY = 2.0
#: A subscriber takes a snapshot again this often anyway: what no message
#: tells (a row deleted, a new row that nobody runs) is seen within this long.
RESYNC_EVERY = 300.0

STATUS_FIELDS = ("site_id", "site", "connection_id", "status", "is_active", "paused", "message",
                 "last_connected_at", "connection_errors", "retry_attempt", "next_retry_at", "gave_up", "order")
DEVICE_FIELDS = ("site_id", "site", "kind", "id", "name", "is_online", "last_seen_at")
CYCLE_FIELDS = ("instance_id", "running", "started", "stopped", "offline", "duration")
SITE_DATA_FIELDS = ("site_id", "site", "last_data_at")
STATE_TYPES = ("mqtt_status", "device_status", "site_data")


class FeedError(ValueError):
    """A feed message or snapshot reply that is not in this format."""


def status_topic(site_id: int, connection_id: int) -> str:
    return f"mqtt_status.site.{site_id}.conn.{connection_id}"


def device_topic(site_id: int, kind: str, device_id: int) -> str:
    return f"device_status.site.{site_id}.{kind}.{device_id}"


def cycle_topic(instance_id: str) -> str:
    return f"monitor_cycle.{instance_id}"


def iso(value: Any) -> str | None:
    """A time as the feed writes it (ISO-8601), from a datetime or None."""
    return None if value is None else value.isoformat()


def status_body(row: Mapping[str, Any], message: str, **extra: Any) -> dict:
    """An ``mqtt_status`` body (without ``v``, ``publisher``, ``seq``) from a
    ``mqtt_connection`` row of the logger's queries."""
    body = {"type": "mqtt_status", "site_id": row["site_id"], "site": row.get("site"),
            "connection_id": row["id"], "status": row["status"], "is_active": row["is_active"],
            "paused": row.get("paused_since") is not None, "message": message,
            "last_connected_at": iso(row.get("last_connected_at")),
            "connection_errors": row.get("connection_errors"), "order": row.get("status_order")}
    body.update(extra)
    return body


def device_body(kind: str, row: Mapping[str, Any], online: bool) -> dict:
    return {"type": "device_status", "site_id": row["site_id"], "site": row.get("site"), "kind": kind,
            "id": row["id"], "name": row["name"], "is_online": online,
            "last_seen_at": iso(row.get("last_seen_at"))}


def topic_of(body: Mapping[str, Any]) -> str:
    kind = body["type"]
    if kind == "mqtt_status":
        return status_topic(body["site_id"], body["connection_id"])
    if kind == "device_status":
        return device_topic(body["site_id"], body["kind"], body["id"])
    if kind == "monitor_cycle":
        return cycle_topic(body["instance_id"])
    if kind == "site_data":
        return f"site_data.site.{body['site_id']}"
    return kind


def encode(body: Mapping[str, Any]) -> list[bytes]:
    """The two frames of one feed message."""
    return [topic_of(body).encode(), json.dumps({"v": FEED_VERSION, **body}, separators=(",", ":")).encode()]


def decode(frames: list[bytes]) -> dict:
    """The body of one feed message; ``FeedError`` if it is not one."""
    if len(frames) != 2:
        raise FeedError(f"a feed message has 2 frames, not {len(frames)}")
    try:
        body = json.loads(frames[1])
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeedError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != FEED_VERSION or not isinstance(body.get("type"), str):
        raise FeedError("not a feed message of version %d" % FEED_VERSION)
    return body


class Publisher:
    """The logger's side: numbers and sends every message, answers heartbeats' due."""

    def __init__(self, socket: zmq.Socket, incarnation: str):
        self.socket = socket
        self.incarnation = incarnation
        self.seq = 0
        self.sent_at = 0.0

    def publish(self, body: Mapping[str, Any]) -> None:
        self.seq += 1
        self._send({**body, "publisher": self.incarnation, "seq": self.seq})

    def heartbeat(self, force: bool = False) -> None:
        """Say the last seq, if nothing was sent for HEARTBEAT_EVERY (or now, with ``force``)."""
        if force or time.monotonic() - self.sent_at >= HEARTBEAT_EVERY:
            self._send({"type": "heartbeat", "publisher": self.incarnation, "seq": self.seq,
                        "timestamp": iso_now()})

    def _send(self, body: Mapping[str, Any]) -> None:
        self.socket.send_multipart(encode(body))
        self.sent_at = time.monotonic()

    def snapshot_reply(self, connections: Iterable[dict], devices: Iterable[dict]) -> list[bytes]:
        """The frames that answer one snapshot request: a header, then one item per frame."""
        # Each item reads like a feed message, valid at the snapshot's seq.
        items = [json.dumps({"v": FEED_VERSION, **b, "publisher": self.incarnation, "seq": self.seq},
                            separators=(",", ":")).encode()
                 for b in [*connections, *devices]]
        header = {"v": FEED_VERSION, "type": "snapshot", "publisher": self.incarnation, "seq": self.seq,
                  "items": len(items), "timestamp": iso_now()}
        return [json.dumps(header).encode(), *items]


def snapshot_error(reason: str) -> list[bytes]:
    return [json.dumps({"v": FEED_VERSION, "type": "snapshot_error", "reason": reason[:300]}).encode()]


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ------------------------------------------------------------------ the subscriber

@dataclass
class _Source:
    """One publisher (one host's logger): where to ask, how far we are."""

    snapshot_endpoint: str
    publisher: str | None = None
    seq: int = 0  # the last seq applied
    synced: bool = False
    heard_at: float = 0.0
    retry_at: float = 0.0  # when to ask again after a failed snapshot
    error: str = ""
    heard_since_sync: bool = False  # a feed message of it arrived after its snapshot
    synced_at: float = 0.0


@dataclass
class FeedClient:
    """Follow every site's status: the current state first, then each change.

        client = FeedClient(["tcp://127.0.0.1:5556"], ["tcp://127.0.0.1:5557"])
        for body in client.start():            # the current state, one body per item
            show(body)
        while True:
            for body in client.poll(1.0):      # each change after it, in order
                show(body)

    ``connections`` (by connection id) and ``devices`` (by (kind, id)) hold
    the current state. A snapshot replaces it (it holds the whole fleet): what
    it no longer holds (a deleted connection, site or device) comes out of
    ``poll`` once more, with ``"removed": true``. Give it every host's feed and snapshot endpoints to
    follow a fleet. It resynchronises by itself after a gap, a restarted
    logger or a silent one; ``resyncs`` counts how often, ``errors`` says
    which hosts it cannot reach now (it keeps trying).
    """

    feeds: list[str]
    snapshots: list[str]
    timeout: float = 5.0
    context: zmq.Context | None = None
    connections: dict[int, dict] = field(default_factory=dict)
    devices: dict[tuple[str, int], dict] = field(default_factory=dict)
    #: site id -> ``site_data`` body: when the site last sent data
    sites: dict[int, dict] = field(default_factory=dict)
    resyncs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.feeds, str):
            self.feeds = [self.feeds]
        if isinstance(self.snapshots, str):
            self.snapshots = [self.snapshots]
        self._own_context = self.context is None
        self.context = self.context or zmq.Context()
        self._sources = [_Source(endpoint) for endpoint in self.snapshots]
        self._sub: zmq.Socket | None = None
        self._pending: list[dict] = []

    # -- public

    def start(self) -> list[dict]:
        """Subscribe, take a snapshot from every host, return the state as bodies."""
        self._sub = self.context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        for endpoint in self.feeds:
            self._sub.connect(endpoint)
        for source in self._sources:
            self._try_sync(source)
        return list(self._state().values())

    @property
    def live(self) -> bool:
        """Every host's snapshot is in and its feed has been heard since: the
        subscription carries messages (ZeroMQ subscribes asynchronously)."""
        return all(s.synced and s.heard_since_sync for s in self._sources)

    @property
    def errors(self) -> dict[str, str]:
        """Snapshot endpoints that could not be read, with why."""
        return {s.snapshot_endpoint: s.error for s in self._sources if not s.synced}

    def poll(self, timeout: float = 0.0) -> list[dict]:
        """Changes that arrived (waiting up to ``timeout`` s for the first), applied in order."""
        assert self._sub is not None, "call start() first"
        changes: list[dict] = []
        if self._sub.poll(timeout * 1000):
            while True:
                try:
                    frames = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    body = decode(frames)
                except FeedError:
                    continue
                changes += self._take(body)
        now = time.monotonic()
        for source in self._sources:
            if source.synced and (now - source.heard_at > 4 * HEARTBEAT_EVERY
                                  or now - source.synced_at > RESYNC_EVERY):
                changes += self._resync(source)  # silent (gone, restarted, cut off), or time to look again
            elif not source.synced and now >= source.retry_at:
                changes += self._resync(source)
        return changes

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
        if self._own_context:
            self.context.term()

    # -- the Clone pattern

    def _source_of(self, publisher: str) -> _Source | None:
        for source in self._sources:
            if source.publisher == publisher:
                return source
        return None

    def _take(self, body: dict) -> list[dict]:
        publisher = body.get("publisher")
        source = self._source_of(publisher)
        if source is None:
            # A logger we have no snapshot of (it restarted: a new incarnation):
            # ask the hosts, the longest silent first, until one is it.
            changes: list[dict] = []
            for candidate in sorted(self._sources, key=lambda s: (s.synced, s.heard_at)):
                changes += self._resync(candidate)
                if candidate.publisher == publisher:
                    return changes + self._take(body)
            return changes
        source.heard_at = time.monotonic()
        source.heard_since_sync = True
        seq = body.get("seq")
        if not isinstance(seq, int) or seq <= source.seq and body["type"] != "heartbeat":
            return []  # already in the snapshot, or a repeat
        if body["type"] == "heartbeat":
            return self._resync(source) if seq > source.seq else []
        if seq > source.seq + 1:
            return self._resync(source)  # missed some: start again from a snapshot
        source.seq = seq
        return [body] if self._apply(body) else []

    def _apply(self, body: dict) -> bool:
        """Take a change into the state; False if it is older than what we hold."""
        if body["type"] == "mqtt_status":
            held = self.connections.get(body["connection_id"])
            if held is not None and _older(body.get("order"), held.get("order")):
                return False
            self.connections[body["connection_id"]] = body
        elif body["type"] == "device_status":
            self.devices[(body["kind"], body["id"])] = body
        elif body["type"] == "site_data":
            held = self.sites.get(body["site_id"])
            if held is not None and (held.get("last_data_at") or "") > (body.get("last_data_at") or ""):
                return False
            self.sites[body["site_id"]] = body
        return True

    def _resync(self, source: _Source) -> list[dict]:
        self.resyncs += 1
        before = self._state()
        self._try_sync(source)
        after = self._state()
        return ([body for key, body in after.items() if before.get(key) != body]
                + [{**body, "removed": True} for key, body in before.items() if key not in after])

    def _state(self) -> dict[tuple, dict]:
        return {**{("c", k): v for k, v in self.connections.items()},
                **{("d", k): v for k, v in self.devices.items()},
                **{("s", k): v for k, v in self.sites.items()}}

    def _try_sync(self, source: _Source) -> None:
        try:
            self._sync(source)
        except (TimeoutError, FeedError, ValueError, zmq.ZMQError) as exc:
            source.synced, source.error = False, str(exc)
            source.retry_at = time.monotonic() + HEARTBEAT_EVERY

    def _sync(self, source: _Source) -> None:
        """Ask ``source`` for the whole state; apply it."""
        request = self.context.socket(zmq.REQ)
        request.setsockopt(zmq.LINGER, 0)
        request.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        request.connect(source.snapshot_endpoint)
        try:
            request.send(json.dumps({"v": FEED_VERSION, "type": "snapshot_request"}).encode())
            if not request.poll(self.timeout * 1000):
                raise TimeoutError(f"no snapshot from {source.snapshot_endpoint} within {self.timeout:g} s")
            frames = request.recv_multipart()
        finally:
            request.close(linger=0)
        header = json.loads(frames[0])
        if header.get("type") == "snapshot_error":
            raise FeedError(f"{source.snapshot_endpoint}: {header.get('reason')}")
        if header.get("v") != FEED_VERSION or header.get("type") != "snapshot":
            raise FeedError(f"{source.snapshot_endpoint} did not answer with a snapshot")
        source.publisher, source.seq, source.synced, source.error = header["publisher"], header["seq"], True, ""
        source.heard_at, source.heard_since_sync = time.monotonic(), False
        source.synced_at = source.heard_at
        # The snapshot is the whole fleet's state as PostgreSQL holds it, at
        # least as new as anything any feed said before: it replaces ours.
        self.connections, self.devices, self.sites = {}, {}, {}
        for frame in frames[1:]:
            self._apply(json.loads(frame))


def _older(new: Any, held: Any) -> bool:
    """Whether a change whose PostgreSQL-assigned order is ``new`` is older than ``held``."""
    if not isinstance(new, list) or not isinstance(held, list):
        return False
    return new < held
