"""The internal wire of sitelink: the only module that knows msgpack.

Every event travels in an ``Envelope``: protocol version, kind, the sender
(``conn:<id>`` or ``monitor:<instance>``), the sender's incarnation (one per
process start), a per-sender sequence number, the highest sequence number the
sender has seen acknowledged (``floor``), a timestamp and the event body, a
small frozen dataclass per kind. The logger answers with ``Ack`` (which may
list events it refused) or, for a frame it cannot use at all, ``Refusal``.

The logger's socket is a trust boundary: ``decode_events`` checks every
field of every envelope (types, ranges, text sizes, names, timestamps, that a
child speaks only for its own connection) and turns each envelope it cannot
accept into an ``Invalid`` item that still says whose and which it was, so
the logger can record it and acknowledge it instead of retrying it forever.
``decode`` is the strict form: it raises ``ProtocolError`` for anything that
is not a valid message.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

from shared import limits

VERSION = 2
#: The largest frame a sender may send and the logger reads (ZMQ_MAXMSGSIZE:
#: a peer that sends more is disconnected by ZeroMQ itself).
MAX_FRAME_BYTES = 4 * 1024 * 1024
#: Envelopes in one frame.
MAX_BATCH_EVENTS = 10_000
#: The largest message a sender reads from the logger (acks, refusals).
MAX_REPLY_BYTES = 256 * 1024
#: How much of a payload that failed to parse travels to the logger when it
#: does not travel whole (see ``ParseFailure``).
MAX_PAYLOAD_SAMPLE_BYTES = 64 * 1024
#: The largest payload a ``ParseFailure`` carries whole (for the quarantine
#: and replay): a frame's limit less room for every other field of the event
#: at its largest (topic, message, traceback in 4-byte characters: ~600 KB).
MAX_WHOLE_PAYLOAD_BYTES = MAX_FRAME_BYTES - 1024 * 1024
#: Refusals listed in one ack, and the length of each reason.
MAX_REFUSALS_PER_ACK = 100
MAX_REASON_CHARS = 300


class ProtocolError(ValueError):
    """Bytes that are not a valid sitelink message."""


STATUSES = ("disconnected", "connecting", "connected", "error")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ERROR_TYPES = ("VALIDATION_ERROR", "PARSE_ERROR", "DB_ERROR", "UNKNOWN_ERROR")
DEVICE_KINDS = ("gateway", "datalogger", "sensor")


# --- field checks: each returns why a value is refused, or None ---------------

Check = Callable[[Any], "str | None"]


def _checked(check: Check, **kwargs: Any) -> Any:
    return field(metadata={"check": check}, **kwargs)


def _one_of(allowed: tuple[str, ...]) -> Check:
    return lambda v: None if v in allowed else f"{v!r} is not one of {', '.join(allowed)}"


def _int_range(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"{v} is outside {low}..{high}"


def _text(limit: int) -> Check:
    return lambda v: None if len(v) <= limit else f"is {len(v)} characters long, at most {limit} allowed"


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _event_time(v: float) -> str | None:
    return None if limits.plausible_time(v) else f"{v!r} is not a plausible time (2000-01-01 to now + 1 day)"


def _retry_time(v: float) -> str | None:
    return None if limits.plausible_time(v, ahead=limits.MAX_RETRY_AHEAD_SECONDS) \
        else f"{v!r} is not a plausible retry time"


def _bytes_at_most(limit: int) -> Check:
    return lambda v: None if len(v) <= limit else f"is {len(v)} bytes long, at most {limit} allowed"


def _duration(v: float) -> str | None:
    return None if math.isfinite(v) and 0 <= v <= 86400 else f"{v!r} is not a duration in seconds"


def _names_to(value_ok: Callable[[Any], bool], what: str) -> Check:
    """A map of at most 16 short names (a monitor's counts, a cycle's durations) to values ``value_ok`` takes."""
    def check(v: dict) -> str | None:
        if len(v) > 16:
            return "has too many entries"
        if not all(isinstance(key, str) and len(key) <= 32 and value_ok(value) for key, value in v.items()):
            return f"is not a map of names to {what}"
        return None
    return check


_counts = _names_to(lambda n: type(n) is int and 0 <= n <= limits.INT64_MAX, "counts")
_durations = _names_to(lambda s: type(s) in (int, float) and math.isfinite(s) and 0 <= s <= 86400,
                       "durations in seconds")


def _sensors(v: dict) -> str | None:
    """sensor name -> {metric name -> finite number}, within the limits."""
    if len(v) > limits.MAX_SENSORS:
        return f"has {len(v)} sensors, at most {limits.MAX_SENSORS} allowed"
    values = 0
    for sensor, metrics in v.items():
        problem = limits.name_problem(sensor)
        if problem:
            return f"sensor name {problem}"
        if type(metrics) is not dict or not metrics:
            return f"sensor {sensor!r} has no map of metrics"
        if len(metrics) > limits.MAX_METRICS:
            return f"sensor {sensor!r} has {len(metrics)} metrics, at most {limits.MAX_METRICS} allowed"
        values += len(metrics)
        for metric, number in metrics.items():
            problem = limits.name_problem(metric)
            if problem:
                return f"metric name {problem}"
            if type(number) is not float or not math.isfinite(number):
                return f"metric {metric!r} of sensor {sensor!r} is not a finite number"
    if values > limits.MAX_VALUES:
        return f"has {values} values, at most {limits.MAX_VALUES} allowed"
    return None


_ID = _int_range(1, limits.INT64_MAX)
_COUNT = _int_range(0, limits.INT32_MAX)
_MESSAGE = _text(limits.MAX_TEXT_CHARS)
_SHORT = _text(256)
_TRACEBACK = _text(limits.MAX_TRACEBACK_CHARS)
_TOPIC = _text(limits.MAX_MQTT_STRING_BYTES)


def _name(v: str) -> str | None:
    return limits.name_problem(v)


# --- event bodies -----------------------------------------------------------

#: Added to the sequence number of a ``final`` status: it ranks above
#: everything the child of its epoch sent.
FINAL_RANK = 1 << 62


@dataclass(frozen=True)
class StatusChange:
    """A connection entered ``status``; also becomes one connection-log row.

    Statuses of one connection are ordered by (``epoch``, the envelope's
    sequence number): the epoch comes from PostgreSQL with the claim under
    which the child runs, so the order holds across processes and hosts
    whatever their clocks. ``final``: the monitor's word on an epoch whose
    child has exited (a crash, a row it cannot start), ranked after anything
    that child sent.
    """

    KIND: typing.ClassVar[str] = "status"
    connection_id: int = _checked(_ID)
    status: str = _checked(_one_of(STATUSES))  # disconnected | connecting | connected | error
    message: str = _checked(_MESSAGE)
    broker_host: str = _checked(_SHORT, default="")
    exception_type: str = _checked(_SHORT, default="")
    traceback: str = _checked(_TRACEBACK, default="")
    retry_attempt: int | None = _checked(_optional(_COUNT), default=None)
    next_retry_at: float | None = _checked(_optional(_retry_time), default=None)  # epoch seconds
    gave_up: bool = False
    epoch: int = _checked(_int_range(0, limits.INT64_MAX), default=0)
    final: bool = False

    def __post_init__(self) -> None:
        _refuse_bad_fields(self)


@dataclass(frozen=True)
class ConnectionLog:
    """A connection event that is not a status change."""

    KIND: typing.ClassVar[str] = "connlog"
    connection_id: int = _checked(_ID)
    level: str = _checked(_one_of(LEVELS))
    message: str = _checked(_MESSAGE)
    broker_host: str = _checked(_SHORT, default="")
    exception_type: str = _checked(_SHORT, default="")
    traceback: str = _checked(_TRACEBACK, default="")
    retry_attempt: int | None = _checked(_optional(_COUNT), default=None)

    def __post_init__(self) -> None:
        _refuse_bad_fields(self)


@dataclass(frozen=True)
class ParseFailure:
    """A payload the connection's parser rejected (or that could not be parsed at all).

    ``payload`` is the payload itself, once: whole and ``replayable`` when
    parsing it again could give another answer (the logger quarantines it for
    ``admin replay`` and cuts the parsing log's sample from it), otherwise a
    sample of at most ``MAX_PAYLOAD_SAMPLE_BYTES`` (with ``payload_bytes``
    when that is only its beginning).
    """

    KIND: typing.ClassVar[str] = "parsefail"
    connection_id: int = _checked(_ID)
    topic: str = _checked(_TOPIC)
    parser_name: str = _checked(_SHORT)
    error_type: str = _checked(_one_of(ERROR_TYPES))  # VALIDATION_ERROR | PARSE_ERROR | UNKNOWN_ERROR
    error_message: str = _checked(_MESSAGE)
    payload: bytes = _checked(_bytes_at_most(MAX_WHOLE_PAYLOAD_BYTES))
    exception_type: str = _checked(_SHORT, default="")
    traceback: str = _checked(_TRACEBACK, default="")
    #: The payload's size, when ``payload`` holds only its beginning.
    payload_bytes: int | None = _checked(_optional(_COUNT), default=None)
    #: ``payload`` is the whole payload, received on a valid topic.
    replayable: bool = False

    def __post_init__(self) -> None:
        _refuse_bad_fields(self)

    def inconsistency(self) -> str | None:
        """What no real child sends: fields that are each valid but contradict each other."""
        if self.replayable and self.payload_bytes is not None:
            return "a replayable payload is whole: 'payload_bytes' is only for a cut one"
        if not self.replayable and len(self.payload) > MAX_PAYLOAD_SAMPLE_BYTES:
            return (f"a payload that is not replayable is a sample of at most {MAX_PAYLOAD_SAMPLE_BYTES} bytes, "
                    f"not {len(self.payload)}")
        if self.payload_bytes is not None and self.payload_bytes < len(self.payload):
            return f"'payload_bytes' ({self.payload_bytes}) is less than the {len(self.payload)} bytes that came"
        return None


@dataclass(frozen=True)
class Data:
    """One parsed record: what a gateway reported at one instant."""

    KIND: typing.ClassVar[str] = "data"
    connection_id: int = _checked(_ID)
    topic: str = _checked(_TOPIC)
    gateway: str = _checked(_name)
    ts: float = _checked(_event_time)  # epoch seconds
    datalogger: str | None = _checked(_optional(_name), default=None)
    sensors: dict[str, dict[str, float]] = _checked(_sensors, default_factory=dict)


@dataclass(frozen=True)
class Flow:
    """A connected child stopped reading from its broker because the logger is
    behind (``paused``), or started again."""

    KIND: typing.ClassVar[str] = "flow"
    connection_id: int = _checked(_ID)
    paused: bool = False
    unacked: int = _checked(_COUNT, default=0)
    epoch: int = _checked(_int_range(0, limits.INT64_MAX), default=0)  # of the claim the child runs under


@dataclass(frozen=True)
class MonitorCycle:
    """What one monitor cycle did."""

    KIND: typing.ClassVar[str] = "cycle"
    instance_id: str = _checked(_SHORT)
    running: int = _checked(_COUNT)
    started: int = _checked(_COUNT)
    stopped: int = _checked(_COUNT)
    offline: dict[str, int] = _checked(_counts)
    duration: float = _checked(_duration)
    #: Where the cycle's time went (s), by part: see ``services.monitor.Monitor.cycle``.
    parts: dict[str, float] = _checked(_durations, default_factory=dict)

    def parts_text(self) -> str:
        """The parts that took 1 ms or more, in ms, in the order the cycle ran them."""
        return ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in self.parts.items()
                         if seconds >= 0.0005) or "no part took 1 ms"


@dataclass(frozen=True)
class DeviceChange:
    """A gateway, datalogger or sensor the monitor marked offline."""

    KIND: typing.ClassVar[str] = "device"
    device_kind: str = _checked(_one_of(DEVICE_KINDS))
    device_id: int = _checked(_ID)
    site_id: int = _checked(_ID)
    name: str = _checked(_name)
    online: bool = False
    last_seen: float | None = _checked(_optional(_event_time), default=None)  # epoch seconds


Event = Union[StatusChange, ConnectionLog, ParseFailure, Data, Flow, MonitorCycle, DeviceChange]
EVENT_KINDS: dict[str, type] = {cls.KIND: cls for cls in typing.get_args(Event)}
#: What each kind of sender may report: a child only about its own connection.
CHILD_KINDS = frozenset({"status", "connlog", "parsefail", "data", "flow"})
MONITOR_KINDS = frozenset({"status", "connlog", "cycle", "device"})

_SENDER = re.compile(r"conn:([1-9][0-9]{0,18})|monitor:[\x21-\x7e]{1,200}")
_INCARNATION = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True)
class Envelope:
    sender: str
    incarnation: str
    seq: int
    floor: int
    ts: float
    event: Event

    @property
    def stream(self) -> tuple[str, str]:
        """What sequence numbers are counted per: one process of one sender."""
        return (self.sender, self.incarnation)


@dataclass(frozen=True)
class Invalid:
    """An envelope the logger refuses, with as much of whose it was as could be read.

    With ``seq`` set, the sender is known and the refusal can be recorded and
    acknowledged; without, the item is dropped.
    """

    reason: str
    sender: str | None = None
    incarnation: str | None = None
    seq: int | None = None
    kind: str | None = None
    connection_id: int | None = None

    @property
    def stream(self) -> tuple[str, str] | None:
        if self.sender is None or self.incarnation is None:
            return None
        return (self.sender, self.incarnation)


@dataclass(frozen=True)
class Batch:
    """Several envelopes of one sender in one frame (fewer sends under load)."""

    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True)
class Ack:
    """The logger has committed (or recorded as refused) every event of
    ``incarnation`` up to ``upto``. ``refused`` names the events it refused
    and why; ``resend`` asks the sender to send everything unacknowledged
    again now (the logger dropped frames while it could not store them)."""

    incarnation: str
    upto: int
    refused: tuple[tuple[int, str], ...] = ()
    resend: bool = False


@dataclass(frozen=True)
class Refusal:
    """The logger could not use a frame at all (not msgpack, wrong version...)."""

    reason: str


# --- encoding ---------------------------------------------------------------

# A lone surrogate in a str (Python lets one be built from JSON's \ud800) must
# never make a sender fail: it goes out escaped. Names never hold one (the
# parser and decode_events refuse non-printable names).
_PACKER = msgpack.Packer(use_bin_type=True, unicode_errors="backslashreplace")
_BATCH_HEAD = (_PACKER.pack_map_header(3) + _PACKER.pack("v") + _PACKER.pack(VERSION)
               + _PACKER.pack("k") + _PACKER.pack("batch") + _PACKER.pack("e"))


def _doc(kind: str, sender: str, incarnation: str, seq: int, floor: int, ts: float, body: dict) -> dict[str, Any]:
    """An envelope as it goes on the wire (``pack_envelope`` and ``pack_data``)."""
    return {"v": VERSION, "k": kind, "s": sender, "i": incarnation, "n": seq, "f": floor, "t": ts, "b": body}


def _envelope_doc(message: Envelope) -> dict[str, Any]:
    ev = message.event
    return _doc(ev.KIND, message.sender, message.incarnation, message.seq, message.floor, message.ts,
                {name: getattr(ev, name) for name in _field_names(type(ev))})


def pack_envelope(message: Envelope) -> bytes:
    """One envelope, packed: a frame by itself, or an item of ``frame_of``."""
    return _PACKER.pack(_envelope_doc(message))


def pack_data(sender: str, incarnation: str, seq: int, floor: int, ts: float, connection_id: int, topic: str,
              gateway: str, record_ts: float, datalogger: str | None, sensors: dict) -> bytes:
    """``pack_envelope`` of an Envelope holding ``Data(...)``, the same bytes,
    without building either object (a child's hot path: one per reading)."""
    return _PACKER.pack(_doc(Data.KIND, sender, incarnation, seq, floor, ts,
                             {"connection_id": connection_id, "topic": topic, "gateway": gateway, "ts": record_ts,
                              "datalogger": datalogger, "sensors": sensors}))


def frame_of(packed: Sequence[bytes]) -> bytes:
    """One frame holding already packed envelopes (a batch when more than one)."""
    if len(packed) == 1:
        return packed[0]
    return _BATCH_HEAD + _PACKER.pack_array_header(len(packed)) + b"".join(packed)


#: Bytes a batch frame adds around its envelopes, at most.
FRAME_OVERHEAD = len(_BATCH_HEAD) + 5


def encode(message: Envelope | Batch | Ack | Refusal) -> bytes:
    if isinstance(message, Ack):
        doc: dict[str, Any] = {"v": VERSION, "k": "ack", "i": message.incarnation, "u": message.upto}
        if message.refused:
            doc["r"] = [[seq, reason[:MAX_REASON_CHARS]]
                        for seq, reason in message.refused[:MAX_REFUSALS_PER_ACK]]
        if message.resend:
            doc["x"] = True
        return _PACKER.pack(doc)
    if isinstance(message, Refusal):
        return _PACKER.pack({"v": VERSION, "k": "refusal", "x": message.reason[:MAX_REASON_CHARS]})
    if isinstance(message, Batch):
        return frame_of([pack_envelope(e) for e in message.envelopes])
    return pack_envelope(message)


# --- decoding ---------------------------------------------------------------

def _unpack(frame: bytes, limit: int) -> dict:
    if len(frame) > limit:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {limit}")
    try:
        doc = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]) from None
    if not isinstance(doc, dict):
        raise ProtocolError("message is not a map")
    if doc.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {str(doc.get('v'))[:20]!r} (expected {VERSION})")
    return doc


