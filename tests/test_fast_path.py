"""The child's fast path for QoS 0/1 PUBLISH packets (``ReadAheadClient.read_publishes``)
delivers exactly what paho's own packet handling delivers, in order, and leaves
to paho everything else (other packets, QoS 2, oversized packets, a packet cut
by the end of a read). A real socket pair, no broker: pure packet logic."""

from __future__ import annotations

import contextlib
import socket
import struct

import paho.mqtt.client as mqtt
import pytest

from services.connection import ReadAheadClient
from tests.bench.publisher import remaining_length as _length


def publish(topic: bytes, payload: bytes, qos: int = 1, mid: int = 1, retain: bool = False,
            dup: bool = False) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload
    return bytes([0x30 | qos << 1 | retain | dup << 3]) + _length(len(body)) + body


PINGRESP = b"\xd0\x00"


def stream() -> bytes:
    packets = [publish(b"sites/a/GW/DL", b'{"n": %d}' % n, qos=n % 2, mid=n + 1) for n in range(300)]
    packets.insert(7, PINGRESP)
    packets.insert(20, publish(b"sites/a/q2", b"two", qos=2, mid=4000))
    packets.insert(33, publish(b"sites/a/big", b"x" * 300_000, qos=1, mid=4001))  # > max_packet
    packets.insert(50, publish(b"sites/\xff/bad-utf8", b"p", qos=1, mid=4002, retain=True, dup=True))
    packets.insert(60, publish(b"sites/a/long", b"y" * 20_000, qos=0))  # a multi-byte remaining length
    return b"".join(packets)


def receive(fast: bool) -> list[tuple]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id="fast", manual_ack=True,
                             max_packet=100_000)
    got: list[tuple] = []

    def on_message(_client, _userdata, message):
        got.append((message.topic.encode() if _utf8(message) else b"?", bytes(message.payload), message.qos,
                    message.mid, message.retain, message.dup, client.take_oversized()))
    client.on_message = on_message
    client._sock = ours
    data = stream()
    try:
        sent = 0
        while sent < len(data):
            sent += theirs.send(data[sent:sent + 50_000])  # reads end in the middle of packets
            for _ in range(10_000):
                if fast:
                    client.read_publishes(lambda: False, 10_000)
                before = len(got), client._in_packet["to_process"], client.buffered
                client.loop_read()
                if (len(got), client._in_packet["to_process"], client.buffered) == before and not client.buffered:
                    break
    finally:
        client._sock = None
        ours.close()
        theirs.close()
    return got


def _utf8(message) -> bool:
    try:
        message.topic
    except UnicodeDecodeError:
        return False
    return True


def test_the_fast_path_delivers_what_paho_delivers_in_the_same_order():
    slow, fast = receive(fast=False), receive(fast=True)
    assert len(slow) == 304  # 300 + QoS 2 + the oversized stand-in + bad UTF-8 + long
    assert fast == slow
    big = next(m for m in fast if m[0] == b"sites/a/big")
    assert big[6] == 300_000 and len(big[1]) <= ReadAheadClient.SAMPLE_BYTES  # cut, never assembled


@contextlib.contextmanager
def client_on_a_socket(manual_ack: bool):
    """A client reading from one end of a socket pair; the other end, and the
    packet ids of the messages it delivers, for the test."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id="fast", manual_ack=manual_ack)
    got: list[int] = []
    client.on_message = lambda c, u, m: got.append(m.mid)
    client._sock = ours
    try:
        yield client, theirs, got
    finally:
        client._sock = None
        ours.close()
        theirs.close()


def test_the_fast_path_stops_when_told_to():
    with client_on_a_socket(manual_ack=True) as (client, theirs, got):
        theirs.send(b"".join(publish(b"t", b"p", mid=n) for n in range(1, 11)))
        client.loop_read()  # the first read: paho's own path fills the read-ahead buffer
        assert client.read_publishes(lambda: len(got) >= 4, 100) == 3
        assert client.read_publishes(lambda: False, 2) == 2
        assert client.read_publishes(lambda: False, 100) == 4
        assert got == list(range(1, 11))


def test_with_acks_on_receipt_the_fast_path_sends_the_pubacks_paho_would():
    with client_on_a_socket(manual_ack=False) as (client, theirs, got):
        theirs.send(b"".join(publish(b"t", b"p", qos=n % 2, mid=n) for n in range(1, 21)))
        client.loop_read()
        assert client.read_publishes(lambda: False, 100) == 19
        client.loop_write()
        theirs.setblocking(False)
        acks = theirs.recv(1000)
        assert acks == b"".join(struct.pack("!BBH", 0x40, 2, n) for n in range(1, 21, 2))
        assert got == [n if n % 2 else 0 for n in range(1, 21)]  # a QoS 0 message has no packet id


#: Bytes a hostile or broken broker could send where a PUBLISH is expected: the
#: fast path hands none of them over, and leaves them where they are for paho.
MALFORMED = {
    "an empty topic": publish(b"", b"p", mid=7),
    "a topic longer than the packet": b"\x32\x06\x00\xff" + b"abcd",
    "a packet too short for a topic length": b"\x30\x01\x00",
    "a remaining length of five bytes": b"\x30\xff\xff\xff\xff\x7f" + b"x" * 16,
    "QoS 3": b"\x36\x05\x00\x01t\x00\x07",
    "QoS 2 (PUBREC after the commit: paho's path)": publish(b"t", b"p", qos=2, mid=7),
    "another packet type": b"\xe0\x00",
}


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_the_fast_path_leaves_anything_but_a_well_formed_publish_to_paho(bad):
    with client_on_a_socket(manual_ack=True) as (client, theirs, got):
        theirs.send(publish(b"t", b"first", mid=1) + publish(b"t", b"second", mid=2) + bad
                    + publish(b"t", b"after", mid=3))
        client.loop_read()  # paho's own path takes the first packet and fills the read-ahead buffer
        assert client.read_publishes(lambda: False, 100) == 1  # the second, then it stops at the bad bytes
        at = client._ahead_at
        assert client.read_publishes(lambda: False, 100) == 0
        assert client._ahead_at == at
        assert got == [1, 2]
