"""The default parser, ``json``, and ``json-batch``.

    {"gateway": "GW-01", "datalogger": "DL-07", "ts": "2026-11-28T10:00:00Z",
     "sensors": {"S-1": {"temperature": 21.4, "humidity": 40.2}}}

``json-batch`` takes that object too, or an array of them (a gateway that
sends what it buffered in one message), each held to the same rules.

``datalogger`` and ``sensors`` may be absent (a gateway heartbeat). ``ts`` is
ISO-8601 with a zone, or epoch seconds. Values are finite numbers. Names are
printable text (no control characters, no lone surrogates, even escaped as
``\\ud800``), within the limits of ``shared/limits.py``, as are the counts of
sensors and metrics.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime

from shared import limits
from shared.limits import EARLIEST_TS, MAX_FUTURE_SECONDS, MAX_NAME_CHARS, printable
from shared.parsers import PayloadParseError, PayloadValidationError, Record, register


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity by default; they are not JSON.
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # built once, not per message


@register("json")
def parse(payload: bytes, topic: str) -> list[Record]:
    return [_record(_decode(payload))]


@register("json-batch")
def parse_batch(payload: bytes, topic: str) -> list[Record]:
    doc = _decode(payload)
    if not isinstance(doc, list):
        return [_record(doc)]
    if not doc:
        raise PayloadValidationError("$", "expected at least one record, got an empty array")
    if len(doc) > limits.MAX_RECORDS:
        raise PayloadValidationError("$", f"{len(doc)} records in one message, at most {limits.MAX_RECORDS} allowed")
    records = []
    for n, item in enumerate(doc):
        try:
            records.append(_record(item))
        except PayloadValidationError as exc:
            where = f"[{n}]" if exc.field == "$" else f"[{n}].{exc.field}"
            raise PayloadValidationError(where, exc.problem) from None
    return records


def _decode(payload: bytes) -> object:
    try:
        return _DECODER.decode(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PayloadParseError(f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except (ValueError, RecursionError) as exc:
        raise PayloadParseError(f"payload is not JSON: {exc}") from None


def _record(doc: object) -> Record:
    if not isinstance(doc, dict):
        raise PayloadValidationError("$", f"expected a JSON object, got {_json_type(doc)}")
    gateway = _identifier(doc, "gateway", required=True)
    datalogger = _identifier(doc, "datalogger", required=False)
    ts = _timestamp(doc.get("ts"))
    sensors = _sensors(doc.get("sensors"))
    return Record(gateway=gateway, datalogger=datalogger, ts=ts, sensors=sensors)


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), "a value")


def _identifier(doc: dict, name: str, *, required: bool) -> str | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise PayloadValidationError(name, "is required")
        return None
    return _check_identifier(name, value)


def _check_identifier(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise PayloadValidationError(name, f"expected a string, got {_json_type(value)}")
    problem = limits.name_problem(value)
    if problem:
        raise PayloadValidationError(name, problem)
    return value


def _timestamp(value: object) -> float:
    if value is None:
        raise PayloadValidationError("ts", "is required")
    if isinstance(value, bool):
        raise PayloadValidationError("ts", "expected ISO-8601 text or epoch seconds, got a boolean")
    if isinstance(value, (int, float)):
        ts = _finite(value)
        if ts is None:
            raise PayloadValidationError("ts", "must be a finite number")
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise PayloadValidationError("ts", f"{printable(value[:64])!r} is not an ISO-8601 timestamp") from None
        if parsed.tzinfo is None:
            raise PayloadValidationError("ts", f"{printable(value[:64])!r} has no time zone (add Z or +hh:mm)")
        ts = parsed.timestamp()
    else:
        raise PayloadValidationError("ts", f"expected ISO-8601 text or epoch seconds, got {_json_type(value)}")
    latest = time.time() + MAX_FUTURE_SECONDS
    if not EARLIEST_TS <= ts <= latest:
        raise PayloadValidationError(
            "ts", f"{printable(str(value)[:64])!r} is outside the plausible range (2000-01-01 to now + 1 day)")
    return ts


def _finite(number: int | float) -> float | None:
    try:
        value = float(number)
    except OverflowError:  # an integer literal too large for a float
        return None
    return value if math.isfinite(value) else None


def _sensors(value: object) -> dict[str, dict[str, float]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadValidationError("sensors", f"expected an object, got {_json_type(value)}")
    if len(value) > limits.MAX_SENSORS:
        raise PayloadValidationError("sensors", f"has {len(value)} sensors, at most {limits.MAX_SENSORS} allowed")
    sensors: dict[str, dict[str, float]] = {}
    values = 0
    for sensor, metrics in value.items():
        # Error paths name the field; they are built only when one is needed (not per value).
        _check_identifier("sensors (sensor name)", sensor)
        if not isinstance(metrics, dict):
            raise PayloadValidationError(_where(sensor), f"expected an object of metrics, got {_json_type(metrics)}")
        if not metrics:
            raise PayloadValidationError(_where(sensor), "has no metrics")
        if len(metrics) > limits.MAX_METRICS:
            raise PayloadValidationError(_where(sensor),
                                         f"has {len(metrics)} metrics, at most {limits.MAX_METRICS} allowed")
        values += len(metrics)
        if values > limits.MAX_VALUES:
            raise PayloadValidationError("sensors", f"more than {limits.MAX_VALUES} values in one message")
        clean: dict[str, float] = {}
        for metric, number in metrics.items():
            if type(metric) is not str or limits.name_problem(metric) is not None:
                _check_identifier(f"{_where(sensor)} (metric name)", metric)
            kind = type(number)
            if kind is float and math.isfinite(number):
                clean[metric] = number
                continue
            if kind is bool or not isinstance(number, (int, float)):
                raise PayloadValidationError(_field(sensor, metric), f"expected a number, got {_json_type(number)}")
            finite = _finite(number)
            if finite is None:
                raise PayloadValidationError(_field(sensor, metric), "must be a finite number")
            clean[metric] = finite
        sensors[sensor] = clean
    return sensors


def _where(sensor: str) -> str:
    return f"sensors.{printable(sensor[:MAX_NAME_CHARS])}"


def _field(sensor: str, metric: str) -> str:
    return f"{_where(sensor)}.{printable(metric[:MAX_NAME_CHARS])}"
