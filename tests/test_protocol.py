"""The internal wire: round trips, and what the logger's socket does with
anything else (pure logic; the real socket is in tests/test_hostile.py)."""

import math
import random
import time

import msgpack
import pytest

from shared import limits, protocol
from shared.connections import ConnectionSettings
from shared.protocol import (Ack, Batch, ConnectionLog, Data, DeviceChange, Envelope, Flow, Invalid,
                             MonitorCycle, ParseFailure, ProtocolError, Refusal, StatusChange)
from tests import hostile
from tests.hostile import doc, pack

NOW = time.time()
CHILD_EVENTS = [
    StatusChange(connection_id=1, status="error", message="refused", retry_attempt=2,
                 next_retry_at=NOW + 30.5, gave_up=False, exception_type="ConnectionRefusedError"),
    ConnectionLog(connection_id=1, level="WARNING", message="hello"),
    ParseFailure(connection_id=1, topic="t", parser_name="json", error_type="PARSE_ERROR",
                 error_message="bad", payload=b"\x00\xff", payload_bytes=10),
    ParseFailure(connection_id=1, topic="t", parser_name="json", error_type="VALIDATION_ERROR",
                 error_message="bad", payload=b"[1]" * 100_000, replayable=True),
    Data(connection_id=1, topic="t", gateway="GW", ts=NOW - 60, datalogger=None, sensors={"S": {"t": 1.0}}),
    Flow(connection_id=1, paused=True, unacked=1000),
]
MONITOR_EVENTS = [
    MonitorCycle(instance_id="m", running=3, started=1, stopped=0, offline={"sensor": 2}, duration=0.01,
                 parts={"read": 0.004, "claim": 0.002, "start": 0}),
    DeviceChange(device_kind="sensor", device_id=3, site_id=1, name="S", online=False),
]


def envelope(event, sender="conn:1", seq=7, floor=5, ts=None):
    return Envelope(sender=sender, incarnation="12.ab", seq=seq, floor=floor, ts=NOW if ts is None else ts,
                    event=event)


@pytest.mark.parametrize("event", CHILD_EVENTS + MONITOR_EVENTS, ids=lambda e: e.KIND)
def test_every_kind_round_trips_with_its_header(event):
    env = envelope(event, sender="conn:1" if event in CHILD_EVENTS else "monitor:m1")
    assert protocol.decode(protocol.encode(env)) == env
    assert protocol.decode_events(protocol.encode(env)) == [env]


def test_batch_round_trips_and_is_the_frame_of_its_packed_envelopes():
    envs = tuple(envelope(e, seq=n, floor=0) for n, e in enumerate(CHILD_EVENTS, 1))
    frame = protocol.encode(Batch(envs))
    assert frame == protocol.frame_of([protocol.pack_envelope(e) for e in envs])
    assert protocol.decode(frame) == Batch(envs)
    with pytest.raises(ProtocolError, match="batch"):
        protocol.decode(msgpack.packb({"v": protocol.VERSION, "k": "batch", "e": []}))


def test_a_whole_payload_fits_one_frame_beside_every_other_field_at_its_largest():
    wide = "\U0001f600"  # four bytes in UTF-8
    event = ParseFailure(connection_id=limits.INT64_MAX, topic=wide * limits.MAX_MQTT_STRING_BYTES,
                         parser_name=wide * 256, error_type="UNKNOWN_ERROR", error_message=wide * limits.MAX_TEXT_CHARS,
                         payload=b"\xff" * protocol.MAX_WHOLE_PAYLOAD_BYTES, exception_type=wide * 256,
                         traceback=wide * limits.MAX_TRACEBACK_CHARS, replayable=True)
    assert protocol.problem(event) is None
    env = Envelope(sender=f"conn:{limits.INT64_MAX}", incarnation="x" * 64, seq=limits.INT64_MAX,
                   floor=limits.INT64_MAX - 1, ts=NOW, event=event)
    frame = protocol.pack_envelope(env)
    assert len(frame) + protocol.FRAME_OVERHEAD <= protocol.MAX_FRAME_BYTES
    assert protocol.decode_events(frame) == [env]


def test_ack_and_refusal_round_trip():
    ack = Ack("12.ab", 9, refused=((4, "bad ts"),), resend=True)
    assert protocol.decode_reply(protocol.encode(ack)) == ack
    assert protocol.decode_reply(protocol.encode(Refusal("not msgpack"))) == Refusal("not msgpack")
    with pytest.raises(ProtocolError):
        protocol.decode_reply(protocol.encode(envelope(CHILD_EVENTS[1])))


