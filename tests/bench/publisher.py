"""A gateway at full speed: QoS 1 publishes with a bounded window of in-flight messages.

    python tests/bench/publisher.py --port 1883 --topic sites/a/GW-01 --seconds 20

Connects, prints ``ready``, waits for a line on stdin (``go``), then publishes
the documented JSON format, with a ``ts`` unique per message (so each message
is one new reading row), for ``--seconds`` or until SIGTERM. It never waits
for one PUBACK: at most ``--window`` messages are unacknowledged at any time.
At the end it waits for the outstanding PUBACKs and prints one JSON line:
published, acked, start, end (wall clock of the last publish), rate.

It speaks MQTT 3.1.1 itself on a plain socket (CONNECT, PUBLISH QoS 1,
PUBACK, PINGREQ, DISCONNECT) instead of through paho: a publish is then a few
bytes appended to a buffer and one ``send`` per burst, PUBACKs are counted
from one ``recv`` per burst. Through paho a message cost this side about
30 us of CPU, so the publisher took 65-75 % of a core at 25,000 msg/s and
was the bound of the ingest bench: every pipeline that kept pace with it
measured the publisher, not itself. What the broker and the pipelines see
is the same: real QoS 1 publishes from one client, acknowledged one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time

KEEPALIVE = 60  # s; a PINGREQ goes out every KEEPALIVE / 2 s


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (the fixed header's remaining length)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def connect_packet(client_id: str) -> bytes:
    variable = _string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", KEEPALIVE)  # 3.1.1, clean session
    body = variable + _string(client_id.encode())
    return b"\x10" + remaining_length(len(body)) + body


class Acks:
    """Counts the PUBACKs in what the broker sends (and skips anything else)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.acked = 0
        self.connack: int | None = None

    def feed(self, data: bytes) -> None:
        buf = self.buffer + data
        at = 0
        while True:
            if len(buf) - at < 2:
                break
            kind = buf[at]
            # Remaining length: 1-4 bytes.
            length, shift, i = 0, 0, at + 1
            while i < len(buf):
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            else:
                break
            if len(buf) - i < length:
                break
            if kind == 0x40:  # PUBACK
                self.acked += 1
            elif kind == 0x20:  # CONNACK: flags, return code
                self.connack = buf[i + 1]
            at = i + length
        self.buffer = buf[at:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--window", type=int, default=1000, help="most messages in flight (unacknowledged)")
    ap.add_argument("--rate", type=float, default=0.0, help="messages per second at most (0: no limit)")
    ap.add_argument("--gateway", default="GW-01")
    ap.add_argument("--ts-base", type=float, default=None,
                    help="ts of the first message (epoch s); message i has ts-base + i ms")
    args = ap.parse_args()
    if not 0 < args.window < 65535:
        ap.error("--window must be between 1 and 65534 (MQTT packet identifiers)")

    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    sock = socket.create_connection((args.host, args.port), timeout=15)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(f"bench-pub-{os.getpid()}"))
    acks = Acks()
    connect_deadline = time.monotonic() + 15
    while acks.connack is None and time.monotonic() < connect_deadline:
        data = sock.recv(65536)
        if not data:
            break
        acks.feed(data)
    if acks.connack != 0:
        print(f"publisher: no accepting CONNACK within 15 s (return code {acks.connack})", file=sys.stderr)
        return 1
    sock.setblocking(False)
    pingreq = b"\xc0\x00"
    next_ping = time.monotonic() + KEEPALIVE / 2

    def read_acks() -> bool:
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return True
            if not data:
                return False
            acks.feed(data)

    print("ready", flush=True)
    # Wait for "go" on stdin, keeping the connection alive meanwhile.
    while not select.select([sys.stdin], [], [], 1.0)[0]:
        if time.monotonic() >= next_ping:
            sock.send(pingreq)
            next_ping += KEEPALIVE / 2
        read_acks()
    if not sys.stdin.readline():
        return 1

    # Seven days back, one millisecond apart: unique, plausible timestamps.
    ts_base = args.ts_base if args.ts_base is not None else time.time() - 7 * 86400
    topic = _string(args.topic.encode())
    prefix = f'{{"gateway": "{args.gateway}", "datalogger": "DL-07", "ts": '.encode()
    suffix = b', "sensors": {"S-1": {"temperature": 21.4, "humidity": 40.2}}}'
    fixed = len(topic) + 2 + len(prefix) + len(suffix)  # all but the ts's digits
    headers: dict[int, bytes] = {}  # remaining length -> fixed header
    pack_id = struct.Struct("!H").pack
    out = bytearray()
    published = 0
    start = time.time()
    deadline = time.monotonic() + args.seconds
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    next_at = time.monotonic()
    while not stopping:
        now = time.monotonic()
        if now >= deadline:
            break
        # Fill the window.
        room = args.window - (published - acks.acked)
        while room > 0 and not out[1 << 18:]:
            if interval:
                if next_at > now:
                    break
                next_at += interval
            ts = repr(ts_base + published / 1000.0).encode()
            length = fixed + len(ts)
            header = headers.get(length)
            if header is None:
                header = headers[length] = b"\x32" + remaining_length(length)
            out += header
            out += topic
            out += pack_id(published % 65535 + 1)
            out += prefix
            out += ts
            out += suffix
            published += 1
            room -= 1
        if out:
            try:
                sent = sock.send(out)
            except BlockingIOError:
                sent = 0
            del out[:sent]
        if now >= next_ping:
            out += pingreq
            next_ping = now + KEEPALIVE / 2
        wait = 0.05
        if interval:
            wait = max(0.0, min(wait, next_at - time.monotonic()))
        readable, _, _ = select.select([sock], [sock] if out else [], [], wait)
        if readable and not read_acks():
            print("publisher: the broker closed the connection", file=sys.stderr)
            return 1
    end = time.time()
    drain_deadline = time.monotonic() + 30
    while (acks.acked < published or out) and time.monotonic() < drain_deadline:
        if out:
            try:
                del out[:sock.send(out)]
            except BlockingIOError:
                pass
        select.select([sock], [sock] if out else [], [], 0.05)
        if not read_acks():
            break
    try:
        sock.setblocking(True)
        sock.sendall(b"\xe0\x00")  # DISCONNECT
        sock.close()
    except OSError:
        pass
    print(json.dumps({"published": published, "acked": acks.acked, "start": start, "end": end,
                      "rate": published / max(end - start, 1e-9), "topic": args.topic}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
