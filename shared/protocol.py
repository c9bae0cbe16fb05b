"""The internal wire of sitelink: the only module that knows msgpack.

Every event travels in an ``Envelope``: protocol version, kind, the sender
(``conn:<id>`` or ``monitor:<instance>``), the sender's incarnation (one per
process start), a per-sender sequence number, the highest sequence number the
sender has seen acknowledged (``floor``), a timestamp and the event body, a
small frozen dataclass per kind. The logger answers with ``Ack``.

``decode`` raises ``ProtocolError`` for anything that is not a valid message:
wrong version, unknown kind, missing or mistyped fields, oversized frames.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

VERSION = 1
MAX_FRAME_BYTES = 4 * 1024 * 1024
#: How much of a payload that failed to parse travels to the logger.
MAX_PAYLOAD_SAMPLE_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """Bytes that are not a valid sitelink message."""


STATUSES = ("disconnected", "connecting", "connected", "error")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ERROR_TYPES = ("VALIDATION_ERROR", "PARSE_ERROR", "DB_ERROR", "UNKNOWN_ERROR")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")


# --- event bodies -----------------------------------------------------------

@dataclass(frozen=True)
class StatusChange:
    """A connection entered ``status``; also becomes one connection-log row."""

    KIND: typing.ClassVar[str] = "status"
    connection_id: int
    status: str  # disconnected | connecting | connected | error
    message: str
    broker_host: str = ""
    exception_type: str = ""
    traceback: str = ""
    retry_attempt: int | None = None
    next_retry_at: float | None = None  # epoch seconds
    gave_up: bool = False

    def __post_init__(self) -> None:
        _one_of("status", self.status, STATUSES)


@dataclass(frozen=True)
class ConnectionLog:
    """A connection event that is not a status change."""

    KIND: typing.ClassVar[str] = "connlog"
    connection_id: int
    level: str
    message: str
    broker_host: str = ""
    exception_type: str = ""
    traceback: str = ""
    retry_attempt: int | None = None

    def __post_init__(self) -> None:
        _one_of("level", self.level, LEVELS)


@dataclass(frozen=True)
class ParseFailure:
    """A payload the connection's parser rejected."""

    KIND: typing.ClassVar[str] = "parsefail"
    connection_id: int
    topic: str
    parser_name: str
    error_type: str  # VALIDATION_ERROR | PARSE_ERROR | UNKNOWN_ERROR
    error_message: str
    payload: bytes
    exception_type: str = ""
    traceback: str = ""

    def __post_init__(self) -> None:
        _one_of("error_type", self.error_type, ERROR_TYPES)


@dataclass(frozen=True)
class Data:
    """One parsed record: what a gateway reported at one instant."""

    KIND: typing.ClassVar[str] = "data"
    connection_id: int
    topic: str
    gateway: str
    ts: float  # epoch seconds
    datalogger: str | None = None
    sensors: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorCycle:
    """What one monitor cycle did."""

    KIND: typing.ClassVar[str] = "cycle"
    instance_id: str
    running: int
    started: int
    stopped: int
    offline: dict[str, int]
    duration: float


@dataclass(frozen=True)
class DeviceChange:
    """A gateway, datalogger or sensor the monitor marked offline."""

    KIND: typing.ClassVar[str] = "device"
    device_kind: str  # gateway | datalogger | sensor
    device_id: int
    site_id: int
    name: str
    online: bool


Event = Union[StatusChange, ConnectionLog, ParseFailure, Data, MonitorCycle, DeviceChange]
EVENT_KINDS: dict[str, type] = {cls.KIND: cls for cls in typing.get_args(Event)}


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
class Ack:
    """The logger has committed every event of ``incarnation`` up to ``upto``."""

    incarnation: str
    upto: int


# --- encoding ---------------------------------------------------------------

def encode(message: Envelope | Ack) -> bytes:
    if isinstance(message, Ack):
        doc: dict[str, Any] = {"v": VERSION, "k": "ack", "i": message.incarnation, "u": message.upto}
    else:
        ev = message.event
        doc = {"v": VERSION, "k": ev.KIND, "s": message.sender, "i": message.incarnation,
               "n": message.seq, "f": message.floor, "t": message.ts,
               "b": {f.name: getattr(ev, f.name) for f in dataclasses.fields(ev)}}
    return msgpack.packb(doc, use_bin_type=True)


def decode(frame: bytes) -> Envelope | Ack:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        doc = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("message is not a map")
    if doc.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {doc.get('v')!r} (expected {VERSION})")
    kind = doc.get("k")
    if kind == "ack":
        return Ack(incarnation=_typed(doc, "i", str), upto=_typed(doc, "u", int))
    cls = EVENT_KINDS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    body = doc.get("b")
    if not isinstance(body, dict):
        raise ProtocolError(f"{kind}: body is not a map")
    return Envelope(
        sender=_typed(doc, "s", str), incarnation=_typed(doc, "i", str),
        seq=_typed(doc, "n", int), floor=_typed(doc, "f", int),
        ts=float(_typed(doc, "t", (int, float))), event=_build(cls, body))


def _typed(doc: dict, key: str, types_: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    if not isinstance(value, types_) or isinstance(value, bool) and types_ is int:
        raise ProtocolError(f"field {key!r} missing or of the wrong type")
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _accepts(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _build(cls: type, body: dict) -> Any:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.KIND}: missing field {f.name!r}")
            continue
        value = body[f.name]
        if not _accepts(hints[f.name], value):
            raise ProtocolError(f"{cls.KIND}: field {f.name!r} has the wrong type "
                                f"({type(value).__name__})")
        if hints[f.name] is float:
            value = float(value)
        kwargs[f.name] = value
    unknown = set(body) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ProtocolError(f"{cls.KIND}: unknown fields {sorted(unknown)}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ProtocolError(f"{cls.KIND}: {exc}") from None


# --- settings handed from the monitor to a child -----------------------------

def encode_settings(settings: Any) -> bytes:
    """Pack a ``ConnectionSettings`` for a child's stdin (never argv or env)."""
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