@pytest.mark.parametrize("raw, match", [
    (b"\xc1", "not msgpack"),
    (b"", "not msgpack"),
    (msgpack.packb([1, 2]), "not a map"),
    (pack(doc(v=99)), "version"),
    (pack({"v": protocol.VERSION, "k": "ack", "i": "x", "u": 1}), "not an event"),
    (pack({"v": protocol.VERSION, "k": "batch", "e": "x"}), "batch"),
    (pack({"v": protocol.VERSION, "k": "batch", "e": [1] * (protocol.MAX_BATCH_EVENTS + 1)}), "exceeds"),
    (b"\x00" * (protocol.MAX_FRAME_BYTES + 1), "exceeds"),
])
def test_a_frame_that_is_no_event_frame_raises_one_error(raw, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_events(raw)


@pytest.mark.parametrize("case", hostile.envelopes(1, 2), ids=lambda c: c[0])
def test_an_envelope_no_real_sender_makes_is_invalid_and_says_whose(case):
    name, raw, seq_known = case
    [item] = protocol.decode_events(pack(raw))
    assert isinstance(item, Invalid), name
    assert item.reason
    assert item.sender == raw["s"]
    assert (item.seq is not None) == seq_known
    with pytest.raises(ProtocolError):
        protocol.decode(pack(raw))


@pytest.mark.parametrize("case", hostile.unattributable(), ids=lambda c: c[0])
def test_an_envelope_without_a_sender_cannot_be_acknowledged(case):
    [item] = protocol.decode_events(pack(case[1]))
    assert isinstance(item, Invalid) and item.stream is None


@pytest.mark.parametrize("case", [c for c in hostile.frames() if len(c[1]) == 1], ids=lambda c: c[0])
def test_a_message_that_is_no_event_frame_raises_one_error(case):
    with pytest.raises(ProtocolError):
        protocol.decode_events(case[1][0])


def test_one_bad_envelope_does_not_spoil_its_batch():
    good = protocol.pack_envelope(envelope(CHILD_EVENTS[1], seq=1, floor=0))
    bad = pack(doc(n=2, t=math.nan))
    items = protocol.decode_events(protocol.frame_of([good, bad]))
    assert isinstance(items[0], Envelope) and isinstance(items[1], Invalid) and items[1].seq == 2


def test_garbage_and_mutated_frames_raise_nothing_but_protocol_error():
    rng = random.Random(8)
    seeds = [protocol.encode(Batch(tuple(envelope(e, seq=n, floor=0) for n, e in enumerate(CHILD_EVENTS, 1))))]
    for _ in range(3000):
        frame = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        if rng.random() < 0.2:
            frame = bytearray(rng.randbytes(rng.randint(0, 200)))
        try:
            items = protocol.decode_events(bytes(frame))
        except ProtocolError:
            continue
        for item in items:
            assert isinstance(item, (Envelope, Invalid))
            if isinstance(item, Envelope):  # what passes is what the logger can store
                assert protocol.problem(item.event) is None


def _good_twin(raw: dict) -> dict:
    """An envelope the logger takes, from ``raw``'s sender, with the names a
    hostile case spoils in their good form (the caches of good names and
    senders warm for exactly what the case varies)."""
    if not raw["s"].startswith("conn:"):  # a monitor: it sends no data
        return doc("connlog", None, s=raw["s"], i="12.ab", n=3, f=0, t=NOW)
    cid = int(raw["s"].split(":")[1])
    good = {"connection_id": cid, "topic": "t", "gateway": "GW", "ts": NOW, "datalogger": "DL",
            "sensors": {"S": {"t": 1.0}}}
    return doc("data", good, cid=cid, s=raw["s"], i="12.ab", n=3, f=0, t=NOW)


@pytest.mark.parametrize("case", hostile.envelopes(1, 2), ids=lambda c: c[0])
def test_what_was_seen_good_lately_never_lets_a_bad_envelope_through(case):
    """The decoder remembers good names and senders (they repeat with every
    reading); a bad envelope is refused alike however warm that memory is."""
    name, raw, _ = case
    limits._good_names.clear()
    protocol._senders.clear()
    [cold] = protocol.decode_events(pack(raw))
    [twin] = protocol.decode_events(pack(_good_twin(raw)))
    assert isinstance(twin, Envelope), twin
    [warm] = protocol.decode_events(pack(raw))
    assert isinstance(cold, Invalid) and warm == cold, name


def _data_bodies() -> list[tuple[str, dict]]:
    """Data bodies with all six fields (the decoder's fast path for readings
    takes only those), each field spoilt in turn, beside good ones."""
    good = {"connection_id": 1, "topic": "t", "gateway": "GW", "ts": NOW, "datalogger": "DL",
            "sensors": {"S": {"t": 1.0}}}
    spoilt = {name: {**raw["b"], "datalogger": raw["b"].get("datalogger", "DL")}
              for name, raw, _ in hostile.envelopes(1, 2) if raw["k"] == "data"}
    cases = [("good", good), ("no datalogger (None)", {**good, "datalogger": None}),
             ("ts an integer", {**good, "ts": int(NOW)}), ("longest topic", {**good, "topic": "t" * 65535}),
             *spoilt.items()]
    for field, bad in [("connection_id", 0), ("connection_id", True), ("connection_id", 2**63),
                       ("connection_id", 1.0), ("topic", b"t"), ("topic", "t" * 65536), ("topic", None),
                       ("gateway", None), ("gateway", "G\u2028"), ("ts", True), ("ts", math.nan), ("ts", None),
                       ("ts", "1"), ("datalogger", ""), ("datalogger", 5), ("datalogger", "D\x00"),
                       ("sensors", None), ("sensors", {}), ("sensors", {"S": {"t": True}}),
                       ("sensors", {"": {"t": 1.0}})]:
        cases.append((f"{field} {bad!r:.20}", {**good, field: bad}))
    cases.append(("an unknown field instead of datalogger",
                  {k: v for k, v in good.items() if k != "datalogger"} | {"extra": "DL"}))
    cases.append(("an unknown seventh field", {**good, "extra": 1}))
    return cases


def test_the_fast_path_for_readings_knows_every_field_of_data():
    """The fast path lists Data's fields itself: a field added, renamed or
    reordered, or a consistency rule added, must be added there too."""
    assert protocol._field_names(Data) == ("connection_id", "topic", "gateway", "ts", "datalogger", "sensors")
    assert not hasattr(Data, "inconsistency")


@pytest.mark.parametrize("case", _data_bodies(), ids=lambda c: c[0])
def test_the_fast_path_for_readings_decides_as_the_schema_does(case):
    """One reading decoded the fast way is the reading (or the refusal, with
    its reason) the schema's general check gives."""
    _, body = case

    def outcome(build):
        try:
            return build(body)
        except ProtocolError as exc:
            return f"refused: {exc}"
    fast = outcome(protocol._build_data)
    assert fast == outcome(lambda b: protocol._build(Data, b))
    if case[0] == "good":
        assert isinstance(fast, Data)


def test_the_memory_of_good_names_and_senders_is_bounded_and_holds_only_good_ones():
    bad_names = ["", " ", "G" * (limits.MAX_NAME_CHARS + 1), "a\nb", "t\u2028", "\x1b[31m", "\ud800"]
    for n in range(3 * limits.GOOD_NAMES_KEPT):
        assert limits.name_problem(f"sensor-{n}") is None
        assert len(limits._good_names) <= limits.GOOD_NAMES_KEPT
    for bad in bad_names + [5, None, ["S"], {"S": 1}, b"S"]:
        assert limits.name_problem(bad) is not None, bad
        assert limits.name_problem(bad) is not None, bad  # asked twice: still refused
    assert not {b for b in bad_names} & limits._good_names

    class Forged(str):  # posing as a good name's hash and equal: not a plain str, so checked in full
        def __hash__(self):
            return hash("GW")

        def __eq__(self, other):
            return other == "GW"
    assert limits.name_problem("GW") is None
    assert limits.name_problem(Forged("GW\n")) is not None

    for n in range(1, 3 * protocol.SENDERS_KEPT):
        [item] = protocol.decode_events(pack(doc(cid=n)))
        assert isinstance(item, Envelope)
        assert len(protocol._senders) <= protocol.SENDERS_KEPT
    for sender in ("conn:0", "conn:x", "conn:1\n", "root", 5):
        [item] = protocol.decode_events(pack(doc(s=sender)))
        assert isinstance(item, Invalid) and sender not in protocol._senders


def test_a_lone_surrogate_never_makes_a_sender_fail():
    event = ConnectionLog(connection_id=1, level="INFO", message="bad name \ud800 here")
    frame = protocol.pack_envelope(envelope(event))
    [item] = protocol.decode_events(frame)
    assert isinstance(item, Envelope) and item.event.message == "bad name \\ud800 here"


def test_settings_travel_with_password_but_never_show_it():
    settings = ConnectionSettings(connection_id=3, site_id=2, broker_host="h", broker_port=1883,
                                  username="u", password="s3cret-pw", topics=("a/#",))
    assert "s3cret-pw" not in repr(settings)
    back = protocol.decode_settings(protocol.encode_settings(settings), ConnectionSettings)
    assert back == settings and back.password == "s3cret-pw"
    with pytest.raises(ProtocolError):
        protocol.decode_settings(b"junk", ConnectionSettings)
