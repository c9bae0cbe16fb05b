"""A child: one MQTT connection, for one site.

Forked by the zygote (services/zygote.py), which received the connection's
settings (password included) from the monitor on its control socket: never
argv, never the environment. For debugging, run one alone; it then reads its
settings from the database (or, with --settings-stdin, from stdin):

    python -m services.connection --connection-id 7

Whatever its broker sends stops at this module's boundary: a packet larger
than SITELINK_MAX_PAYLOAD allows is never assembled in memory
(``ReadAheadClient``), any message it cannot turn into data becomes one
parsing-log row (``_on_message``), QoS 1 and 2 messages are acknowledged to
the broker only once the logger has committed what they produced, and a
child the logger cannot keep up with stops reading but keeps its session
alive and says so (``_while_paused``).

It connects with paho-mqtt (v2 callback API) in a single-threaded loop that
polls the MQTT socket, the logger's acks and a signal pipe together; it
subscribes, parses each message with the connection's parser and sends data
and parse errors to the logger. Its life is one state machine (``transition``)
that reports every change. Retries back off exponentially with jitter; after
``SITELINK_MAX_RETRIES`` failures in a row it reports that it gives up and
exits with ``exitcodes.GAVE_UP``, and the monitor leaves it stopped until the
cool-down (``mqtt_next_retry``) has passed.

It runs only while its monitor's claim on the connection holds: on every
tick and before every connection attempt it checks the fence the monitor
publishes (shared/runfile.py) and, past it, disconnects and exits with
``exitcodes.FENCED``, even if the monitor is frozen or cut off from PostgreSQL.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import dataclasses
import logging
import os
import select
import signal
import socket
import ssl
import struct
import sys
import time
import traceback

import paho.mqtt.client as mqtt
from paho.mqtt import _packet
import zmq
from loguru import logger
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services.states import CHILD_TRANSITIONS, ChildStatus, IllegalTransition
from shared import backoff, config, curve, exitcodes, limits, logs, parsers, process, protocol, runfile
from shared.connections import ConnectionSettings
from shared.events import EventSender, EventTooLarge
from shared.protocol import ConnectionLog, Flow, ParseFailure, StatusChange
from shared.signals import SignalPipe

#: Longest the loop sleeps when no timer is due sooner: an idle connected
#: child wakes only for its timers (keepalive ping, ping answer, stall, fence,
#: resends), not on a fixed tick, so 1000 idle children stay off the CPU.
#: Only a safety net: every timer the loop needs is computed, and with the
#: default keepalive (60 s) a 30-s tick was one of an idle child's four or
#: five wake-ups a minute.
TICK = 300.0
#: Wake this much after a timer is due, not before it (monotonic clocks, poll's milliseconds).
TIMER_SLACK = 0.005
#: Most MQTT packets read in one go before the loop polls again.
READ_BURST = 500
#: A burst of at least PACE_FROM packets means a stream: the broker's socket
#: is then read again READ_PACE s later, not at its next packet, so that what
#: arrives meanwhile is read, parsed and sent to the logger as one burst (one
#: wake-up, one frame for the logger) instead of a few packets at a time. A
#: sparse site (bursts of one or two) is read at once, as before.
READ_PACE = 0.002
PACE_FROM = 8
#: How long an MQTT 5 broker keeps our session while we are away.
SESSION_EXPIRY = 7 * 24 * 3600
#: What a PUBLISH may hold besides its payload: the topic (at most 65535
#: bytes), its length, a packet id and MQTT 5 properties.
MAX_PUBLISH_HEADER = 65535 + 2 + 2 + 64 * 1024
#: A child paused this long by backpressure says so (shorter pauses are the
#: normal rhythm of a busy pipeline).
PAUSE_REPORT_AFTER = 5.0

#: CONNACK reason codes that retrying will not fix, in plain words.
REJECTIONS = {
    0x84: "the broker does not support this MQTT protocol version",
    0x85: "the broker rejected the client id",
    0x86: "the broker rejected the username or password",
    # Mosquitto answers a wrong password with this one too.
    0x87: "the broker did not authorise this client: check its username and password",
    0x8A: "the broker has banned this client",
    0x8C: "the broker rejected the authentication method",
}
SESSION_TAKEN_OVER = 0x8E
#: Connections lost this soon after being made, this many times in a row,
#: point at another client using the same client id.
QUICK_LOSS_WINDOW = 30.0
QUICK_LOSSES_FOR_CLASH = 3


def is_rejection(exc: BaseException) -> bool:
    """Failures that will not fix themselves by retrying (unlike network trouble)."""
    return isinstance(exc, ssl.SSLCertVerificationError)


def describe_exception(exc: BaseException) -> str:
    """An operator-readable reason for a failed connection attempt."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on this port?)"
    if isinstance(exc, OSError) and exc.__class__.__name__ == "gaierror":
        return f"cannot resolve the broker's host name ({exc.strerror or exc})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({exc.verify_message or exc})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc})"
    if isinstance(exc, (TimeoutError, OSError)) and "timed out" in str(exc):
        return "timed out connecting to the broker"
    if isinstance(exc, OSError):
        return f"network error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


#: A PUBACK as paho writes it (MQTT 3.1.1 and 5: reason code omitted, i.e. success).
PUBACK_COMMAND = PacketTypes.PUBACK << 4
_PUBACK = struct.Struct("!BBH")