def decode(frame: bytes) -> Envelope | Batch | Ack | Refusal:
    """The message in ``frame``; ``ProtocolError`` if any part of it is invalid."""
    doc = _unpack(frame, MAX_FRAME_BYTES)
    kind = doc.get("k")
    if kind == "ack":
        return _ack(doc)
    if kind == "refusal":
        return Refusal(reason=str(_typed(doc, "x", str))[:MAX_REASON_CHARS])
    if kind == "batch":
        items = []
        for item in _batch_items(doc):
            result = _envelope(item, time.time())
            if isinstance(result, Invalid):
                raise ProtocolError(result.reason)
            items.append(result)
        return Batch(tuple(items))
    result = _envelope(doc, time.time())
    if isinstance(result, Invalid):
        raise ProtocolError(result.reason)
    return result


def decode_reply(frame: bytes) -> Ack | Refusal:
    """What a sender reads from the logger."""
    doc = _unpack(frame, MAX_REPLY_BYTES)
    if doc.get("k") == "ack":
        return _ack(doc)
    if doc.get("k") == "refusal":
        return Refusal(reason=str(_typed(doc, "x", str))[:MAX_REASON_CHARS])
    raise ProtocolError("not a reply of the logger")


def decode_events(frame: bytes, now: float | None = None) -> list[Envelope | Invalid]:
    """The logger's side: every envelope of ``frame``, each valid or ``Invalid``.

    Raises ``ProtocolError`` only when the frame as a whole is unusable (not
    msgpack, wrong version, not an event frame).
    """
    doc = _unpack(frame, MAX_FRAME_BYTES)
    now = time.time() if now is None else now
    kind = doc.get("k")
    if kind in ("ack", "refusal"):
        raise ProtocolError(f"a {kind} is not an event")
    if kind == "batch":
        return [_envelope(item, now) for item in _batch_items(doc)]
    return [_envelope(doc, now)]


