"""Sending events to the logger, at least once.

Each process that reports (the monitor and every child) has one
``EventSender``: a DEALER socket connected to the logger's ROUTER. Events get
a sequence number and stay in ``unacked`` until the logger acknowledges
(after its commit) a sequence number at or above theirs. If no ack comes for
``resend_after`` seconds, everything unacknowledged is sent again (then after
twice as long, up to ``RESEND_CAP``, while the logger stays silent); the
logger drops what it already committed, so a resend is harmless. An ack that
asks for it (the logger dropped frames while it could not store them) makes
the sender send everything unacknowledged at once.

Each event is packed when it is sent, so the sender knows exactly how many
bytes it holds (``unacked_bytes``: a child stops reading from its broker at a
limit) and never builds a frame over the wire's limit: deferred events are
split into frames of at most ``protocol.MAX_FRAME_BYTES``, and an event too
large for any frame is refused by ``send`` with ``EventTooLarge`` before it
takes a sequence number.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict

import zmq
from loguru import logger

from shared import protocol
from shared.protocol import Ack, Envelope, Event, Refusal

RESEND_CAP = 60.0
#: Refusals and protocol errors from the logger logged at most this often.
REPORT_EVERY = 10.0


class EventTooLarge(ValueError):
    """An event that no frame can carry."""


def connect_socket(context: zmq.Context, kind: int, endpoint: str, curve: "object | None" = None) -> zmq.Socket:
    """A socket to the logger, bounded and, on TCP, authenticated (``shared.curve``)."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REPLY_BYTES)
    if curve is not None:
        curve.secure_client(socket)  # type: ignore[attr-defined]
    socket.connect(endpoint)
    return socket


