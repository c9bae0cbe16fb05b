"""A child: one MQTT connection, for one site.

Started by the monitor, which writes the connection's settings (password
included) to the child's stdin: never argv, never the environment. For
debugging, run one alone; it then reads its settings from the database:

    python -m services.connection --connection-id 7

It connects with paho-mqtt (v2 callback API) in a single-threaded loop that
polls the MQTT socket, the logger's acks and a signal pipe together; it
subscribes, parses each message with the connection's parser and sends data
and parse errors to the logger. Its life is one state machine (``transition``)
that reports every change. Retries back off exponentially with jitter; after
``SITELINK_MAX_RETRIES`` failures in a row it reports that it gives up and
exits with ``exitcodes.GAVE_UP``, and the monitor leaves it stopped until the
cool-down (``mqtt_next_retry``) has passed.
"""

from __future__ import annotations

import argparse
import collections
import logging
import select
import signal
import ssl
import sys
import time
import traceback

import paho.mqtt.client as mqtt
import zmq
from loguru import logger
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared import backoff, config, db, exitcodes, logs, parsers, process, protocol
from shared.attempts import AttemptSlots
from shared.connections import ConnectionSettings
from shared.events import EventSender
from shared.protocol import ConnectionLog, Data, ParseFailure, StatusChange
from shared.signals import SignalPipe

#: How often the loop wakes at the least, for keepalive pings and timers.
TICK = 1.0
#: Most MQTT packets read in one go before the loop polls again.
READ_BURST = 500
#: How long an MQTT 5 broker keeps our session while we are away.
SESSION_EXPIRY = 7 * 24 * 3600

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


class ReadAheadClient(mqtt.Client):
    """paho reads each packet with two or three recv() calls of a few bytes;
    this serves them from one large read, a syscall per burst, not per call."""

    READ_SIZE = 64 * 1024  # a burst's worth; each read is a new bytes object

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ahead = b""
        self._ahead_at = 0

    @property
    def buffered(self) -> bool:
        """Bytes already read from the socket that paho has not consumed yet."""
        return self._ahead_at < len(self._ahead)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._ahead_at >= len(self._ahead):
            chunk = super()._sock_recv(self.READ_SIZE)
            if not chunk:
                return chunk  # the peer closed the connection
            self._ahead, self._ahead_at = chunk, 0
        data = self._ahead[self._ahead_at:self._ahead_at + bufsize]
        self._ahead_at += len(data)
        return data

    def _sock_close(self) -> None:
        self._ahead, self._ahead_at = b"", 0
        super()._sock_close()


def new_client(c: ConnectionSettings, settings: config.Settings, *, clean_session: bool,
               manual_ack: bool) -> ReadAheadClient:
    """A paho client for these settings: protocol, credentials, TLS, timeout."""
    if c.mqtt_protocol == "5":
        # MQTT 5 has no clean_session here: clean_start and the session expiry go with connect().
        client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id=c.effective_client_id,
                                 protocol=mqtt.MQTTv5, reconnect_on_failure=False, manual_ack=manual_ack)
    else:
        client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id=c.effective_client_id,
                                 clean_session=clean_session, protocol=mqtt.MQTTv311,
                                 reconnect_on_failure=False, manual_ack=manual_ack)
    if c.username is not None:
        client.username_pw_set(c.username, c.password)
    if c.use_tls:
        client.tls_set(ca_certs=c.tls_ca_path or None, cert_reqs=ssl.CERT_REQUIRED)
    client.connect_timeout = settings.connect_timeout
    return client


