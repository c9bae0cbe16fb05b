"""Demo publisher: the gateways of a few sites sending readings to the embedded broker.

    python -m services.demo [--interval 5] [--heartbeat 60] [--bad-every 0]

Three sites, one gateway each, publish at QoS 1, every ``--interval`` seconds,
one message per datalogger on ``sites/<site>/<gateway>/<datalogger>``::

    {"gateway": "GW-ALP-01", "datalogger": "DL-ALP-01", "ts": "2026-11-28T10:00:00.000Z",
     "sensors": {"S-1": {"temperature": -3.2, "humidity": 71.5}}}

and every ``--heartbeat`` seconds a gateway heartbeat on
``sites/<site>/<gateway>``: ``{"gateway": "GW-ALP-01", "ts": "..."}``.
Values are smooth random walks around plausible levels (some with a daily or
tidal swing). ``--bad-every N`` replaces every N-th datalogger message by a
malformed one, to show parse errors; the default 0 keeps the data clean.

Each gateway is its own MQTT client and reconnects on its own. They log in
as ``demo-publisher`` with the password the embedded broker generated
(``var/secrets/mqtt-users``, see ``shared.embedded``); without that file they
try anonymously, which the embedded broker refuses. SIGTERM or SIGINT stops
the demo within a second.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

from shared import config, embedded, process

#: Messages a disconnected gateway keeps for later; beyond, new ones are dropped.
MAX_QUEUED = 1000
STATS_EVERY = 300.0
STOP_DEADLINE = 0.5


def log(message: str) -> None:
    print(f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} demo: {message}", file=sys.stderr, flush=True)


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Walk:
    """A mean-reverting random walk, optionally swinging over a period (daily cycle, tide)."""

    mean: float
    step: float
    low: float
    high: float
    decimals: int = 1
    amplitude: float = 0.0
    period_h: float = 24.0
    peak_h: float = 15.0  # hour (UTC) of the swing's maximum
    pull: float = 0.1
    value: float = field(init=False)

    def __post_init__(self) -> None:
        self.value = self.target(time.time()) + random.gauss(0, self.step)

    def target(self, now: float) -> float:
        if not self.amplitude:
            return self.mean
        hours = now / 3600.0
        return self.mean + self.amplitude * math.cos(2 * math.pi * (hours - self.peak_h) / self.period_h)

    def next(self, now: float) -> float:
        self.value += self.pull * (self.target(now) - self.value) + random.gauss(0, self.step)
        self.value = min(self.high, max(self.low, self.value))
        return round(self.value, self.decimals)


@dataclass
class Datalogger:
    name: str
    sensors: dict[str, dict[str, Walk]]

    def readings(self, now: float) -> dict[str, dict[str, float]]:
        return {sensor: {metric: walk.next(now) for metric, walk in metrics.items()}
                for sensor, metrics in self.sensors.items()}


@dataclass
class Site:
    name: str
    gateway: str
    dataloggers: list[Datalogger]

    @property
    def topic(self) -> str:
        return f"sites/{self.name}/{self.gateway}"


def demo_sites() -> list[Site]:
    return [
        Site("alpine-hut", "GW-ALP-01", [
            Datalogger("DL-ALP-01", {  # weather mast at 2200 m
                "S-1": {"temperature": Walk(-2.0, 0.3, -30, 25, amplitude=5.0),
                        "humidity": Walk(70.0, 1.5, 5, 100, peak_h=4.0, amplitude=12.0)},
                "S-2": {"pressure": Walk(780.0, 0.4, 740, 810)},
            }),
            Datalogger("DL-ALP-02", {  # hut: water tank and store room
                "S-1": {"water_level": Walk(1.4, 0.02, 0.0, 2.0, decimals=2)},
                "S-2": {"temperature": Walk(12.0, 0.2, -5, 30)},
                "S-3": {"temperature": Walk(4.0, 0.2, -10, 20), "humidity": Walk(60.0, 1.0, 10, 100)},
            }),
        ]),
        Site("harbour-pump", "GW-HBR-01", [
            Datalogger("DL-HBR-01", {  # pumping station on the quay
                "S-1": {"water_level": Walk(2.2, 0.03, 0.0, 5.0, decimals=2, amplitude=1.1, period_h=12.42)},
                "S-2": {"flow": Walk(420.0, 12.0, 0, 900)},
                "S-3": {"pressure": Walk(1013.0, 0.3, 960, 1050)},
            }),
        ]),
        Site("vineyard-north", "GW-VIN-01", [
            Datalogger("DL-VIN-01", {  # upper rows
                "S-1": {"temperature": Walk(16.0, 0.3, -15, 45, amplitude=7.0),
                        "humidity": Walk(55.0, 1.5, 5, 100, peak_h=4.0, amplitude=15.0)},
                "S-2": {"soil_moisture": Walk(28.0, 0.4, 0, 60)},
            }),
            Datalogger("DL-VIN-02", {  # irrigation line
                "S-1": {"flow": Walk(35.0, 2.0, 0, 120)},
                "S-2": {"pressure": Walk(1012.0, 0.3, 960, 1050)},
            }),
        ]),
    ]


def bad_payload(number: int, site: Site, datalogger: Datalogger) -> bytes:
    """One of a few kinds of broken messages, in turn."""
    kinds = [
        lambda: b'{"gateway": "' + site.gateway.encode() + b'", "datalogger": ',  # cut short
        lambda: json.dumps({"datalogger": datalogger.name, "ts": utc_now_iso(),
                            "sensors": {"S-1": {"temperature": 20.0}}}).encode(),  # no gateway
        lambda: json.dumps({"gateway": site.gateway, "datalogger": datalogger.name, "ts": utc_now_iso(),
                            "sensors": {"S-1": {"temperature": "n/a"}}}).encode(),  # not a number
        lambda: json.dumps({"gateway": site.gateway, "datalogger": datalogger.name,
                            "ts": datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),  # no zone
                            "sensors": {"S-1": {"temperature": 20.0}}}).encode(),
    ]
    return kinds[number % len(kinds)]()


class Gateway:
    """One site's gateway: an MQTT client with its own network thread."""

    def __init__(self, site: Site, host: str, port: int, login: tuple[str, str] | None):
        self.site = site
        self._pending: set[int] = set()  # mids of QoS 1 messages not acknowledged yet
        self._early: set[int] = set()  # mids acknowledged before publish() returned
        self._lock = threading.Lock()
        self.connected = False
        self.failing = False
        self.stopping = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sitelink-demo-{site.gateway}")
        if login is not None:
            self.client.username_pw_set(*login)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(MAX_QUEUED)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._note_failure(f"broker refused the connection: {reason_code}")
            return
        self.connected = True
        self.failing = False
        log(f"{self.site.gateway} ({self.site.name}) connected")

    def _on_connect_fail(self, client, userdata) -> None:
        self._note_failure("cannot reach the broker; retrying")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected and not self.stopping:
            log(f"{self.site.gateway} disconnected ({reason_code}); reconnecting")
        self.connected = False

    def _note_failure(self, message: str) -> None:
        if not self.failing:  # once per outage, not at every attempt
            log(f"{self.site.gateway}: {message}")
        self.failing = True

    def publish(self, topic: str, payload: bytes) -> bool:
        # Not under self._lock: paho calls on_publish holding its own lock.
        info = self.client.publish(topic, payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued for later
            return False
        with self._lock:
            if info.mid in self._early:  # the ack came first
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)
        return True

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._early.add(mid)

    def unacknowledged(self) -> int:
        with self._lock:
            return len(self._pending)

    def disconnect(self) -> None:
        self.stopping = True
        self.client.disconnect()


