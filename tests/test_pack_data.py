"""The child's fast path for data (``protocol.pack_data``, ``EventStream.send_data``)
puts on the wire exactly what packing a ``Data`` envelope does, so the logger's
checks (``decode_events``) see the same frames."""

from __future__ import annotations

import time

import pytest

from shared import protocol
from shared.protocol import Data, Envelope


@pytest.mark.parametrize("datalogger", ["DL-07", None])
def test_pack_data_is_the_envelope_of_a_data_event(datalogger):
    now = time.time()
    sensors = {"S-1": {"temperature": 21.4, "humidity": 40.2}, "S-2": {"t": -1.0}}
    event = Data(connection_id=5, topic="sites/x/GW-01/DL-07", gateway="GW-01", datalogger=datalogger,
                 ts=now - 3, sensors=sensors)
    envelope = Envelope(sender="conn:5", incarnation="abc.1", seq=9, floor=4, ts=now, event=event)
    packed = protocol.pack_data("conn:5", "abc.1", 9, 4, now, 5, "sites/x/GW-01/DL-07", "GW-01", now - 3,
                                datalogger, sensors)
    assert packed == protocol.pack_envelope(envelope)
    assert protocol.decode_events(packed) == [envelope]


def test_a_data_event_the_logger_refuses_is_refused_through_the_fast_path_too():
    now = time.time()
    packed = protocol.pack_data("conn:5", "abc", 1, 0, now, 5, "t", "GW\n", now, None, {"S": {"t": float("nan")}})
    [item] = protocol.decode_events(packed)
    assert isinstance(item, protocol.Invalid) and "gateway" in item.reason
