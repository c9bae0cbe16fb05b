"""Sending events to the logger, at least once.

Each process that reports (the monitor and every child) has one
``EventSender``: a DEALER socket connected to the logger's ROUTER. Events get
a sequence number and stay in ``unacked`` until the logger acknowledges
(after its commit) a sequence number at or above theirs. If no ack comes for
``resend_after`` seconds, everything unacknowledged is sent again (then after
twice as long, up to ``RESEND_CAP``, while the logger stays silent); the
logger drops what it already committed, so a resend is harmless.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict

import zmq

from shared import protocol
from shared.protocol import Ack, Batch, Envelope, Event

RESEND_CAP = 60.0


class EventSender:
    def __init__(self, context: zmq.Context, endpoint: str, sender: str, *, resend_after: float):
        self.sender = sender
        self.incarnation = f"{os.getpid()}.{secrets.token_hex(4)}"
        self.resend_after = resend_after
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.connect(endpoint)
        self._seq = 0
        self._floor = 0
        # Frames sent and not yet acknowledged, by the last sequence number they hold.
        self._unacked: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._unacked_events = 0
        self._deferred: list[Envelope] = []
        self._last_progress = time.monotonic()
        self._resend_wait = resend_after

    @property
    def unacked(self) -> int:
        """Events sent (or about to be) that the logger has not acknowledged."""
        return self._unacked_events + len(self._deferred)

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
        (one frame for many events), else send it at once, after any deferred."""
        self._seq += 1
        envelope = Envelope(sender=self.sender, incarnation=self.incarnation, seq=self._seq,
                            floor=self._floor, ts=time.time(), event=event)
        self._deferred.append(envelope)
        if not defer:
            self.flush_deferred()
        return self._seq

    def flush_deferred(self) -> None:
        if not self._deferred:
            return
        batch, self._deferred = self._deferred, []
        frame = protocol.encode(batch[0] if len(batch) == 1 else Batch(tuple(batch)))
        if not self._unacked:
            self._last_progress = time.monotonic()
        self._unacked[batch[-1].seq] = (frame, len(batch))
        self._unacked_events += len(batch)
        self._transmit(frame)

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
                message = protocol.decode(frame)
            except protocol.ProtocolError:
                continue  # not for us; the logger never sends these
            if isinstance(message, Ack) and message.incarnation == self.incarnation:
                self._acked(message.upto)

    def _acked(self, upto: int) -> None:
        if upto <= self._floor:
            return
        self._floor = upto
        while self._unacked:
            seq = next(iter(self._unacked))
            if seq > upto:
                break
            self._unacked_events -= self._unacked.pop(seq)[1]
        self._last_progress = time.monotonic()
        self._resend_wait = self.resend_after

    def resend_due(self) -> float | None:
        """Resend if the logger has been silent too long; return seconds until the next check."""
        if not self._unacked:
            return None
        now = time.monotonic()
        wait = self._last_progress + self._resend_wait - now
        if wait > 0:
            return wait
        for frame, _ in self._unacked.values():
            self._transmit(frame)
        self._last_progress = now
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
