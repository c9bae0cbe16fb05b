"""The internal wire: round trips, and clear errors for anything else."""

import msgpack
import pytest

from shared import protocol
from shared.connections import ConnectionSettings
from shared.protocol import (Ack, Batch, ConnectionLog, Data, DeviceChange, Envelope, MonitorCycle,
                             ParseFailure, ProtocolError, StatusChange)

EVENTS = [
    StatusChange(connection_id=1, status="error", message="refused", retry_attempt=2,
                 next_retry_at=1795860000.5, gave_up=False, exception_type="ConnectionRefusedError"),
    ConnectionLog(connection_id=1, level="WARNING", message="hello"),
    ParseFailure(connection_id=1, topic="t", parser_name="json", error_type="PARSE_ERROR",
                 error_message="bad", payload=b"\x00\xff"),
    Data(connection_id=1, topic="t", gateway="GW", ts=1.5, datalogger=None, sensors={"S": {"t": 1.0}}),
    MonitorCycle(instance_id="m", running=3, started=1, stopped=0, offline={"sensor": 2}, duration=0.01),
    DeviceChange(device_kind="sensor", device_id=3, site_id=1, name="S", online=False),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.KIND)
def test_every_kind_round_trips_with_its_header(event):
    env = Envelope(sender="conn:1", incarnation="12.ab", seq=7, floor=5, ts=1795860000.25, event=event)
    assert protocol.decode(protocol.encode(env)) == env


def test_batch_round_trips_and_rejects_nesting():
    envs = tuple(Envelope(sender="conn:1", incarnation="i", seq=n, floor=0, ts=1.0, event=e)
                 for n, e in enumerate(EVENTS, 1))
    assert protocol.decode(protocol.encode(Batch(envs))) == Batch(envs)
    with pytest.raises(ProtocolError, match="batch"):
        protocol.decode(msgpack.packb({"v": protocol.VERSION, "k": "batch", "e": []}))
    with pytest.raises(ProtocolError, match="batch"):
        protocol.decode(msgpack.packb({"v": protocol.VERSION, "k": "batch", "e": [{"v": 1, "k": "ack"}]}))


def test_ack_round_trips():
    assert protocol.decode(protocol.encode(Ack("12.ab", 9))) == Ack("12.ab", 9)


def frame(**overrides):
    doc = {"v": protocol.VERSION, "k": "connlog", "s": "x", "i": "i", "n": 1, "f": 0, "t": 1.0,
           "b": {"connection_id": 1, "level": "INFO", "message": "m"}}
    doc.update(overrides)
    return msgpack.packb(doc)


@pytest.mark.parametrize("raw, match", [
    (b"\xc1", "not msgpack"),
    (msgpack.packb([1, 2]), "not a map"),
    (frame(v=99), "version"),
    (frame(k="launch"), "unknown message kind"),
    (frame(n="seven"), "'n'"),
    (frame(b={"connection_id": 1, "level": "INFO"}), "missing field 'message'"),
    (frame(b={"connection_id": "1", "level": "INFO", "message": "m"}), "wrong type"),
    (frame(b={"connection_id": 1, "level": "LOUD", "message": "m"}), "level"),
    (frame(b={"connection_id": 1, "level": "INFO", "message": "m", "extra": 1}), "unknown fields"),
    (b"\x00" * (protocol.MAX_FRAME_BYTES + 1), "exceeds"),
])
def test_invalid_frames_raise_one_error_type(raw, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(raw)


def test_settings_travel_with_password_but_never_show_it():
    settings = ConnectionSettings(connection_id=3, site_id=2, broker_host="h", broker_port=1883,
                                  username="u", password="s3cret-pw", topics=("a/#",))
    assert "s3cret-pw" not in repr(settings)
    back = protocol.decode_settings(protocol.encode_settings(settings), ConnectionSettings)
    assert back == settings and back.password == "s3cret-pw"
    with pytest.raises(ProtocolError):
        protocol.decode_settings(b"junk", ConnectionSettings)