class EventSender:
    def __init__(self, context: zmq.Context, endpoint: str, sender: str, *, resend_after: float,
                 curve: object | None = None):
        self.sender = sender
        self.incarnation = f"{os.getpid()}.{secrets.token_hex(4)}"
        self.resend_after = resend_after
        self.socket = connect_socket(context, zmq.DEALER, endpoint, curve)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self._seq = 0
        self._floor = 0
        # Frames sent and not yet acknowledged, by the last sequence number
        # they hold: (frame, events in it).
        self._unacked: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._unacked_events = 0
        self._unacked_bytes = 0
        self._deferred: list[bytes] = []
        self._deferred_bytes = 0
        self._last_progress = time.monotonic()
        self._resend_wait = resend_after
        self._reported_at = 0.0
        self.refused = 0  # events the logger refused, since start

    @property
    def unacked(self) -> int:
        """Events sent (or about to be) that the logger has not acknowledged."""
        return self._unacked_events + len(self._deferred)

    @property
    def unacked_bytes(self) -> int:
        """Bytes of those events, as packed for the wire."""
        return self._unacked_bytes + self._deferred_bytes

    @property
    def last_seq(self) -> int:
        """The sequence number of the last event sent (0 before the first)."""
        return self._seq

    @property
    def acked(self) -> int:
        """Every event up to this sequence number is committed by the logger."""
        return self._floor

    def send(self, event: Event, defer: bool = False) -> int:
        """Send ``event``; with ``defer``, keep it for the next ``flush_deferred``
        (one frame for many events), else send it at once, after any deferred.

        Raises ``EventTooLarge`` (and sends nothing) for an event no frame can hold.
        """
        envelope = Envelope(sender=self.sender, incarnation=self.incarnation, seq=self._seq + 1,
                            floor=self._floor, ts=time.time(), event=event)
        return self._queue(protocol.pack_envelope(envelope), event.KIND, defer)

    def send_data(self, connection_id: int, topic: str, gateway: str, datalogger: str | None, ts: float,
                  sensors: dict, defer: bool = False) -> int:
        """``send(Data(...))`` without building the event and its envelope (one per reading)."""
        return self._queue(protocol.pack_data(self.sender, self.incarnation, self._seq + 1, self._floor, time.time(),
                                              connection_id, topic, gateway, ts, datalogger, sensors), "data", defer)

    def _queue(self, packed: bytes, kind: str, defer: bool) -> int:
        if len(packed) + protocol.FRAME_OVERHEAD > protocol.MAX_FRAME_BYTES:
            raise EventTooLarge(f"a {kind} event of {len(packed)} bytes exceeds the wire's "
                                f"limit of {protocol.MAX_FRAME_BYTES} bytes")
        self._seq += 1
        self._deferred.append(packed)
        self._deferred_bytes += len(packed)
        if not defer:
            self.flush_deferred()
        return self._seq

    def flush_deferred(self) -> None:
        """Send the deferred events, in as few frames as the wire's limits allow."""
        if not self._deferred:
            return
        packed, self._deferred = self._deferred, []
        self._deferred_bytes = 0
        if not self._unacked:
            self._last_progress = time.monotonic()
        first_seq = self._seq - len(packed) + 1
        start = 0
        while start < len(packed):
            end, size = start, protocol.FRAME_OVERHEAD
            while (end < len(packed) and end - start < protocol.MAX_BATCH_EVENTS
                   and size + len(packed[end]) <= protocol.MAX_FRAME_BYTES):
                size += len(packed[end])
                end += 1
            frame = protocol.frame_of(packed[start:end])
            self._unacked[first_seq + end - 1] = (frame, end - start)
            self._unacked_events += end - start
            self._unacked_bytes += len(frame)
            self._transmit(frame)
            start = end

    def _transmit(self, frame: bytes) -> None:
        try:
            self.socket.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the queue to the logger is full; the resend timer tries again

    def receive_acks(self) -> int:
        """Apply every ack waiting on the socket; return the highest acked seq."""
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self._floor
            try:
                message = protocol.decode_reply(frame)
            except protocol.ProtocolError as exc:
                self._report("an unreadable reply from the logger: {}", exc)
                continue
            if isinstance(message, Refusal):
                self._report("the logger refused a frame of ours: {}", message.reason)
            elif message.incarnation == self.incarnation:
                self._acked(message)

    def _acked(self, ack: Ack) -> None:
        if ack.refused:
            self.refused += len(ack.refused)
            seq, reason = ack.refused[0]
            self._report("the logger refused {} event(s) of ours (it recorded them), e.g. #{}: {}",
                         len(ack.refused), seq, reason)
        if ack.upto > self._floor:
            self._floor = min(ack.upto, self._seq)
            while self._unacked:
                seq = next(iter(self._unacked))
                if seq > self._floor:
                    break
                frame, count = self._unacked.pop(seq)
                self._unacked_events -= count
                self._unacked_bytes -= len(frame)
            self._last_progress = time.monotonic()
            self._resend_wait = self.resend_after
        if ack.resend:
            self._resend_all()

    def _report(self, text: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._reported_at >= REPORT_EVERY:
            self._reported_at = now
            logger.warning(text, *args)

    def _resend_all(self) -> None:
        for frame, _ in self._unacked.values():
            self._transmit(frame)
        self._last_progress = time.monotonic()

    def resend_due(self) -> float | None:
        """Resend if the logger has been silent too long; return seconds until the next check."""
        if not self._unacked:
            return None
        now = time.monotonic()
        wait = self._last_progress + self._resend_wait - now
        if wait > 0:
            return wait
        self._resend_all()
        self._resend_wait = min(self._resend_wait * 2, max(RESEND_CAP, self.resend_after))
        return self._resend_wait

    def bound(self, timeout: float) -> float:
        """Resend if due; return ``timeout`` shortened to when the next resend is due."""
        resend = self.resend_due()
        return timeout if resend is None else min(timeout, resend)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every event to be acknowledged."""
        deadline = time.monotonic() + timeout
        self.flush_deferred()
        while self._unacked:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.socket.poll(min(left, self.resend_after) * 1000, zmq.POLLIN):
                self.receive_acks()
            else:
                self.resend_due()
        return True

    def close(self) -> None:
        self.socket.close(linger=0)