class ConnectionChild:
    def __init__(self, settings: config.Settings, conn: ConnectionSettings):
        self.settings = settings
        self.conn = conn
        self.where = f"{conn.broker_host}:{conn.broker_port}"
        self.context = zmq.Context(io_threads=1)
        self.events = EventSender(self.context, settings.events_endpoint, f"conn:{conn.connection_id}",
                                  resend_after=settings.resend_after)
        self.manual_ack = settings.broker_acks == "after-commit"
        self.setup_error = self._set_up()
        self.slots = AttemptSlots(conn.attempt_slots, settings.connect_rate) if conn.attempt_slots else None
        self.slot_at: float | None = None  # the booked attempt slot (monotonic)
        self.stall_after = conn.stall_seconds(settings.stall_after)
        self.status = "disconnected"
        self.failures = 0  # failed attempts in a row
        self.rejections = 0  # of which rejections that retrying will not fix
        self.next_attempt_at = 0.0  # monotonic
        self.connack_deadline: float | None = None
        self.last_traffic = time.monotonic()  # last message received, or connection made
        self.drop_reason: str | None = None  # why we are closing a live connection ourselves
        self.connected_at = 0.0
        #: (last event seq, mid, qos) of received messages not yet acknowledged to the broker
        self.broker_acks: collections.deque[tuple[int, int, int]] = collections.deque()
        self.quick_losses = 0  # connections in a row the broker closed soon after they were made
        self.stopping = False
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
        # disconnected -> connecting -> connected -> disconnected
        #                     |                          |
        #                     +-> error -> connecting    +-> connecting (retry)
        self.status = status
        self.events.send(StatusChange(
            connection_id=self.conn.connection_id, status=status, message=message,
            broker_host=self.conn.broker_host,
            exception_type=type(exc).__name__ if exc is not None else "",
            traceback=self.conn.redact("".join(traceback.format_exception(exc))) if exc is not None else "",
            retry_attempt=retry_attempt, next_retry_at=next_retry_at, gave_up=gave_up))
        logger.info("connection {} {}: {}", self.conn.connection_id, status, message)

    def _attempt(self) -> None:
        if self.slots is not None:
            # Take a turn in the monitor-wide attempt rate before connecting.
            if self.slot_at is None:
                self.slot_at = self.slots.reserve()
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
                self.transition("disconnected", "")
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
        self._report(message)
        if message.qos > 0 and self.manual_ack:
            # Acknowledged to the broker only once the logger has committed
            # what it produced: until then the broker keeps it for us.
            self.broker_acks.append((self.events.last_seq, message.mid, message.qos))
            self._ack_committed()

    def _report(self, message: mqtt.MQTTMessage) -> None:
        payload = message.payload
        try:
            records = self.parser(payload, message.topic)
        except Exception as exc:  # a parser's bug must not stop the connection
            error_type = parsers.classify(exc)
            self.events.send(ParseFailure(
                connection_id=self.conn.connection_id, topic=message.topic,
                parser_name=self.conn.parser_name, error_type=error_type, error_message=str(exc),
                payload=bytes(payload[:protocol.MAX_PAYLOAD_SAMPLE_BYTES]),
                exception_type=type(exc).__name__,
                traceback="".join(traceback.format_exception(exc)) if error_type == "UNKNOWN_ERROR" else ""),
                defer=True)
            return
        for record in records:
            self.events.send(Data(connection_id=self.conn.connection_id, topic=message.topic,
                                  gateway=record.gateway, datalogger=record.datalogger,
                                  ts=record.ts, sensors=record.sensors), defer=True)

    def _ack_committed(self) -> None:
        """PUBACK (or PUBCOMP) every message whose events the logger committed."""
        committed = self.events.acked
        while self.broker_acks and self.broker_acks[0][0] <= committed:
            _, mid, qos = self.broker_acks.popleft()
            self.client.ack(mid, qos)

    @property
    def paused(self) -> bool:
        """At the limit of events the logger has not committed: read nothing more."""
        return self.events.unacked >= self.settings.max_unacked

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
            if self.slots is not None:
                self.slots.close()
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

    def _step(self, signals: SignalPipe) -> None:
        now = time.monotonic()
        if self.status in ("disconnected", "error") and now >= self.next_attempt_at:
            self._attempt()
            if self.stopping:
                return
        timeout = TICK
        if self.status in ("disconnected", "error"):
            timeout = min(timeout, max(0.0, self.next_attempt_at - time.monotonic()))
        timeout = self.events.bound(timeout)
        sock = self.client.socket()
        paused = self.paused
        buffered = sock is not None and not paused and self.client.buffered
        if buffered:
            timeout = 0.0  # packets already read wait for paho: no sleeping
        self._watch(sock, (0 if paused or sock is None else zmq.POLLIN)
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
        for _ in range(READ_BURST):
            self.client.loop_read()
            current = self.client.socket()
            if current is not sock or self.paused:
                return
            if self.client.buffered:
                continue
            pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes
            if not (pending is not None and pending()) and not ready.poll(0):
                return

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
                self.transition("disconnected", "")
        elif self.status != "disconnected" and self.exit_code not in (exitcodes.GAVE_UP, exitcodes.CONFIG):
            self.client.disconnect()
            self.transition("disconnected", "")
        if not self.events.flush(self.settings.ack_linger):
            logger.warning("connection {}: stopping with {} events not acknowledged by the logger",
                           self.conn.connection_id, self.events.unacked)


def load_settings_from_db(settings: config.Settings, connection_id: int) -> ConnectionSettings:
    database = db.Database(settings.database_url, f"sitelink-connection-{connection_id}")
    try:
        with database.transaction() as s:
            row = s.one("connection_settings", {"connection_id": connection_id})
    finally:
        database.close()
    if row is None:
        raise SystemExit(f"sitelink connection: no mqtt_connection with id {connection_id}")
    return ConnectionSettings.from_mapping(row)


def run_child(settings: config.Settings, conn: ConnectionSettings) -> int:
    """Run one connection until it is told to stop; return the exit code.

    Shared by the zygote's forked children and by ``main`` below.
    """
    process.set_name(f"sitelink-c{conn.connection_id}")
    if conn.monitor_pid and not process.die_with(conn.monitor_pid, signal.SIGTERM):
        return exitcodes.ORPHANED  # the monitor is gone: never run unsupervised
    logs.setup(f"conn-{conn.connection_id}", settings.log_level)
    return ConnectionChild(settings, conn).run()  # unusable settings: status error, exit code CONFIG


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