def stop_all(gateways: list[Gateway], deadline: float) -> None:
    """Disconnect every gateway and wait for their threads, but not beyond ``deadline``."""
    for gw in gateways:
        gw.disconnect()
    stoppers = [threading.Thread(target=gw.client.loop_stop, daemon=True) for gw in gateways]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(max(0.0, deadline - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="broker port (default SITELINK_EMBEDDED_MQTT_PORT, 18830)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between readings (default 5)")
    parser.add_argument("--heartbeat", type=float, default=60.0,
                        help="seconds between gateway heartbeats (default 60)")
    parser.add_argument("--bad-every", type=int, default=0, metavar="N",
                        help="make every N-th message malformed (default 0: never)")
    parser.add_argument("--rounds", type=int, default=0, metavar="N",
                        help="stop after N rounds of readings (default 0: run until stopped)")
    args = parser.parse_args(argv)
    process.set_title("sitelink: demo publisher", "sitelink-demo")
    if not (0 < args.interval < math.inf and 0 < args.heartbeat < math.inf) or args.bad_every < 0 or args.rounds < 0:
        parser.error("--interval and --heartbeat must be > 0, --bad-every and --rounds >= 0")

    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"sitelink: {exc}", file=sys.stderr)
        return 2
    if args.port is None:
        args.port = settings.embedded_mqtt_port
    try:
        login = (embedded.PUBLISHER_USER, embedded.mqtt_password(settings.secrets_dir, embedded.PUBLISHER_USER))
    except embedded.CredentialsUnavailable as exc:
        log(f"connecting anonymously: {exc}")
        login = None

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    sites = demo_sites()
    log(f"publishing {sum(len(s.dataloggers) for s in sites)} dataloggers of "
        f"{', '.join(s.name for s in sites)} to {args.host}:{args.port} every {args.interval:g} s"
        + (f", 1 message in {args.bad_every} malformed" if args.bad_every else ""))
    # The network threads inherit a mask that blocks these signals, so the kernel
    # delivers them to the main thread, which then wakes at once from stop.wait().
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        gateways = [Gateway(site, args.host, args.port, login) for site in sites]
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    published = dropped = messages = rounds = 0
    start = time.monotonic()
    next_reading = start
    next_heartbeat = start
    next_stats = start + STATS_EVERY
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_heartbeat:
                for gw in gateways:
                    body = json.dumps({"gateway": gw.site.gateway, "ts": utc_now_iso()}).encode()
                    ok = gw.publish(gw.site.topic, body)
                    published, dropped = published + ok, dropped + (not ok)
                next_heartbeat = max(next_heartbeat + args.heartbeat, now)
            if now >= next_reading:
                wall = time.time()
                for gw in gateways:
                    for dl in gw.site.dataloggers:
                        messages += 1
                        if args.bad_every and messages % args.bad_every == 0:
                            body = bad_payload(messages // args.bad_every, gw.site, dl)
                        else:
                            body = json.dumps({"gateway": gw.site.gateway, "datalogger": dl.name,
                                               "ts": utc_now_iso(), "sensors": dl.readings(wall)}).encode()
                        ok = gw.publish(f"{gw.site.topic}/{dl.name}", body)
                        published, dropped = published + ok, dropped + (not ok)
                rounds += 1
                # Keep the rhythm; after a long stall, do not fire a burst to catch up.
                next_reading = max(next_reading + args.interval, now)
                if args.rounds and rounds >= args.rounds:
                    break
            if now >= next_stats:
                online = sum(gw.connected for gw in gateways)
                log(f"{published} messages published, {dropped} dropped (queue full), "
                    f"{online}/{len(gateways)} gateways connected")
                next_stats = max(next_stats + STATS_EVERY, now)
            stop.wait(max(0.0, min(next_reading, next_heartbeat, next_stats) - time.monotonic()))
    finally:
        if args.rounds and not stop.is_set():
            # A bounded run: give the last QoS 1 messages a moment to be acknowledged.
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and any(gw.unacknowledged() for gw in gateways):
                stop.wait(0.05)
        stop_all(gateways, time.monotonic() + STOP_DEADLINE)
    log(f"stopped after {published} messages ({dropped} dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