def _batch_items(doc: dict) -> list:
    items = doc.get("e")
    if not isinstance(items, list) or not items:
        raise ProtocolError("batch: 'e' is not a non-empty list")
    if len(items) > MAX_BATCH_EVENTS:
        raise ProtocolError(f"batch of {len(items)} events exceeds {MAX_BATCH_EVENTS}")
    return items


def _ack(doc: dict) -> Ack:
    refused: list[tuple[int, str]] = []
    raw = doc.get("r", [])
    if not isinstance(raw, list):
        raise ProtocolError("ack: 'r' is not a list")
    for item in raw[:MAX_REFUSALS_PER_ACK]:
        if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int
                or not isinstance(item[1], str)):
            raise ProtocolError("ack: a refusal is not [seq, reason]")
        refused.append((item[0], item[1][:MAX_REASON_CHARS]))
    return Ack(incarnation=_typed(doc, "i", str), upto=_typed(doc, "u", int), refused=tuple(refused),
               resend=doc.get("x") is True)


def _envelope(doc: object, now: float) -> Envelope | Invalid:
    """One envelope from its map, or ``Invalid`` saying why (and whose) not."""
    if not isinstance(doc, dict):
        return Invalid("an item is not an event envelope")
    if doc.get("v") != VERSION:
        return Invalid(f"an item has protocol version {str(doc.get('v'))[:20]!r}")
    sender, incarnation, seq, floor = doc.get("s"), doc.get("i"), doc.get("n"), doc.get("f")
    own = _sender_connection(sender)
    if own is _NOBODY:
        return Invalid("sender is not conn:<id> or monitor:<name>")
    if not isinstance(incarnation, str) or not _INCARNATION.fullmatch(incarnation):
        return Invalid("incarnation is not 1-64 characters of [A-Za-z0-9._:-]", sender=sender)
    if type(seq) is not int or not 1 <= seq <= limits.INT64_MAX:
        return Invalid("sequence number is not an integer in 1..2^63-1", sender, incarnation)
    kind, body, ts = doc.get("k"), doc.get("b"), doc.get("t")
    cls = EVENT_KINDS.get(kind) if type(kind) is str else None
    problem = None
    if type(floor) is not int or not 0 <= floor < seq:
        problem = f"floor is not an integer in 0..seq-1 (seq {seq})"
    elif type(ts) not in (int, float) or not limits.plausible_time(float(ts), now):
        problem = "timestamp is not a plausible time (2000-01-01 to now + 1 day)"
    elif cls is None:
        problem = f"unknown event kind {str(kind)[:20]!r}"
    elif not isinstance(body, dict):
        problem = f"{kind}: body is not a map"
    elif own is not None:
        if kind not in CHILD_KINDS:
            problem = f"a connection may not send {kind} events"
        elif body.get("connection_id") != own:
            problem = f"{sender} may only report about connection {own}"
    elif kind not in MONITOR_KINDS:
        problem = f"a monitor does not send {kind} events"
    if problem is None and kind == "status" and body.get("final") is True:
        # A final status ranks above every status of its epoch: only a monitor
        # says the last word, and its rank (seq + FINAL_RANK) must fit a bigint.
        if own is not None:
            problem = "only a monitor sends a final status"
        elif seq >= FINAL_RANK:
            problem = f"a final status's sequence number must be below {FINAL_RANK}"
    if problem is None:
        try:
            return Envelope(sender=sender, incarnation=incarnation, seq=seq, floor=floor, ts=float(ts),
                            event=_build_data(body) if cls is Data else _build(cls, body))
        except ProtocolError as exc:
            problem = str(exc)[:MAX_REASON_CHARS]
    # Whose log a refusal goes to: a child's own connection (it is the suspect),
    # else the connection the event names.
    connection_id = own
    if connection_id is None and isinstance(body, dict):
        cid = body.get("connection_id")
        if type(cid) is int and 1 <= cid <= limits.INT64_MAX:
            connection_id = cid
    return Invalid(problem, sender=sender, incarnation=incarnation, seq=seq,
                   kind=kind if isinstance(kind, str) and len(kind) <= 20 else None, connection_id=connection_id)


