"""The default ``json`` parser and the registry (pure logic)."""

import json
import time

import pytest

from shared import limits, parsers
from shared.parsers import PayloadParseError, PayloadValidationError

parse = parsers.get("json")
GOOD = {"gateway": "GW-01", "datalogger": "DL-07", "ts": "2026-11-28T10:00:00Z",
        "sensors": {"S-1": {"temperature": 21.4, "humidity": 40.2}}}


def payload(**changes) -> bytes:
    doc = {**GOOD, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_documented_example_parses():
    [record] = parse(payload(), "sites/a/GW-01/DL-07")
    assert record.gateway == "GW-01"
    assert record.datalogger == "DL-07"
    assert record.ts == 1795860000.0
    assert record.sensors == {"S-1": {"temperature": 21.4, "humidity": 40.2}}


def test_heartbeat_without_datalogger_and_sensors():
    [record] = parse(payload(datalogger=..., sensors=...), "t")
    assert record.datalogger is None and record.sensors == {}


@pytest.mark.parametrize("ts, expected", [
    ("2026-11-28T11:00:00+01:00", 1795860000.0),
    (1795860000, 1795860000.0),
    (1795860000.5, 1795860000.5),
])
def test_timestamps_with_zone_or_epoch(ts, expected):
    assert parse(payload(ts=ts), "t")[0].ts == expected


@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8", b"{not json", b"", b'{"gateway": NaN}'])
def test_undecodable_is_parse_error(raw):
    with pytest.raises(PayloadParseError) as err:
        parse(raw, "t")
    assert parsers.classify(err.value) == "PARSE_ERROR"


@pytest.mark.parametrize("changes, field", [
    ({"gateway": ...}, "gateway"),
    ({"gateway": 7}, "gateway"),
    ({"gateway": "G" * 129}, "gateway"),
    ({"datalogger": "D" * 129}, "datalogger"),
    ({"ts": ...}, "ts"),
    ({"ts": "2026-11-28T10:00:00"}, "ts"),
    ({"ts": "yesterday"}, "ts"),
    ({"ts": 12}, "ts"),
    ({"ts": time.time() + 7 * 86400}, "ts"),
    ({"ts": True}, "ts"),
    ({"sensors": [1, 2]}, "sensors"),
    ({"sensors": {"S-1": 3}}, "sensors.S-1"),
    ({"sensors": {"S-1": {"t": "hot"}}}, "sensors.S-1.t"),
    ({"sensors": {"S-1": {"t": True}}}, "sensors.S-1.t"),
    ({"sensors": {"S-1": {"t": 10 ** 400}}}, "sensors.S-1.t"),
    ({"sensors": {"S" * 129: {"t": 1}}}, "sensors"),
])
def test_wrong_shape_is_validation_error_naming_the_field(changes, field):
    with pytest.raises(PayloadValidationError) as err:
        parse(payload(**changes), "t")
    assert err.value.field.startswith(field)
    assert parsers.classify(err.value) == "VALIDATION_ERROR"


def test_not_an_object_is_validation_error():
    with pytest.raises(PayloadValidationError):
        parse(b"[1, 2, 3]", "t")


def test_any_other_exception_is_unknown_error():
    assert parsers.classify(ZeroDivisionError()) == "UNKNOWN_ERROR"


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(parsers.UnknownParser, match="json"):
        parsers.get("csv-v9")


def test_number_too_large_for_a_float_is_validation_error():
    raw = b'{"gateway": "G", "ts": 1795860000, "sensors": {"S-1": {"t": 1e400}}}'
    with pytest.raises(PayloadValidationError, match="finite"):
        parse(raw, "t")


# --- hostile names and sizes: each a VALIDATION_ERROR naming the field --------

@pytest.mark.parametrize("raw, field", [
    (b'{"gateway": "GW\\ud800", "ts": 1795860000}', "gateway"),          # escaped lone surrogate
    (b'{"gateway": "GW\\udc00x", "ts": 1795860000}', "gateway"),
    (b'{"gateway": "GW\\n2026-11-28 | ERROR | forged", "ts": 1795860000}', "gateway"),
    (b'{"gateway": "GW\\u001b[31m", "ts": 1795860000}', "gateway"),
    (b'{"gateway": "GW\\u2028", "ts": 1795860000}', "gateway"),
    (b'{"gateway": "GW\\u202e", "ts": 1795860000}', "gateway"),           # right-to-left override
    (b'{"gateway": "G", "datalogger": "D\\u0000", "ts": 1795860000}', "datalogger"),
    (b'{"gateway": "G", "ts": 1795860000, "sensors": {"S\\r": {"t": 1}}}', "sensors"),
    (b'{"gateway": "G", "ts": 1795860000, "sensors": {"S": {"t\\ud83d": 1}}}', "sensors.S"),
])
def test_names_that_are_not_printable_text_are_validation_errors(raw, field):
    with pytest.raises(PayloadValidationError) as err:
        parse(raw, "t")
    assert err.value.field.startswith(field)
    message = str(err.value)
    assert message.isprintable()
    message.encode("utf-8")  # never a lone surrogate in what travels on


def test_a_real_emoji_pair_and_accents_are_fine():
    [record] = parse('{"gateway": "Gw-\u00e9\u00e8", "ts": 1795860000, "sensors": {"\U0001F321": {"t": 1}}}'
                     .encode(), "t")
    assert record.gateway == "Gw-\u00e9\u00e8" and list(record.sensors) == ["\U0001F321"]


@pytest.mark.parametrize("sensors, field", [
    ({f"S{i}": {"t": 1} for i in range(limits.MAX_SENSORS + 1)}, "sensors"),
    ({"S": {f"m{i}": 1 for i in range(limits.MAX_METRICS + 1)}}, "sensors.S"),
    ({f"S{i}": {f"m{j}": 1 for j in range(200)} for i in range(limits.MAX_VALUES // 200 + 1)}, "sensors"),
])
def test_sensors_and_metrics_per_message_are_bounded(sensors, field):
    with pytest.raises(PayloadValidationError) as err:
        parse(payload(sensors=sensors), "t")
    assert err.value.field.startswith(field)


# --- json-batch: the documented object, or an array of them ---------------------------

batch = parsers.get("json-batch")


def test_json_batch_takes_one_object_or_an_array_of_them():
    assert batch(payload(), "t") == parse(payload(), "t")
    second = {**GOOD, "ts": "2026-11-28T10:01:00Z", "sensors": {"S-1": {"temperature": 21.5}}}
    records = batch(json.dumps([GOOD, second]).encode(), "t")
    assert [r.ts for r in records] == [1795860000.0, 1795860060.0]
    assert records[1].sensors == {"S-1": {"temperature": 21.5}}


@pytest.mark.parametrize("doc, error, where", [
    ([], PayloadValidationError, "$"),
    ([GOOD, {**GOOD, "ts": "yesterday"}], PayloadValidationError, "[1].ts"),
    ([GOOD, 5], PayloadValidationError, "[1]"),
    ([GOOD] * (limits.MAX_RECORDS + 1), PayloadValidationError, "$"),
    ("text", PayloadValidationError, "$"),
])
def test_json_batch_holds_each_record_to_the_json_rules(doc, error, where):
    with pytest.raises(error) as err:
        batch(json.dumps(doc).encode(), "t")
    assert err.value.field == where


def test_json_batch_is_no_json_at_all_a_parse_error():
    with pytest.raises(PayloadParseError):
        batch(b"[{", "t")
