"""Soak: good traffic mixed with hostile traffic, for a long while.

SITELINK_BENCH_SOAK_SITES good sites (default 10) publish a numbered reading
each every SITELINK_BENCH_SOAK_INTERVAL s (default 0.1) for
SITELINK_BENCH_SOAK_SECONDS (default 600), while, all along:

- a hostile gateway publishes on an eleventh site every kind of bad payload of
  ``tests/hostile.py`` (not UTF-8, lone surrogates, control characters in
  names, too many sensors, payloads over the limit, 3 MB giants), in turn;
- a hostile local process sends the logger's socket every kind of bad frame and
  envelope of ``tests/hostile.py`` (each with a fresh incarnation), in turn.

sitelink runs with the services' defaults. Reported: restarts of any process
(the logger, the monitor, the zygote, every child: PIDs before and after; must
be 0), good readings lost (published and acknowledged by the broker, minus
stored: must be 0), the rows the hostile traffic left, and every process's
memory (RSS and USS) at start and end.
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
import zmq

from tests import hostile
from tests.bench import results
from tests.bench.harness import env_float, env_int, fmt, memory, service_defaults, wait_until_quiet
from tests.stack import Stack
from tests.support import SteadyPublisher, alive, children_of, comm, monitor_children, wait_for

SECONDS = env_float("SITELINK_BENCH_SOAK_SECONDS", 600.0)
SITES = env_int("SITELINK_BENCH_SOAK_SITES", 10)
INTERVAL = env_float("SITELINK_BENCH_SOAK_INTERVAL", 0.1)
PAYLOAD_LIMIT = 256 * 1024  # the default SITELINK_MAX_PAYLOAD

pytestmark = [pytest.mark.bench, pytest.mark.timeout(SECONDS + 600)]


class HostileGateway(threading.Thread):
    """Publishes every kind of bad payload in turn on one site's topic."""

    def __init__(self, port: int, site: str, pause: float = 0.2):
        super().__init__(daemon=True)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hostile-gw-{id(self)}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.site = site
        self.pause = pause
        self.sent = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        cases = hostile.payloads(PAYLOAD_LIMIT)
        while not self.stopping.wait(self.pause):
            name, payload, _ = cases[self.sent % len(cases)]
            self.client.publish(f"sites/{self.site}/{name.replace(' ', '-')}", payload, qos=1).wait_for_publish(30)
            self.sent += 1

    def close(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            self.join()
            self.client.loop_stop()
            self.client.disconnect()


class HostileProcess(threading.Thread):
    """Sends the logger every kind of bad frame and envelope in turn."""

    def __init__(self, endpoint: str, cid: int, other: int, pause: float = 0.02):
        super().__init__(daemon=True)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.cid, self.other, self.pause = cid, other, pause
        self.sent = 0
        self.answers = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        envelopes = hostile.envelopes(self.cid, self.other)
        bad = [parts for _, parts in hostile.frames()] + [[hostile.pack(raw)] for _, raw in hostile.unattributable()]
        while not self.stopping.wait(self.pause):
            n = self.sent
            if n % 3:
                _, raw, _ = envelopes[n % len(envelopes)]
                self.socket.send(hostile.pack({**raw, "i": f"666.soak{n}"}))
            else:
                self.socket.send_multipart(bad[n % len(bad)])
            self.sent += 1
            while self.socket.poll(0):
                self.socket.recv()
                self.answers += 1

    def close(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            self.join()
            self.socket.close(linger=0)
            self.context.term()


def processes(stack: Stack) -> dict[str, int]:
    found = {"logger": stack.pid("logger"), "monitor": stack.pid("monitor")}
    for pid in monitor_children(stack):
        found[f"child {pid}"] = pid
    for pid in children_of(stack.pid("monitor")):
        if comm(pid) == "sitelink-zygote":
            found["zygote"] = pid
    return found


def test_soak_with_hostile_traffic(databases, broker, tmp_path):
    stack = Stack(databases.sitelink(), broker, tmp_path)
    service_defaults(stack, SITELINK_LOG_LEVEL="INFO")
    publisher = gateway = attacker = None
    try:
        names = [f"soak-{i}" for i in range(SITES)]
        ids = [stack.sql.add_site(name, port=broker.port, stall_after=None) for name in names]
        target = stack.sql.add_site("soak-hostile", port=broker.port, stall_after=None)
        stack.start("logger", "monitor")
        for cid in ids + [target]:
            stack.sql.wait_status(cid, "connected", timeout=60)
        wait_for(lambda: len(monitor_children(stack)) == SITES + 1, what="every child")
        wait_until_quiet()
        before = processes(stack)
        mem_start = {name: memory(pid) for name, pid in before.items()}
        started = time.monotonic()
        publisher = SteadyPublisher(broker.port, names, interval=INTERVAL)
        gateway = HostileGateway(broker.port, "soak-hostile")
        gateway.start()
        attacker = HostileProcess(stack.env["SITELINK_EVENTS_ENDPOINT"], target, ids[0])
        attacker.start()
        while time.monotonic() - started < SECONDS:
            time.sleep(1)
            for pid in before.values():
                assert alive(pid), f"pid {pid} died during the soak"
        per_site = publisher.stop()
        gateway.close()
        attacker.close()
        expected = per_site * SITES

        def good_stored() -> int:
            return stack.sql.value(
                "SELECT count(*) FROM reading r JOIN sensor s ON s.id = r.sensor_id "
                "JOIN gateway g ON g.id = s.gateway_id JOIN mqtt_connection c ON c.site_id = g.site_id "
                "WHERE c.id = ANY(%s)", ids)
        try:
            wait_for(lambda: good_stored() >= expected, timeout=120, what="every good reading", interval=1)
        except AssertionError:
            pass
        stored = good_stored()
        after = processes(stack)
        mem_end = {name: memory(pid) for name, pid in after.items()}
        restarts = sum(1 for name, pid in before.items() if after.get(name) != pid) + \
            sum(1 for name in after if name not in before)
        parsing_rows = stack.sql.value("SELECT count(*) FROM mqtt_parsing_log WHERE connection_id = %s", target)
        refusal_rows = stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE message LIKE 'refused an event%%'")
    finally:
        for thing in (publisher, gateway, attacker):
            if thing is not None:
                thing.close()
        stack.close()

    def mib(m, key):
        return fmt(m[key] / 1024, 1) if m else "gone"
    rows = [[name, mib(mem_start.get(name), "rss"), mib(mem_end.get(name), "rss"),
             mib(mem_start.get(name), "uss"), mib(mem_end.get(name), "uss")]
            for name in ["logger", "monitor", "zygote"] + sorted(n for n in before if n.startswith("child"))]
    body = "\n".join([
        "`tests/bench/bench_soak.py`: good traffic mixed with hostile traffic, sitelink with its defaults.",
        "",
        f"{SITES} good sites published a numbered reading each every {INTERVAL:g} s for {SECONDS:g} s "
        f"({expected:,} readings). Meanwhile a hostile gateway published every kind of bad payload of "
        f"`tests/hostile.py` in turn on an eleventh site ({gateway.sent:,} messages, 3 MB giants among "
        f"them), and a hostile local process sent the logger's socket every kind of bad frame and "
        f"envelope in turn ({attacker.sent:,} messages; {attacker.answers:,} answers).",
        "",
        results.table(["measure", "result", "target", ""], [
            ["processes restarted (logger, monitor, zygote, children)", restarts, 0,
             results.verdict(restarts, 0, higher_is_better=False)],
            ["good readings lost", expected - stored, 0, results.verdict(expected - stored, 0, False)],
            ["parsing-log rows of the hostile site", f"{parsing_rows:,}", f"{gateway.sent:,} (one each)", ""],
            ["connection-log rows of refused events", f"{refusal_rows:,}", "", ""],
        ]),
        "",
        "Memory of every process at the start and the end of the soak (MiB):",
        "",
        results.table(["process", "RSS start", "RSS end", "USS start", "USS end"], rows),
    ])
    results.update_section("Soak with hostile traffic", body)
    print("\n" + body)
    assert restarts == 0 and stored == expected
