"""Payload parsers, registered by name.

A parser takes the raw MQTT payload (bytes) and the topic, and returns the
records it found, or raises ``PayloadParseError`` (the bytes are not the
format at all) or ``PayloadValidationError`` (the format, but not the shape we
need, naming the field). Anything else a parser raises is a bug in it and is
recorded as ``UNKNOWN_ERROR`` by ``classify``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shared import limits


class PayloadError(Exception):
    error_type = "UNKNOWN_ERROR"


class PayloadParseError(PayloadError):
    """The payload cannot be decoded at all."""

    error_type = "PARSE_ERROR"


class PayloadValidationError(PayloadError):
    """The payload decodes, but a field is missing or wrong."""

    error_type = "VALIDATION_ERROR"

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


class UnknownParser(LookupError):
    pass


@dataclass(frozen=True)
class Record:
    """What one gateway reported at one instant."""

    gateway: str
    ts: float  # epoch seconds, UTC
    datalogger: str | None = None
    sensors: dict[str, dict[str, float]] = field(default_factory=dict)


Parser = Callable[[bytes, str], list[Record]]
_REGISTRY: dict[str, Parser] = {}


def register(name: str) -> Callable[[Parser], Parser]:
    def add(parser: Parser) -> Parser:
        if name in _REGISTRY and _REGISTRY[name] is not parser:
            raise ValueError(f"parser {name!r} is registered twice")
        _REGISTRY[name] = parser
        return parser
    return add


def get(name: str) -> Parser:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownParser(f"unknown parser {name!r} (known: {', '.join(names())})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def parse_message(parser: Parser, payload: bytes, topic: str) -> list[Record]:
    """``parser``'s records of one message, within the limit of records per message.

    The child and ``admin replay`` both parse through here, so a replayed
    payload is held to the rules a live one is.
    """
    records = parser(payload, topic)
    if len(records) > limits.MAX_RECORDS:
        raise PayloadValidationError(
            "$", f"{len(records)} records in one message, at most {limits.MAX_RECORDS} allowed")
    return records


def classify(exc: BaseException) -> str:
    """The ``mqtt_parsing_log.error_type`` for an exception a parser raised."""
    return exc.error_type if isinstance(exc, PayloadError) else "UNKNOWN_ERROR"


# Built-in parsers register themselves on import.
from shared.parsers import json_format  # noqa: E402,F401
