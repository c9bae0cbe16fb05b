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
class Batch:
    """Several envelopes of one sender in one frame (fewer sends under load)."""

    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True)
class Ack:
    """The logger has committed every event of ``incarnation`` up to ``upto``."""

    incarnation: str
    upto: int


# --- encoding ---------------------------------------------------------------

def _envelope_doc(message: Envelope) -> dict[str, Any]:
    ev = message.event
    return {"v": VERSION, "k": ev.KIND, "s": message.sender, "i": message.incarnation,
            "n": message.seq, "f": message.floor, "t": message.ts,
            "b": {name: getattr(ev, name) for name in _field_names(type(ev))}}


def encode(message: Envelope | Batch | Ack) -> bytes:
    if isinstance(message, Ack):
        doc: dict[str, Any] = {"v": VERSION, "k": "ack", "i": message.incarnation, "u": message.upto}
    elif isinstance(message, Batch):
        doc = {"v": VERSION, "k": "batch", "e": [_envelope_doc(e) for e in message.envelopes]}
    else:
        doc = _envelope_doc(message)
    return msgpack.packb(doc, use_bin_type=True)


def decode(frame: bytes) -> Envelope | Batch | Ack:
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
    if kind == "batch":
        items = doc.get("e")
        if not isinstance(items, list) or not items:
            raise ProtocolError("batch: 'e' is not a non-empty list")
        envelopes = []
        for item in items:
            if not isinstance(item, dict) or item.get("v") != VERSION or item.get("k") in ("ack", "batch"):
                raise ProtocolError("batch: an item is not an event envelope")
            envelopes.append(_envelope(item))
        return Batch(tuple(envelopes))
    return _envelope(doc)


def _envelope(doc: dict) -> Envelope:
    kind = doc.get("k")
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


def _checker(hint: Any):
    """A fast test for one field's type, built once per event class."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        checks = [_checker(arg) for arg in typing.get_args(hint)]
        return lambda value: any(check(value) for check in checks)
    if hint is type(None):
        return lambda value: value is None
    if hint is float:
        return lambda value: type(value) is float or type(value) is int
    if hint is int:
        return lambda value: type(value) is int
    if origin is dict:
        return lambda value: type(value) is dict
    return lambda value: isinstance(value, hint)


_SCHEMAS: dict[type, tuple[tuple[str, Any, bool, bool], ...]] = {}


def _schema(cls: type) -> tuple[tuple[str, Any, bool, bool], ...]:
    """(name, checker, required, is_float) per field of an event class."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = _SCHEMAS[cls] = tuple(
            (f.name, _checker(hints[f.name]),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
             hints[f.name] is float)
            for f in dataclasses.fields(cls))
    return schema


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(name for name, _, _, _ in _schema(cls))


def _build(cls: type, body: dict) -> Any:
    kwargs = {}
    for name, check, required, is_float in _schema(cls):
        if name not in body:
            if required:
                raise ProtocolError(f"{cls.KIND}: missing field {name!r}")
            continue
        value = body[name]
        if not check(value):
            raise ProtocolError(f"{cls.KIND}: field {name!r} has the wrong type ({type(value).__name__})")
        kwargs[name] = float(value) if is_float else value
    if len(kwargs) != len(body):
        unknown = set(body) - set(kwargs)
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
