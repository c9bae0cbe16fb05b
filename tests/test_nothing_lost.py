"""Nothing lost: numbered QoS 1 readings end up in ``reading`` exactly once,
whatever process of ours is killed or restarted meanwhile."""

from __future__ import annotations

import json
import os
import signal
import time

import paho.mqtt.client as mqtt
import pytest
import zmq

from shared import protocol
from shared.protocol import Ack, Batch, Data, Envelope
from tests.stack import Stack
from tests.support import (Mosquitto, Publisher, alive, logger_client, memory_kib, monitor_children, remove_tree,
                           wait_for, world_traversable_tmpdir)

SITES = ("north", "south", "east")
PER_SITE = 150
BASE_TS = 1795860000  # 2026-11-28T10:00:00Z
#: What a child or the logger may grow by during an outage (they hold a
#: bounded number of events; the broker keeps the rest).
GROWTH_BOUND_KIB = 40 * 1024


class NumberedPublisher:
    """Publishes reading n of each site at QoS 1 or 2 (ts = BASE_TS + n), n = 0..PER_SITE-1."""

    def __init__(self, port: int, qos: int = 1):
        self.qos = qos
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"numbered-{os.getpid()}",
                                  clean_session=False)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, numbers: range) -> None:
        for n in numbers:
            for site in SITES:
                body = {"gateway": "GW", "datalogger": "DL", "ts": BASE_TS + n, "sensors": {"S": {"n": n}}}
                self.infos.append(self.client.publish(f"sites/{site}/GW/DL", json.dumps(body), qos=self.qos))

    def wait_acked(self, timeout: float = 60) -> None:
        wait_for(lambda: all(i.is_published() for i in self.infos), timeout, "the broker to take every message")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class MemoryWatch:
    """Largest resident size of some processes, sampled while a test waits."""

    def __init__(self, pids: list[int]):
        self.start = {pid: memory_kib(pid) for pid in pids}
        self.peak = dict(self.start)

    def sample(self) -> None:
        for pid in self.peak:
            if alive(pid):
                self.peak[pid] = max(self.peak[pid], memory_kib(pid))

    def assert_bounded(self) -> None:
        for pid, peak in self.peak.items():
            assert peak - self.start[pid] < GROWTH_BOUND_KIB, f"pid {pid} grew by {peak - self.start[pid]} KiB"


def start_sites(stack: Stack, port: int, qos: int = 1, **env: str) -> list[int]:
    ids = [stack.sql.add_site(site, port=port, stall_after=None, qos=qos) for site in SITES]
    stack.start("logger", "monitor", SITELINK_MAX_UNACKED="100", SITELINK_CLAIM_LEASE="3", **env)
    for cid in ids:
        stack.sql.wait_status(cid, "connected")
    return ids


def assert_every_reading_once(stack: Stack, watch: MemoryWatch | None = None, timeout: float = 90) -> None:
    expected = len(SITES) * PER_SITE

    def complete():
        if watch is not None:
            watch.sample()
        return stack.sql.value("SELECT count(*) FROM reading") == expected
    wait_for(complete, timeout, f"all {expected} readings", interval=0.2)
    rows = stack.sql.rows(
        "SELECT g.site_id, (r.values->>'n')::float::int AS n, extract(epoch FROM r.ts)::bigint AS ts "
        "FROM reading r JOIN sensor s ON s.id = r.sensor_id JOIN gateway g ON g.id = s.gateway_id")
    per_site: dict[int, list[int]] = {}
    for r in rows:
        assert r["ts"] == BASE_TS + r["n"]
        per_site.setdefault(r["site_id"], []).append(r["n"])
    assert len(per_site) == len(SITES)
    for numbers in per_site.values():
        assert sorted(numbers) == list(range(PER_SITE))  # every number, exactly once
    if watch is not None:
        watch.assert_bounded()


@pytest.fixture
def numbered(broker):
    pub = NumberedPublisher(broker.port)
    yield pub
    pub.close()


def test_sigkill_of_a_child(stack, broker, numbered):
    start_sites(stack, broker.port)
    numbered.publish(range(0, 50))
    [victim, *_] = monitor_children(stack)
    os.kill(victim, signal.SIGKILL)
    numbered.publish(range(50, PER_SITE))
    numbered.wait_acked()
    wait_for(lambda: len(monitor_children(stack)) == 3, what="the child restarted")
    assert_every_reading_once(stack)