class ReadAheadClient(mqtt.Client):
    """paho with three changes at the boundary where a broker's bytes enter.

    Reads ahead: paho reads each packet with two or three recv() calls of a
    few bytes; this serves them from one large read, a syscall per burst.

    Bounded memory: paho assembles every packet whole in memory. A PUBLISH
    whose body is larger than ``max_packet`` is never assembled: its topic,
    packet id and first ``SAMPLE_BYTES`` are kept, the rest is read and
    dropped as it arrives, and paho is handed a small stand-in packet (same
    topic, id and QoS; the sample as payload) while ``take_oversized()``
    tells the handler the real size. Any other packet that large is a broken
    broker: the connection is closed.

    QoS 2 acknowledged after the commit: paho answers PUBREC as soon as a
    QoS 2 PUBLISH arrives, so a child killed before the logger committed it
    would lose it (the broker discards it after PUBREC). Here a QoS 2 message
    is delivered on PUBLISH, PUBREC goes out with ``ack()`` (after the
    commit) and a PUBREL is answered with PUBCOMP; a redelivery after a crash
    is harmless (``reading``'s natural key).

    These rely on paho's private ``_sock_recv``, ``_in_packet``,
    ``_handle_publish``, ``_handle_pubrel``, ``_send_pubrec``,
    ``_send_pubcomp``, ``_packet_queue``, ``_ping_t``, ``_send_pingreq`` (and, for the fast path,
    ``_in_callback_mutex``, ``_msgtime_mutex``, ``_userdata``): pyproject pins
    paho-mqtt below 2.3 and ``tests/test_limits.py`` checks they exist.
    """

    READ_SIZE = 64 * 1024  # a burst's worth; each read is a new bytes object
    SAMPLE_BYTES = 8 * 1024

    def __init__(self, *args, max_packet: int = 1 << 20, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_packet = max_packet
        self._ahead = b""
        self._ahead_at = 0
        self._giant: _Giant | None = None
        self._oversized: int | None = None
        self._qos2_receiving = False
        self._qos2_mid: int | None = None
        self._filtered = False

    @property
    def buffered(self) -> bool:
        """Bytes already read from the socket that paho has not consumed yet."""
        return self._ahead_at < len(self._ahead)

    def take_oversized(self) -> int | None:
        """The real payload size of the message being handled, if it was cut."""
        size, self._oversized = self._oversized, None
        return size

    def _read_ahead(self, bufsize: int) -> bytes:
        if self._ahead_at >= len(self._ahead):
            chunk = super()._sock_recv(self.READ_SIZE)
            if not chunk:
                return chunk  # the peer closed the connection
            self._ahead, self._ahead_at = chunk, 0
        data = self._ahead[self._ahead_at:self._ahead_at + bufsize]
        self._ahead_at += len(data)
        return data

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._giant is None and bufsize <= self.max_packet:
            return self._read_ahead(bufsize)
        if self._giant is None:  # paho asks for the whole body of a packet: too big
            command = self._in_packet["command"]
            if command & 0xF0 != 0x30:
                raise ConnectionError(f"the broker sent a packet of {bufsize} bytes (type {command >> 4}), "
                                      f"more than {self.max_packet}: closing the connection")
            self._giant = _Giant(bufsize, (command & 0x06) >> 1, self._protocol == mqtt.MQTTv5,
                                 self.SAMPLE_BYTES)
        giant = self._giant
        while giant.left:
            data = self._read_ahead(min(giant.left, self.READ_SIZE))  # raises BlockingIOError when dry
            if not data:
                return data
            giant.take(data)
        self._giant = None
        body = giant.stand_in()
        # paho counts down what it still expects of this packet: the stand-in's size now.
        self._in_packet["remaining_length"] = self._in_packet["to_process"] = len(body)
        self._oversized = giant.payload_size
        return body

    def _sock_close(self) -> None:
        self._ahead, self._ahead_at, self._giant = b"", 0, None
        super()._sock_close()

    # -- the fast path: QoS 0/1 PUBLISH packets straight from the read-ahead buffer

    def message_callback_add(self, sub, callback):
        self._filtered = True  # paho's topic matcher then decides: no fast path
        return super().message_callback_add(sub, callback)

    def read_publishes(self, stop: collections.abc.Callable[[], bool], limit: int) -> int:
        """Hand each whole QoS 0 or 1 PUBLISH at the head of the read-ahead
        buffer to ``on_message``, without paho's per-packet machinery (three
        reads, a dict, a decode, the topic matcher); return how many.

        It stops, leaving the rest to paho's own ``loop_read``, at anything
        else: another packet type, QoS 2 (PUBREC after the commit), a packet
        larger than ``max_packet`` (never assembled: ``_Giant``), a packet not
        all read yet, one paho would call malformed, MQTT 5 (properties), a
        filtered callback (``message_callback_add``); and when ``stop()`` says
        so (the child is paused), checked before each message as ``_read_burst``
        does between packets.
        """
        if (self._in_packet["command"] != 0 or self._giant is not None or self._protocol == mqtt.MQTTv5
                or self._filtered or self.on_message is None):
            return 0
        buf, at = self._ahead, self._ahead_at
        end = len(buf)
        on_message, userdata, max_packet = self.on_message, self._userdata, self.max_packet
        handled = 0
        auto_acks = bytearray()
        now = mqtt.time_func()
        with self._in_callback_mutex:
            while at + 4 <= end and handled < limit and self._ahead is buf and not stop():
                header = buf[at]
                qos = (header & 0x06) >> 1
                if header & 0xF0 != 0x30 or qos == 2 or qos == 3:
                    break
                length, shift, i = 0, 0, at + 1
                while i < end and shift < 28:
                    byte = buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                else:
                    break  # the length is not all here, or longer than MQTT allows: paho's to judge
                body_end = i + length
                if length > max_packet or body_end > end or length < 2:
                    break
                topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                payload_at = topic_end + 2 if qos else topic_end
                if topic_end == i + 2 or payload_at > body_end:
                    break  # an empty topic, or one longer than the packet: malformed
                message = _Published(((buf[topic_end] << 8) | buf[topic_end + 1]) if qos else 0,
                                     buf[i + 2:topic_end], buf[payload_at:body_end], qos,
                                     bool(header & 0x08), bool(header & 0x01), now)
                at = self._ahead_at = body_end
                handled += 1
                on_message(self, userdata, message)
                if qos and not self._manual_ack:  # acks on receipt: paho's PUBACK after on_message
                    auto_acks += _PUBACK.pack(PUBACK_COMMAND, 2, message.mid)
        if auto_acks:
            self._packet_queue(PUBACK_COMMAND, bytes(auto_acks), 0, 0)
        if handled:
            with self._msgtime_mutex:
                self._last_bytes_received = now
        return handled

    # -- QoS 2: PUBREC after the commit

    def _handle_publish(self):
        if (self._in_packet["command"] & 0x06) >> 1 != 2 or not self._manual_ack:
            return super()._handle_publish()
        self._qos2_receiving = True
        try:
            rc = super()._handle_publish()  # stores the message; its PUBREC is held back
        finally:
            self._qos2_receiving = False
        with self._in_message_mutex:
            message = self._in_messages.pop(self._qos2_mid, None)
        if message is not None:
            self._handle_on_message(message)
        return rc

    def _send_pubrec(self, mid: int):
        if self._qos2_receiving:
            self._qos2_mid = mid  # sent by ack(), once the logger committed what it produced
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._send_pubrec(mid)

    def ack(self, mid: int, qos: int):
        if qos == 2 and self._manual_ack:
            return self._send_pubrec(mid)
        return super().ack(mid, qos)

    def ack_many(self, acks: collections.abc.Iterable[tuple[int, int]]) -> None:
        """``ack`` each (mid, qos), the PUBACKs of a run of QoS 1 messages in one
        write: paho queues and writes each packet by itself, a syscall per message."""
        pubacks = bytearray()
        for mid, qos in acks:
            if qos == 1 and self._manual_ack:
                pubacks += _PUBACK.pack(PUBACK_COMMAND, 2, mid)
                continue
            if pubacks:
                self._packet_queue(PUBACK_COMMAND, bytes(pubacks), 0, 0)
                pubacks = bytearray()
            self.ack(mid, qos)
        if pubacks:
            self._packet_queue(PUBACK_COMMAND, bytes(pubacks), 0, 0)

    def _handle_pubrel(self):
        rc = super()._handle_pubrel()  # finds nothing stored: delivered on PUBLISH already
        if not self._manual_ack:
            return rc
        mid = _packet.decode_pubrel(self._in_packet["command"], self._in_packet["packet"], self._protocol).mid
        return self._send_pubcomp(mid)

    # -- keepalive while paused

    def ping_while_paused(self) -> None:
        """Keep the broker from dropping a session we do not read from: a
        PINGREQ, whose answer waits unread; paho must not count it as missing."""
        self._send_pingreq()
        self._ping_t = 0


class _Published:
    """A received message as the fast path hands it over: what ``mqtt.MQTTMessage``
    offers a handler, without the MQTTMessageInfo (a lock and a condition) that
    paho builds for each received message and that receiving never uses."""

    __slots__ = ("mid", "_topic", "payload", "qos", "dup", "retain", "timestamp", "properties", "state")

    def __init__(self, mid: int, topic: bytes, payload: bytes, qos: int, dup: bool, retain: bool,
                 timestamp: float):
        self.mid, self._topic, self.payload, self.qos = mid, topic, payload, qos
        self.dup, self.retain, self.timestamp = dup, retain, timestamp
        self.properties = None
        self.state = 0

    @property
    def topic(self) -> str:
        return self._topic.decode("utf-8")  # raises on invalid UTF-8, as paho's does


class _Giant:
    """An oversized PUBLISH read and dropped as it arrives: keeps its topic,
    packet id and first bytes, to hand paho a small stand-in."""

    def __init__(self, body_size: int, qos: int, v5: bool, sample_bytes: int):
        self.left = body_size
        self.body_size = body_size
        self.qos = qos
        self.v5 = v5
        self.sample_bytes = sample_bytes
        self.head = bytearray()  # topic length, topic, packet id, property length
        self.header_size: int | None = None  # bytes before the payload, once known
        self.sample = bytearray()
        self.seen = 0

    def take(self, data: bytes) -> None:
        self.left -= len(data)
        if self.header_size is None:
            self.head += data[:max(0, 65535 + 2 + 2 + 4 - len(self.head))]
            self.header_size = self._header_size()
        if self.header_size is not None:
            start = max(0, self.header_size - self.seen)
            room = self.sample_bytes - len(self.sample)
            if room > 0 and start < len(data):
                self.sample += data[start:start + room]
        self.seen += len(data)

    def _header_size(self) -> int | None:
        head = self.head
        if len(head) < 2:
            return None
        size = 2 + int.from_bytes(head[:2], "big") + (2 if self.qos else 0)
        if not self.v5:
            return size if len(head) >= size else None
        # MQTT 5: a variable-length property length follows; the properties are skipped.
        length, multiplier = 0, 1
        for i in range(4):
            if len(head) <= size + i:
                return None
            byte = head[size + i]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                return size + i + 1 + length
        raise ConnectionError("the broker sent a malformed PUBLISH (property length)")

    @property
    def payload_size(self) -> int:
        return self.body_size - (self.header_size or self.body_size)

    def stand_in(self) -> bytes:
        if self.header_size is None or self.header_size > self.body_size:
            raise ConnectionError("the broker sent a malformed PUBLISH (header larger than the packet)")
        topic_end = 2 + int.from_bytes(self.head[:2], "big")
        keep = topic_end + (2 if self.qos else 0)
        return bytes(self.head[:keep]) + (b"\x00" if self.v5 else b"") + bytes(self.sample)


def new_client(c: ConnectionSettings, settings: config.Settings, *, clean_session: bool,
               manual_ack: bool) -> ReadAheadClient:
    """A paho client for these settings: protocol, credentials, TLS, timeout."""
    # A packet larger than this is never assembled in memory (see ReadAheadClient).
    max_packet = settings.max_payload + MAX_PUBLISH_HEADER
    if c.mqtt_protocol == "5":
        # MQTT 5 has no clean_session here: clean_start and the session expiry go with connect().
        client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id=c.effective_client_id,
                                 protocol=mqtt.MQTTv5, reconnect_on_failure=False, manual_ack=manual_ack,
                                 max_packet=max_packet)
    else:
        client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id=c.effective_client_id,
                                 clean_session=clean_session, protocol=mqtt.MQTTv311,
                                 reconnect_on_failure=False, manual_ack=manual_ack, max_packet=max_packet)
    if c.username is not None:
        client.username_pw_set(c.username, c.password)
    if c.use_tls:
        client.tls_set(ca_certs=c.tls_ca_path or None, cert_reqs=ssl.CERT_REQUIRED)
    client.connect_timeout = settings.connect_timeout
    return client