#: ``_sender_connection``'s answer for a string that names no sender.
_NOBODY = -1
#: Senders seen lately (a sender's name comes with each of its events): the
#: connection each speaks for, None for a monitor. Only valid names are kept,
#: at most SENDERS_KEPT (then forgotten at once).
SENDERS_KEPT = 4096
_senders: dict[str, int | None] = {}


def _sender_connection(sender: object) -> int | None:
    """The connection id a ``conn:<id>`` sender speaks for, None for a
    ``monitor:<name>``, ``_NOBODY`` for anything else."""
    if type(sender) is not str:
        return _NOBODY
    own = _senders.get(sender, _NOBODY)
    if own is not _NOBODY:
        return own
    match = _SENDER.fullmatch(sender)
    if match is None:
        return _NOBODY
    own = None if match.group(1) is None else int(match.group(1))
    if len(_senders) >= SENDERS_KEPT:
        _senders.clear()
    _senders[sender] = own
    return own


def _typed(doc: dict, key: str, types_: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    if not isinstance(value, types_) or isinstance(value, bool) and types_ is int:
        raise ProtocolError(f"field {key!r} missing or of the wrong type")
    return value


#: Hints tested by exact type (msgpack makes no subclasses): a float field takes an int too.
_EXACT = {type(None): (type(None),), float: (float, int), int: (int,), bool: (bool,)}


def _exact_types(hint: Any) -> frozenset | None:
    """The exact types a hint (or a union of such hints) accepts, if it is that simple."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if not all(arg in _EXACT for arg in args):
        return None
    return frozenset(t for arg in args for t in _EXACT[arg])


def _checker(hint: Any) -> Callable[[Any], bool]:
    """A fast test for one field's type, built once per event class."""
    origin = typing.get_origin(hint)
    exact = _exact_types(hint)
    if exact is not None:
        if len(exact) == 1:
            [only] = exact
            return lambda value: type(value) is only
        return lambda value: type(value) in exact
    if origin in (Union, types.UnionType):
        checks = [_checker(arg) for arg in typing.get_args(hint)]
        if len(checks) == 2:
            first, second = checks
            return lambda value: first(value) or second(value)
        return lambda value: any(check(value) for check in checks)
    if hint is type(None):
        return lambda value: value is None
    if hint is float:
        return lambda value: type(value) is float or type(value) is int
    if hint is int:
        return lambda value: type(value) is int
    if hint is bool:
        return lambda value: type(value) is bool
    if origin is dict:
        return lambda value: type(value) is dict
    return lambda value: isinstance(value, hint)


#: (name, type test, value check, required, is_float) per field of an event class.
_Schema = tuple[tuple[str, Callable[[Any], bool], "Check | None", bool, bool], ...]
_SCHEMAS: dict[type, _Schema] = {}


def _schema(cls: type) -> _Schema:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = _SCHEMAS[cls] = tuple(
            (f.name, _checker(hints[f.name]), f.metadata.get("check"),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
             hints[f.name] is float or hints[f.name] == (float | None))
            for f in dataclasses.fields(cls))
    return schema


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(entry[0] for entry in _schema(cls))
    return names


_ABSENT = object()


def _build(cls: type, body: dict) -> Any:
    kwargs = {}
    for name, is_type, check, required, is_float in _SCHEMAS.get(cls) or _schema(cls):
        value = body.get(name, _ABSENT)
        if value is _ABSENT:
            if required:
                raise ProtocolError(f"{cls.KIND}: missing field {name!r}")
            continue
        if not is_type(value):
            raise ProtocolError(f"{cls.KIND}: field {name!r} has the wrong type ({type(value).__name__})")
        if is_float and type(value) is int:
            value = float(value)
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ProtocolError(f"{cls.KIND}: field {name!r} {problem}")
        kwargs[name] = value
    if len(kwargs) != len(body):
        unknown = [str(k)[:40] for k in set(body) - set(kwargs)][:5]
        raise ProtocolError(f"{cls.KIND}: unknown fields {sorted(unknown)}")
    event = cls(**kwargs)
    problem = _inconsistency(event)
    if problem:
        raise ProtocolError(f"{cls.KIND}: {problem}")
    return event


def _build_data(body: dict) -> Data:
    """``_build(Data, body)``, faster for the body every child sends (all six
    fields, each valid): one per reading. It accepts exactly what ``_build``
    accepts and leaves everything else to it, refusals and their reasons
    included: each test below is one of the schema's, and a body that fails
    any of them, or lacks a field, goes the general way."""
    if len(body) == 6:
        cid, topic, gateway = body.get("connection_id"), body.get("topic"), body.get("gateway")
        ts, datalogger, sensors = body.get("ts"), body.get("datalogger", _ABSENT), body.get("sensors")
        if (type(cid) is int and 1 <= cid <= limits.INT64_MAX
                and type(topic) is str and len(topic) <= limits.MAX_MQTT_STRING_BYTES
                and type(gateway) is str and limits.name_problem(gateway) is None
                and (type(ts) is float or type(ts) is int) and limits.plausible_time(float(ts))
                and (datalogger is None or type(datalogger) is str and limits.name_problem(datalogger) is None)
                and type(sensors) is dict and _sensors(sensors) is None):
            return Data(cid, topic, gateway, float(ts), datalogger, sensors)
    return _build(Data, body)


def _inconsistency(event: Any) -> str | None:
    check = getattr(event, "inconsistency", None)
    return check() if check is not None else None


def _refuse_bad_fields(event: Any) -> None:
    """Events a sender builds are held to the rules the logger applies, cheaply:
    the enumerations. (The logger checks everything else, at its socket.)"""
    for name in ("status", "level", "error_type"):
        value = getattr(event, name, None)
        if value is not None:
            check = next(f.metadata["check"] for f in dataclasses.fields(event) if f.name == name)
            problem = check(value)
            if problem:
                raise ValueError(f"{name} {problem}")


def problem(event: Event) -> str | None:
    """Why the logger would refuse ``event``, or None (for senders and tests)."""
    for name, is_type, check, _, _ in _schema(type(event)):
        value = getattr(event, name)
        if not is_type(value):
            return f"field {name!r} has the wrong type ({type(value).__name__})"
        if check is not None and value is not None:
            found = check(value)
            if found:
                return f"field {name!r} {found}"
    return _inconsistency(event)


# --- settings handed from the monitor to a child -----------------------------

def encode_settings(settings: Any) -> bytes:
    """Pack a ``ConnectionSettings`` for a child (never argv or env)."""
    return msgpack.packb({"v": VERSION, "settings": dataclasses.asdict(settings)}, use_bin_type=True)


def decode_settings(frame: bytes, cls: type) -> Any:
    try:
        doc = msgpack.unpackb(frame, raw=False)
    except Exception as exc:
        raise ProtocolError(f"settings are not msgpack: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION or not isinstance(doc.get("settings"), dict):
        raise ProtocolError("settings frame has the wrong version or shape")
    try:
        return cls.from_mapping(doc["settings"])
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"settings frame is invalid: {exc}") from None