@pytest.mark.parametrize("qos", [1, 2])
def test_sigkill_of_children_holding_messages_the_logger_never_committed(stack, broker, qos):
    """The broker keeps what no commit confirmed: messages that children had
    received and reported, but that were never committed, are redelivered
    after the children die. At QoS 2 too: PUBREC waits for the commit."""
    numbered = NumberedPublisher(broker.port, qos=qos)
    ids = start_sites(stack, broker.port, qos=qos)
    stack.stop("logger", signal.SIGKILL)
    # A stand-in logger that takes the children's events and never acknowledges.
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)
    silent.bind(stack.env["SITELINK_EVENTS_ENDPOINT"])
    received: dict[int, int] = {cid: 0 for cid in ids}
    try:
        numbered.publish(range(0, 50))
        numbered.wait_acked()

        def reported():
            while silent.poll(0):
                _, frame = silent.recv_multipart()
                message = protocol.decode(frame)
                envelopes = message.envelopes if isinstance(message, Batch) else (message,)
                for env in envelopes:
                    if isinstance(env, Envelope) and isinstance(env.event, Data):
                        received[env.event.connection_id] += 1
            return all(n >= 10 for n in received.values())
        wait_for(reported, what="every child to report some messages")
        for pid in monitor_children(stack):
            os.kill(pid, signal.SIGKILL)
    finally:
        silent.close(linger=0)
        context.term()
    stack.start("logger")
    numbered.publish(range(50, PER_SITE))
    numbered.wait_acked()
    assert_every_reading_once(stack)
    numbered.close()


def test_sigkill_of_the_logger(stack, broker, numbered):
    start_sites(stack, broker.port)
    watch = MemoryWatch(monitor_children(stack))
    numbered.publish(range(0, 50))
    stack.stop("logger", signal.SIGKILL)
    numbered.publish(range(50, PER_SITE))
    numbered.wait_acked()
    for _ in range(20):
        watch.sample()
        time.sleep(0.05)
    stack.start("logger")  # as supervisord would
    assert_every_reading_once(stack, watch)
    # Nothing stored twice in the logs either: re-sent events were recognised.
    assert not stack.sql.rows("SELECT connection_id, timestamp, message FROM mqtt_connection_log "
                              "GROUP BY 1, 2, 3 HAVING count(*) > 1")


def test_sigkill_of_the_monitor(stack, broker, numbered):
    start_sites(stack, broker.port)
    children = monitor_children(stack)
    numbered.publish(range(0, 50))
    stack.stop("monitor", signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in children), what="the children to die with it")
    numbered.publish(range(50, PER_SITE))
    numbered.wait_acked()
    stack.start("monitor")  # the same instance id takes its claims back at once
    assert_every_reading_once(stack)


def test_postgres_stopped_for_a_while(own_postgres, broker, numbered):
    server, stack = own_postgres
    start_sites(stack, broker.port)
    watch = MemoryWatch([*monitor_children(stack), stack.pid("logger")])
    numbered.publish(range(0, 30))
    server.stop()
    numbered.publish(range(30, PER_SITE))
    numbered.wait_acked()
    wait_for(lambda: "cannot write to PostgreSQL" in stack.output("logger"), what="the logger to notice")
    for _ in range(40):
        watch.sample()
        time.sleep(0.05)
    server.start()
    assert_every_reading_once(stack, watch)


def test_mosquitto_restarted_with_its_persistence(stack):
    base = world_traversable_tmpdir("sitelink-test-mqtt-restart-")
    mqtt_broker = Mosquitto(base)
    mqtt_broker.start()
    publisher = None
    try:
        start_sites(stack, mqtt_broker.port)
        stack.stop("monitor")  # the sessions stay on the broker, with their subscriptions
        publisher = NumberedPublisher(mqtt_broker.port)
        publisher.publish(range(PER_SITE))
        publisher.wait_acked()
        publisher.close()
        publisher = None
        mqtt_broker.stop()  # writes its persistence file
        mqtt_broker.start()
        stack.start("monitor")
        assert_every_reading_once(stack)
    finally:
        if publisher is not None:
            publisher.close()
        mqtt_broker.stop()
        remove_tree(base)