class ConnectionChild:
    def __init__(self, settings: config.Settings, conn: ConnectionSettings, keys: curve.Keys | None = None):
        self.settings = settings
        self.conn = conn
        self.where = f"{conn.broker_host}:{conn.broker_port}"
        self.context = zmq.Context(io_threads=1)
        self.events = EventSender(self.context, settings.events_endpoint, f"conn:{conn.connection_id}",
                                  resend_after=settings.resend_after, curve=keys)
        self.manual_ack = settings.broker_acks == "after-commit"
        self.setup_error = self._set_up()
        # The file shared with the monitor (attempt rate, fence); none when run alone.
        self.shared = runfile.RunState.attach(conn.state_fd) if conn.state_fd is not None else None
        self.slot_at: float | None = None  # the booked attempt slot (monotonic)
        self.fence_until = 0.0  # runfile.clock(); read again only once passed (it only grows)
        self.stall_after = conn.stall_seconds(settings.stall_after)
        self.status = ChildStatus.DISCONNECTED
        self.failures = 0  # failed attempts in a row
        self.rejections = 0  # of which rejections that retrying will not fix
        self.next_attempt_at = 0.0  # monotonic
        self.connack_deadline: float | None = None
        self.last_traffic = time.monotonic()  # last message received, or connection made
        self.read_not_before = 0.0  # monotonic; a stream is read no sooner (READ_PACE)
        self.drop_reason: str | None = None  # why we are closing a live connection ourselves
        self.connected_at = 0.0
        #: (last event seq, mid, qos) of received messages not yet acknowledged to the broker
        self.broker_acks: collections.deque[tuple[int, int, int]] = collections.deque()
        self.quick_losses = 0  # connections in a row the broker closed soon after they were made
        self.paused_at: float | None = None  # since when backpressure holds reading (monotonic)
        self.pause_reported = False
        self.paused_ping_at = 0.0
        self.stopping = False
        self.stop_message = ""  # why we disconnect when we stop ("" = asked to)
        self.exit_code = exitcodes.OK

    def _set_up(self) -> str | None:
        """Make the parser and the paho client, or say why these settings cannot run.

        Whatever set-up raises (paho's Client, username_pw_set, tls_set...) is
        the settings' fault: it becomes the connection's reason and exit code
        CONFIG, never an unhandled exception that would restart it in a loop.
        """
        problems = self.conn.problems()
        if problems:
            reason = "cannot start: " + "; ".join(problems)
        else:
            try:
                self.parser = parsers.get(self.conn.parser_name)
                self.client = self._make_client()
                return None
            except Exception as exc:
                reason = f"cannot set up the MQTT client: {self._plain(exc)}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # never connects: run() reports and exits
        return reason

    def _plain(self, exc: BaseException) -> str:
        """An exception that is the settings' fault, in words, without the credentials."""
        kind = type(exc).__qualname__
        if type(exc).__module__ != "builtins":
            kind = f"{type(exc).__module__}.{kind}"  # struct.error, not a bare "error"
        return self.conn.redact(f"{kind}: {exc}")[:500]

    def _make_client(self) -> mqtt.Client:
        client = new_client(self.conn, self.settings, clean_session=self.conn.clean_session,
                            manual_ack=self.manual_ack)
        client.enable_logger(logging.getLogger("paho.mqtt"))  # routed into loguru
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    # -- the state machine: every change of status goes through here

    def transition(self, status: str, message: str, exc: BaseException | None = None,
                   retry_attempt: int | None = None, next_retry_at: float | None = None,
                   gave_up: bool = False) -> None:
        # Allowed moves: services.states.CHILD_TRANSITIONS.
        new = ChildStatus(status)
        if new not in CHILD_TRANSITIONS[self.status]:
            raise IllegalTransition(f"connection {self.conn.connection_id}: {self.status.value} -> {new.value}")
        self.status = new
        self.events.send(StatusChange(
            connection_id=self.conn.connection_id, status=status, message=message,
            broker_host=self.conn.broker_host,
            exception_type=type(exc).__name__ if exc is not None else "",
            traceback=self.conn.redact("".join(traceback.format_exception(exc))) if exc is not None else "",
            retry_attempt=retry_attempt, next_retry_at=next_retry_at, gave_up=gave_up, epoch=self.conn.epoch))
        # An empty message is a stop we were asked for (the logger stores "Disconnected cleanly").
        logger.info("connection {} {}: {}", self.conn.connection_id, status, message or "cleanly, as asked")

    def _attempt(self) -> None:
        if self._past_fence():
            return
        if self.shared is not None:
            # Take a turn in the monitor-wide attempt rate before connecting.
            if self.slot_at is None:
                self.slot_at = self.shared.reserve_attempt(self.settings.connect_rate)
            if time.monotonic() < self.slot_at:
                self.next_attempt_at = self.slot_at
                return
            self.slot_at = None
        attempt = self.failures + 1
        self.transition("connecting", f"Connecting to {self.where} (attempt {attempt})",
                        retry_attempt=attempt)
        try:
            if self.conn.mqtt_protocol == "5":
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = 0 if self.conn.clean_session else SESSION_EXPIRY
                self.client.connect(self.conn.broker_host, self.conn.broker_port, self.conn.keepalive,
                                    clean_start=self.conn.clean_session, properties=properties)
            else:
                self.client.connect(self.conn.broker_host, self.conn.broker_port, self.conn.keepalive)
        except OSError as exc:  # network trouble (ssl.SSLError and socket errors are OSErrors): retry
            self._failed(describe_exception(exc), exc, rejected=is_rejection(exc))
            return
        except Exception as exc:  # paho cannot even build the CONNECT: the settings' fault
            self._unusable(f"cannot connect with these settings: {self._plain(exc)}", exc)
            return
        self.connack_deadline = time.monotonic() + self.settings.connect_timeout

    def _unusable(self, reason: str, exc: BaseException | None = None) -> None:
        """These settings cannot work: say why and exit with exitcodes.CONFIG, so
        that the monitor leaves the connection stopped until its row changes."""
        self.connack_deadline = None
        self.transition("error", reason, exc)
        self.exit_code = exitcodes.CONFIG
        self.stopping = True

    def _failed(self, reason: str, exc: BaseException | None = None, rejected: bool = False) -> None:
        """An attempt failed: schedule the next one, or give up into the cool-down.

        Network trouble backs off up to SITELINK_MAX_RETRIES attempts; a
        rejection that retrying will not fix (credentials, authorisation, TLS
        certificate, client id) gives up after SITELINK_MAX_REJECTIONS.
        """
        self.connack_deadline = None
        self.failures += 1
        self.rejections = self.rejections + 1 if rejected else 0
        if self.failures >= self.settings.max_retries or self.rejections >= self.settings.max_rejections:
            resume_at = time.time() + self.settings.retry_cooldown
            why = (f"rejected {self.rejections} times in a row" if self.rejections >= self.settings.max_rejections
                   else f"{self.failures} failed attempts in a row")
            self.transition(
                "error", f"{reason}; giving up after {why}, "
                         f"next start in {self.settings.retry_cooldown:.0f} s unless the row changes",
                exc, retry_attempt=self.failures, next_retry_at=resume_at, gave_up=True)
            self.exit_code = exitcodes.GAVE_UP
            self.stopping = True
            return
        wait = backoff.delay(self.failures, self.settings.retry_base, self.settings.retry_cap)
        self.next_attempt_at = time.monotonic() + wait
        self.transition("error", reason, exc, retry_attempt=self.failures,
                        next_retry_at=time.time() + wait)

    # -- paho callbacks (called from loop_read/loop_misc in our own loop)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.connack_deadline = None
            plain = REJECTIONS.get(reason_code.value)
            if plain is not None:
                self._failed(f"{plain} ({reason_code})", rejected=True)
            else:
                self._failed(f"the broker refused the connection: {reason_code}")
            return
        # "connected" means data flows: it is reported once the broker has
        # answered the subscription (SUBACK), within the same deadline.
        try:
            client.subscribe([(topic, self.conn.qos) for topic in self.conn.topics])
        except Exception as exc:  # paho cannot build the SUBSCRIBE: the topics' fault
            self._unusable(f"cannot subscribe to these topics: {self._plain(exc)}", exc)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        # Message ids belong to the connection that ended: the broker sends
        # those messages again on the next one (persistent session).
        self.broker_acks.clear()
        if self.status == "connected":
            if self.stopping:
                self.transition("disconnected", self.stop_message)
                return
            if self.drop_reason is not None:
                reason, self.drop_reason = self.drop_reason, None
                self.next_attempt_at = time.monotonic()  # we dropped it: reconnect at once
            else:
                reason = self._loss_reason(reason_code)
                self.next_attempt_at = time.monotonic() + backoff.delay(
                    1, self.settings.retry_base, self.settings.retry_cap)
            self.transition("disconnected", reason)
        elif self.status == "connecting" and self.connack_deadline is not None:
            self._failed(f"the broker closed the connection before accepting it ({reason_code})")

    def _loss_reason(self, reason_code) -> str:
        """Why a live connection ended, recognising a client-id clash.

        An MQTT 5 broker may say so (reason 0x8E); others, Mosquitto 2.0
        among them, just close the old connection when another client
        connects with the same client id. Connections that the broker closes
        again and again soon after they are made are the sign of that.
        """
        clash = (f"another client with the same client id ({self.conn.effective_client_id}) "
                 f"took over the session")
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            return clash
        if time.monotonic() - self.connected_at < QUICK_LOSS_WINDOW:
            self.quick_losses += 1
        else:
            self.quick_losses = 1
        reason = f"connection lost ({reason_code})"
        if self.quick_losses >= QUICK_LOSSES_FOR_CLASH:
            reason += (f"; the broker closed it {self.quick_losses} times in a row soon after it was made: "
                       f"probably {clash}")
        return reason

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if self.status == "connecting":
            self.connack_deadline = None
            self.failures = self.rejections = 0
            _bound_unacknowledged_sends(client.socket(), self.conn.keepalive * 1.5 + self.conn.ping_seconds)
            self.last_traffic = self.connected_at = time.monotonic()
            self.transition("connected", f"Successfully connected to {self.where}")
        for topic, code in zip(self.conn.topics, reason_codes):
            if code.is_failure:
                self.events.send(ConnectionLog(
                    connection_id=self.conn.connection_id, level="WARNING",
                    message=f"the broker refused the subscription to {topic!r}: {code}",
                    broker_host=self.conn.broker_host))

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self.last_traffic = time.monotonic()
        try:
            self._report(message)
        except Exception as exc:  # whatever a message holds, it never stops the connection
            self._fail(message, _topic(message)[0], "UNKNOWN_ERROR",
                       f"the message could not be handled: {type(exc).__name__}: {exc}", exc)
        if message.qos > 0 and self.manual_ack:
            # Acknowledged to the broker only once the logger has committed
            # what it produced: until then the broker keeps it for us.
            self.broker_acks.append((self.events.last_seq, message.mid, message.qos))
            self._ack_committed()

    def _report(self, message: mqtt.MQTTMessage) -> None:
        """Turn one message into events: data, or one parsing-log row saying why not."""
        topic, topic_ok = _topic(message)
        payload = message.payload
        oversized = self.client.take_oversized()
        if oversized is not None or len(payload) > self.settings.max_payload:
            size = oversized if oversized is not None else len(payload)
            self._fail(message, topic, "VALIDATION_ERROR",
                       f"payload of {size} bytes exceeds the limit of {self.settings.max_payload} bytes "
                       f"(SITELINK_MAX_PAYLOAD); its beginning is kept as the sample", payload_bytes=size)
            return
        if not topic_ok:  # replay could not give it its topic back
            self._fail(message, topic, "PARSE_ERROR", "the topic is not UTF-8 (shown with \\x escapes)",
                       replayable=False)
            return
        try:
            records = parsers.parse_message(self.parser, payload, topic)
        except Exception as exc:  # a parser's bug must not stop the connection
            error_type = parsers.classify(exc)
            self._fail(message, topic, error_type, str(exc), exc)
            return
        for record in records:
            try:
                self.events.send_data(self.conn.connection_id, topic, record.gateway, record.datalogger,
                                      record.ts, record.sensors, defer=True)
            except EventTooLarge as exc:
                self._fail(message, topic, "VALIDATION_ERROR", f"the message's data cannot be stored: {exc}")
                return

    def _fail(self, message: mqtt.MQTTMessage, topic: str, error_type: str, error_message: str,
              exc: BaseException | None = None, payload_bytes: int | None = None, replayable: bool = True) -> None:
        """One parsing-log row for ``message``, and its payload for the quarantine: whole
        when it is all here and one frame can carry it (so that a fixed parser can
        store it: ``admin replay``), else its beginning."""
        payload = message.payload
        whole = replayable and payload_bytes is None and len(payload) <= protocol.MAX_WHOLE_PAYLOAD_BYTES
        if not whole:
            if payload_bytes is None and len(payload) > protocol.MAX_PAYLOAD_SAMPLE_BYTES:
                payload_bytes = len(payload)
            payload = payload[:protocol.MAX_PAYLOAD_SAMPLE_BYTES]
        failure = ParseFailure(
            connection_id=self.conn.connection_id, topic=limits.cut(topic, limits.MAX_MQTT_STRING_BYTES),
            parser_name=self.conn.parser_name, error_type=error_type,
            error_message=limits.cut(error_message), payload=bytes(payload), payload_bytes=payload_bytes,
            replayable=whole, exception_type=type(exc).__name__ if exc is not None else "",
            traceback=limits.cut("".join(traceback.format_exception(exc)), limits.MAX_TRACEBACK_CHARS)
            if exc is not None and error_type == "UNKNOWN_ERROR" else "")
        try:
            self.events.send(failure, defer=True)
        except EventTooLarge:  # cannot happen within the protocol's limits; if it does, the sample goes
            if not whole:
                raise
            self.events.send(dataclasses.replace(
                failure, payload=failure.payload[:protocol.MAX_PAYLOAD_SAMPLE_BYTES],
                payload_bytes=len(failure.payload) if len(failure.payload) > protocol.MAX_PAYLOAD_SAMPLE_BYTES
                else None, replayable=False), defer=True)

    def _ack_committed(self) -> None:
        """PUBACK (or PUBCOMP) every message whose events the logger committed."""
        committed = self.events.acked
        done = []
        while self.broker_acks and self.broker_acks[0][0] <= committed:
            _, mid, qos = self.broker_acks.popleft()
            done.append((mid, qos))
        if done:
            self.client.ack_many(done)

    @property
    def paused(self) -> bool:
        """At the limit of events (or bytes) the logger has not committed: read nothing more."""
        return (self.events.unacked >= self.settings.max_unacked
                or self.events.unacked_bytes >= self.settings.max_unacked_bytes)

    def _while_paused(self, paused: bool) -> None:
        """Backpressure that says so, and a session that stays alive meanwhile.

        A child that reads nothing sees no PINGRESP: it still sends PINGREQs
        (the broker keeps the session) and relies on TCP_USER_TIMEOUT (set on
        connect) to notice a dead path. A pause longer than
        PAUSE_REPORT_AFTER is reported (``paused_since`` in the row, ``paused``
        on the feed), and so is its end.
        """
        now = time.monotonic()
        if not paused:
            if self.pause_reported:
                self.events.send(Flow(connection_id=self.conn.connection_id, paused=False, epoch=self.conn.epoch))
            self.paused_at, self.pause_reported = None, False
            return
        if self.paused_at is None:
            self.paused_at = now
        if self.status != "connected" or self.client.socket() is None:
            return
        if not self.pause_reported and now - self.paused_at >= PAUSE_REPORT_AFTER:
            self.pause_reported = True
            self.events.send(Flow(connection_id=self.conn.connection_id, paused=True,
                                  unacked=self.events.unacked, epoch=self.conn.epoch))
            logger.warning("connection {} paused: the logger has not stored {} events ({} bytes)",
                           self.conn.connection_id, self.events.unacked, self.events.unacked_bytes)
        if now - self.paused_ping_at >= self.conn.keepalive / 2:
            self.paused_ping_at = now
            self.client.ping_while_paused()
        error = self.client.socket().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._drop(f"the path to the broker is dead ({os.strerror(error)}) while paused")

    # -- the loop

    def run(self) -> int:
        if self.setup_error is not None:
            self.transition("error", self.setup_error)
            self.events.flush(self.settings.ack_linger)
            self.events.close()
            self.context.term()
            return exitcodes.CONFIG
        if self.conn.reset_session and not self.conn.clean_session:
            self._reset_session()
        signals = SignalPipe(signal.SIGTERM, signal.SIGINT)
        self.poller = zmq.Poller()
        self.poller.register(signals.fileno(), zmq.POLLIN)
        self.poller.register(self.events.socket, zmq.POLLIN)
        self._watched = None
        try:
            while not self.stopping:
                if signals.drain() & {signal.SIGTERM, signal.SIGINT}:
                    break
                self._step(signals)
            self._stop(signals)
        finally:
            signals.close()
            if self.shared is not None:
                self.shared.close()
            self.events.close()
            self.context.term()
        return self.exit_code

    def _reset_session(self) -> None:
        """Drop the broker's stored session (its old subscriptions) once, before
        the persistent one starts: done when the topics changed, since MQTT
        cannot list a session's subscriptions to remove the stale ones."""
        c = self.conn
        done: list[bool] = []
        try:
            client = new_client(c, self.settings, clean_session=True, manual_ack=False)
            client.on_connect = lambda *args: done.append(True)
            if c.mqtt_protocol == "5":
                client.connect(c.broker_host, c.broker_port, c.keepalive, clean_start=True)
            else:
                client.connect(c.broker_host, c.broker_port, c.keepalive)
            deadline = time.monotonic() + self.settings.connect_timeout
            while not done and time.monotonic() < deadline and client.socket() is not None:
                client.loop(0.1)
            client.disconnect()
        except Exception as exc:  # best effort: the persistent connect below reports what matters
            logger.info("connection {}: could not reset the old session ({}); the first connect will",
                        c.connection_id, self._plain(exc))

    def _past_fence(self) -> bool:
        """Whether our monitor's claim may no longer be trusted; then stop, before
        another monitor may start a client for this site."""
        if self.shared is None:
            return False
        now = runfile.clock()
        if now < self.fence_until:
            return False
        self.fence_until = self.shared.fence()
        if now < self.fence_until:
            return False
        if not self.stopping:
            logger.warning("connection {}: its monitor's lease ended (fence passed); disconnecting",
                           self.conn.connection_id)
            self.stop_message = "its monitor's lease on this connection ended; another monitor may take it over"
            self.exit_code = exitcodes.FENCED
            self.stopping = True
        return True

    def _step(self, signals: SignalPipe) -> None:
        if self._past_fence():
            return
        now = time.monotonic()
        if self.status in ("disconnected", "error") and now >= self.next_attempt_at:
            self._attempt()
            if self.stopping:
                return
        timeout = self._timers_due_in(now)
        if self.shared is not None:
            timeout = min(timeout, max(0.0, self.fence_until - runfile.clock()))  # wake at the fence
        if self.status in ("disconnected", "error"):
            timeout = min(timeout, max(0.0, self.next_attempt_at - time.monotonic()))
        timeout = self.events.bound(timeout)
        sock = self.client.socket()
        paused = self.paused
        buffered = sock is not None and not paused and self.client.buffered
        # Under half of poll's millisecond left: read now rather than wake for it.
        pacing = sock is not None and self.read_not_before - now > 0.0005
        if buffered:
            timeout = 0.0  # packets already read wait for paho: no sleeping
        elif pacing:
            timeout = min(timeout, self.read_not_before - now)
        self._watch(sock, (0 if paused or pacing or sock is None else zmq.POLLIN)
                    | (zmq.POLLOUT if sock is not None and self.client.want_write() else 0))
        ready = dict(self.poller.poll(timeout * 1000))
        if sock is not None:
            if buffered or (ready.get(sock, 0) | ready.get(sock.fileno(), 0)) & zmq.POLLIN:
                self._read_burst(sock)
            if self.client.socket() is not None and self.client.want_write():
                self.client.loop_write()
            if self.client.socket() is not None and not paused:
                # While paused nothing is read, so no PINGRESP either: no pings then.
                self.client.loop_misc()
        self.events.flush_deferred()
        if ready.get(self.events.socket):
            self.events.receive_acks()
            self._ack_committed()
            if self.client.socket() is not None and self.client.want_write():
                self.client.loop_write()
        if paused:
            self.last_traffic = time.monotonic()  # our own silence is no stall
        self._while_paused(paused)
        if (self.status == "connecting" and self.connack_deadline is not None
                and time.monotonic() > self.connack_deadline):
            self.connack_deadline = None  # counted here, not again by the disconnect callback
            self.client.disconnect()
            self._failed(f"no answer (CONNACK/SUBACK) from the broker within {self.settings.connect_timeout:g} s")
        if self.status == "connected" and not paused:
            self._check_liveness()

    def _watch(self, sock, flags: int) -> None:
        """Keep the MQTT socket registered in the poller with ``flags``."""
        if self._watched is not None and (self._watched is not sock or not flags):
            self.poller.unregister(self._watched)
            self._watched = None
        if sock is not None and flags:
            self.poller.register(sock, flags)  # registering again updates the flags
            self._watched = sock

    def _read_burst(self, sock) -> None:
        """Read what the socket holds, up to READ_BURST packets, before polling again.

        paho reads one packet per loop_read(); polling between each would cost
        more than the packet itself under load.
        """
        ready = select.poll()
        ready.register(sock.fileno(), select.POLLIN)
        fast = getattr(self.client, "read_publishes", None)
        paused = lambda: self.paused  # noqa: E731
        budget = READ_BURST
        while budget > 0:
            if fast is not None:
                handled = fast(paused, budget)
                if handled:
                    budget -= handled
                    if self.client.socket() is not sock or self.paused or budget <= 0:
                        return
            budget -= 1
            self.client.loop_read()
            current = self.client.socket()
            if current is not sock or self.paused:
                return
            if self.client.buffered:
                continue
            pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes
            if not (pending is not None and pending()) and not ready.poll(0):
                if READ_BURST - budget >= PACE_FROM:
                    self.read_not_before = time.monotonic() + READ_PACE
                return

    def _timers_due_in(self, now: float) -> float:
        """Seconds until the first of this child's own timers is due (at most TICK):
        the CONNACK deadline, paho's keepalive ping (``loop_misc``), the ping's
        answer and the stall check (``_check_liveness``); paused, every second
        (``_while_paused``). The fence, the next attempt and the resends are
        added by the caller."""
        if self.paused_at is not None:
            return 1.0
        due = now + TICK
        client = self.client
        if self.status == "connecting" and self.connack_deadline is not None:
            due = min(due, self.connack_deadline)
        if self.status == "connected" and client.socket() is not None:
            keepalive = client._keepalive  # noqa: SLF001 (tests/test_limits.py checks these exist)
            if keepalive:
                # paho pings once keepalive s passed without a packet out or a byte in.
                due = min(due, min(client._last_msg_out, client._last_bytes_received) + keepalive)  # noqa: SLF001
            if client._ping_t:  # noqa: SLF001
                due = min(due, client._ping_t + min(self.conn.ping_seconds, keepalive or self.conn.ping_seconds))
            if self.stall_after is not None:
                due = min(due, self.last_traffic + self.stall_after)
        return max(0.0, due - now) + TIMER_SLACK

    def _check_liveness(self) -> None:
        """Notice a dead path (no PINGRESP) and a silent stall (no message for too long)."""
        now = time.monotonic()
        # paho records when it sent a PINGREQ still unanswered (0 when none);
        # it would wait a whole keepalive more, we wait ping_timeout.
        ping_sent = getattr(self.client, "_ping_t", 0)
        if ping_sent and now - ping_sent > self.conn.ping_seconds:
            self._drop(f"no answer to a ping within {self.conn.ping_seconds:g} s: "
                       f"the broker or the network path to it is dead")
        elif self.stall_after is not None and now - self.last_traffic > self.stall_after:
            message = (f"connected but received nothing for {self.stall_after:g} s; "
                       f"reconnecting and subscribing again")
            self.events.send(ConnectionLog(connection_id=self.conn.connection_id, level="WARNING",
                                           message=message, broker_host=self.conn.broker_host))
            self._drop(f"stalled: {message}")

    def _drop(self, reason: str) -> None:
        """Close a live connection ourselves; it reconnects at once."""
        self.drop_reason = reason
        self.client.disconnect()
        if self.client.socket() is not None and self.client.want_write():
            self.client.loop_write()
        if self.status == "connected":
            # A dead peer never completes the close: do it ourselves.
            self.client._sock_close()  # noqa: SLF001 (paho has no public abort)
            self._on_disconnect(self.client, None, None, None, None)

    def _stop(self, signals: SignalPipe) -> None:
        self.stopping = True
        if self.status == "connected":
            self.client.disconnect()
            deadline = time.monotonic() + 2.0
            while self.client.socket() is not None and time.monotonic() < deadline:
                self.client.loop_write()
                self.client.loop_read()
                if self.client.socket() is not None and not self.client.want_write():
                    break
            if self.status == "connected":
                self.transition("disconnected", self.stop_message)
        elif self.status != "disconnected" and self.exit_code not in (exitcodes.GAVE_UP, exitcodes.CONFIG):
            self.client.disconnect()
            self.transition("disconnected", self.stop_message)
        if not self.events.flush(self.settings.ack_linger):
            logger.warning("connection {}: stopping with {} events not acknowledged by the logger",
                           self.conn.connection_id, self.events.unacked)


