"""Every limit on what enters sitelink, in one place.

Gateways, brokers and local processes are untrusted: whatever they send is
checked against these numbers where it enters (the parser, the child's MQTT
reader, the logger's socket). The README's "Security and limits" section
lists them; ``tests/test_limits.py`` checks that it does.
"""

from __future__ import annotations

import math
import time

#: Gateway, datalogger, sensor and metric names: printable text of at most
#: this many characters (the schema's CHECK on the device tables agrees).
MAX_NAME_CHARS = 128
#: Sensors in one record, metrics of one sensor, and metric values of one
#: record: a message beyond them is a VALIDATION_ERROR, so that no message
#: can make a child or the logger build an arbitrarily large event.
MAX_SENSORS = 1000
MAX_METRICS = 256
MAX_VALUES = 10_000
#: Records one message may produce (a parser returns a list).
MAX_RECORDS = 1000

#: Timestamps (of readings and of events) outside [EARLIEST_TS, now +
#: MAX_FUTURE_SECONDS] are taken for clock faults or forgeries.
EARLIEST_TS = 946684800.0  # 2000-01-01T00:00:00Z
MAX_FUTURE_SECONDS = 24 * 3600
#: A retry time further ahead than this is not a retry time.
MAX_RETRY_AHEAD_SECONDS = 10 * 365 * 24 * 3600

#: MQTT strings (topics, client ids, credentials) are at most 65535 bytes.
MAX_MQTT_STRING_BYTES = 65535
#: Free text in an event (messages, exception types, tracebacks): longer
#: text is cut by the sender and refused by the logger.
MAX_TEXT_CHARS = 16 * 1024
MAX_TRACEBACK_CHARS = 64 * 1024

#: Integers stored in PostgreSQL bigint / integer columns.
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


#: Names found good lately. A device's names come again with each of its
#: readings, and a set lookup costs less than the checks: only names that
#: passed them are kept, and never more than GOOD_NAMES_KEPT (then all are
#: forgotten at once), so what a sender sends cannot grow it.
GOOD_NAMES_KEPT = 4096
_good_names: set[str] = set()


def name_problem(value: object) -> str | None:
    """Why ``value`` cannot be a device or metric name, or None if it can.

    A name is printable text (``str.isprintable``: no control, format or
    separator characters, no lone surrogates, so one name never forges a log
    line nor fails to encode), not blank, at most MAX_NAME_CHARS long.
    """
    if type(value) is str and value in _good_names:  # exactly str: a subclass cannot fake its hash
        return None
    problem = _name_problem(value)
    if problem is None and type(value) is str:
        if len(_good_names) >= GOOD_NAMES_KEPT:
            _good_names.clear()
        _good_names.add(value)
    return problem


def _name_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return "expected a string"
    if not value.strip():
        return "must not be empty"
    if len(value) > MAX_NAME_CHARS:
        return f"is {len(value)} characters long, at most {MAX_NAME_CHARS} allowed"
    if not value.isprintable():
        bad = next(ch for ch in value if not ch.isprintable())
        return f"contains the non-printable character U+{ord(bad):04X}"
    return None


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``,
    ``\\u2028``, a lone surrogate as ``\\ud800``): one line, always encodable."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def plausible_time(value: float, now: float | None = None,
                   ahead: float = MAX_FUTURE_SECONDS) -> bool:
    """True for a finite epoch time between 2000-01-01 and ``ahead`` seconds from now."""
    if not math.isfinite(value):
        return False
    return EARLIEST_TS <= value <= (time.time() if now is None else now) + ahead


def cut(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` shortened to ``limit`` characters, saying so."""
    if len(text) <= limit:
        return text
    tail = f" ... [cut: {len(text)} characters in all]"
    return text[:max(0, limit - len(tail))] + tail