def test_a_poison_event_is_isolated_and_the_rest_stored(stack, broker):
    """An event that passes the logger's checks but that PostgreSQL refuses (here
    a rule of the operator's own: a CHECK on gateway names) is isolated from its
    batch, recorded as a DB_ERROR and acknowledged; the rest is stored."""
    cid = stack.sql.add_site("poison", port=broker.port, active=False)
    stack.sql.rows("ALTER TABLE gateway ADD CONSTRAINT no_poison CHECK (name <> 'POISON')")
    stack.start("logger")
    with logger_client(stack.env["SITELINK_EVENTS_ENDPOINT"]) as sender:
        events = [Data(connection_id=cid, topic="t", gateway="GW", ts=BASE_TS + n, datalogger="DL",
                       sensors={"S": {"n": float(n)}}) for n in range(10)]
        events.insert(5, Data(connection_id=cid, topic="t/bad", gateway="POISON", ts=BASE_TS,
                              sensors={"S": {"n": 1.0}}))
        for seq, event in enumerate(events, 1):
            sender.send(protocol.encode(Envelope(sender=f"conn:{cid}", incarnation="1", seq=seq, floor=0,
                                                 ts=time.time(), event=event)))
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 10, what="the good readings")
        [row] = wait_for(lambda: stack.sql.rows("SELECT * FROM mqtt_parsing_log WHERE error_type = 'DB_ERROR'"),
                         what="the DB_ERROR row")
        assert row["topic"] == "t/bad" and "POISON" in json.dumps(row["payload_sample"])
        assert "could not store a data event" in row["error_message"]

        refused: list[int] = []

        def acked_all():
            while sender.poll(0):
                message = protocol.decode_reply(sender.recv())
                if isinstance(message, Ack):
                    refused.extend(seq for seq, _ in message.refused)
                    if message.upto == len(events):
                        return True
            return False
        wait_for(acked_all, what="every event acknowledged, the poison too")
        assert refused == [6]  # the sender is told which one, and why


def test_the_loggers_memory_stays_flat_through_a_long_outage_while_children_resend(own_postgres, broker):
    """PostgreSQL away, three children each holding 2000 events (5 MB) and
    resending them every few seconds: the logger keeps one batch and drops the rest
    (its senders keep it), so its memory does not grow with the outage (a logger
    that let the resends queue up grew by 30 MB); once PostgreSQL is
    back, everything is stored exactly once."""
    server, stack = own_postgres
    sites = [f"flat-{i}" for i in range(3)]
    ids = [stack.sql.add_site(site, port=broker.port, stall_after=None) for site in sites]
    stack.start("logger", "monitor", SITELINK_MAX_UNACKED="2000", SITELINK_RESEND_AFTER="0.5",
                SITELINK_BATCH_MAX="500", SITELINK_DB_RETRY_CAP="2", SITELINK_CLAIM_LEASE="60")
    for cid in ids:
        stack.sql.wait_status(cid, "connected")
    publisher = Publisher(broker.port)
    sensors = {f"S{i}": {f"m{j}": float(j) for j in range(20)} for i in range(10)}

    def publish(numbers: range) -> None:
        for n in numbers:
            for site in sites:
                publisher.client.publish(f"sites/{site}/GW", json.dumps(
                    {"gateway": "GW", "ts": BASE_TS + n, "sensors": sensors}), qos=1)
    logger_pid = stack.pid("logger")
    try:
        # Warm the logger up first (its batches, statements, partitions): what
        # grows then is what it holds, not what it loads once.
        publish(range(0, 500))
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 3 * 500 * 10, timeout=60,
                 what="the first readings", interval=0.2)
        baseline = memory_kib(logger_pid)
        stack.sql.close()
        server.stop()
        publish(range(500, 2500))
        peak = baseline

        def outage_long_enough():
            nonlocal peak
            peak = max(peak, memory_kib(logger_pid))
            return stack.output("logger").count("cannot write to PostgreSQL") >= 8
        wait_for(outage_long_enough, timeout=90, what="eight failed writes of the logger", interval=0.1)
    finally:
        publisher.close()
    server.start()
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == 3 * 2500 * 10, timeout=120,
             what="every reading after the outage", interval=0.2)
    assert peak - baseline < 16 * 1024, f"the logger grew by {peak - baseline} KiB during the outage"
    assert "dropped" in stack.output("logger")  # it did drop resends meanwhile, and asked for them again