def _topic(message: mqtt.MQTTMessage) -> tuple[str, bool]:
    """The message's topic as text, and whether it was valid UTF-8 (a broker
    may send anything; paho's ``message.topic`` raises then)."""
    raw = message._topic  # noqa: SLF001 (paho keeps the bytes there; .topic is a strict decode)
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="backslashreplace"), False


def _bound_unacknowledged_sends(sock, seconds: float) -> None:
    """TCP_USER_TIMEOUT: the kernel closes the connection when what we sent
    stays unacknowledged this long (a dead path, noticed even while paused)."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is None or option is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, int(seconds * 1000))
    except OSError:
        pass


def load_settings_from_db(settings: config.Settings, connection_id: int) -> ConnectionSettings:
    from shared import db  # here only: the zygote and its children never load psycopg and libpq

    database = db.Database(settings.database_url, f"sitelink-connection-{connection_id}")
    try:
        with database.transaction() as s:
            row = s.one("connection_settings", {"ids": [connection_id]})
    finally:
        database.close()
    if row is None:
        raise SystemExit(f"sitelink connection: no mqtt_connection with id {connection_id}")
    return ConnectionSettings.from_mapping(row)


def run_child(settings: config.Settings, conn: ConnectionSettings, keys: curve.Keys | None = None,
              logs_ready: bool = False) -> int:
    """Run one connection until it is told to stop; return the exit code.

    Shared by the zygote's forked children (whose logs the zygote set up:
    ``logs_ready``) and by ``main`` below.
    """
    process.set_title(f"sitelink: conn {conn.connection_id} {conn.site_name}".rstrip(),
                      f"sitelink-c{conn.connection_id}")
    if conn.monitor_pid and not process.die_with(conn.monitor_pid, signal.SIGTERM):
        return exitcodes.ORPHANED  # the monitor is gone: never run unsupervised
    if logs_ready:
        logs.rename(f"conn-{conn.connection_id}")
    else:
        logs.setup(f"conn-{conn.connection_id}", settings.log_level)
    if keys is None:
        keys = curve.for_client(settings.events_endpoint, settings.runtime_dir)
    return ConnectionChild(settings, conn, keys).run()  # unusable settings: status error, exit code CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.connection", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--settings-stdin", action="store_true",
                        help="read the settings the monitor writes to stdin (msgpack)")
    source.add_argument("--connection-id", type=int, help="load connection ID's settings from the database")
    args = parser.parse_args(argv)
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"sitelink connection: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    if args.settings_stdin:
        try:
            conn = protocol.decode_settings(sys.stdin.buffer.read(), ConnectionSettings)
        except protocol.ProtocolError as exc:
            print(f"sitelink connection: {exc}", file=sys.stderr)
            return exitcodes.CONFIG
    else:
        conn = load_settings_from_db(settings, args.connection_id)
    return run_child(settings, conn)


if __name__ == "__main__":
    sys.exit(main())
