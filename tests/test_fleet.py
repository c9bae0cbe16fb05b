"""One fleet, many hosts: several monitors on one PostgreSQL, as real processes.

Each monitor runs in a process group of its own, as on a host of its own, so
that a test can kill one whole (monitor, zygote and children at once) or
freeze it. "Never two clients for one site" is checked where it matters, at
the broker: Mosquitto logs "Client <id> already connected, closing old
connection" whenever a second client connects with a client id in use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from services.fleet import SLACK, share
from shared import protocol
from shared.protocol import Envelope, StatusChange
from tests.support import (alive, client_id_takeovers, connection_children, logger_client, monitor_children,
                           python_service, stop_process, wait_for)


class Fleet:
    """Monitors of one test, each named by its instance id, sharing the test's logger."""

    def __init__(self, stack, **env: str):
        self.stack = stack
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, *names: str, **env: str) -> None:
        for name in names:
            self.procs[name] = python_service(
                "monitor", {**self.stack.env, **self.env, "SITELINK_INSTANCE_ID": name, **env},
                self.stack.tmp / f"monitor-{name}.out", new_session=True)

    def output(self, name: str) -> str:
        return (self.stack.tmp / f"monitor-{name}.out").read_text(errors="replace")

    def children(self, name: str) -> list[int]:
        return connection_children(self.procs[name].pid)

    def split(self) -> Counter:
        """Active connections per monitor holding a valid claim on them, by PostgreSQL."""
        return Counter(r["claimed_by"] for r in self.stack.sql.rows(
            "SELECT claimed_by FROM mqtt_connection WHERE is_active AND claim_expires_at > now()"))

    def settled(self, expected: dict[str, int]) -> bool:
        """Each monitor holds and runs what ``expected`` says, and every site is connected."""
        if self.split() != Counter(expected):
            return False
        if any(len(self.children(name)) != n for name, n in expected.items()):
            return False
        return not self.stack.sql.value("SELECT count(*) FROM mqtt_connection WHERE is_active "
                                        "AND status <> 'connected'")

    def kill(self, name: str) -> None:
        """SIGKILL the monitor's whole process group: the monitor, its zygote and its children at once."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            stop_process(proc)
        self.procs.clear()


@pytest.fixture
def fleet(stack):
    f = Fleet(stack)
    try:
        yield f
    finally:
        f.close()


def add_sites(stack, broker, n: int) -> list[str]:
    """``n`` active sites; their client ids."""
    for i in range(n):
        stack.sql.add_site(f"fleet-{i}", port=broker.port, stall_after=None)
    return [r["client_id"] for r in stack.sql.rows("SELECT client_id FROM mqtt_connection")]


def two_monitors_with_three_each(stack, broker, fleet, **env: str) -> list[str]:
    """Monitors a and b sharing six sites; the sites' client ids."""
    client_ids = add_sites(stack, broker, 6)
    stack.start("logger")
    fleet.env.update(env)
    fleet.start("a", "b")
    wait_for(lambda: fleet.settled({"a": 3, "b": 3}), 30, "three connections each")
    return client_ids


# --- work shared across monitors -----------------------------------------------------------------

def test_monitors_with_distinct_ids_share_the_connections_about_evenly(stack, broker, fleet):
    client_ids = add_sites(stack, broker, 9)
    stack.start("logger")
    fleet.start("a", "b", "c")
    target = share(9, [None] * 3, None)

    def even() -> bool:
        split = fleet.split()
        return (sum(split.values()) == 9 and len(split) == 3
                and all(target - SLACK <= n <= target + SLACK for n in split.values())
                and not stack.sql.value("SELECT count(*) FROM mqtt_connection WHERE status <> 'connected'"))
    wait_for(even, 30, "every connection connected, about a third per monitor")
    assert sorted(len(fleet.children(name)) for name in "abc") == sorted(fleet.split().values())
    members = stack.sql.rows("SELECT instance_id, holds FROM sitelink_monitor ORDER BY instance_id")
    assert [m["instance_id"] for m in members] == ["a", "b", "c"]
    assert not client_id_takeovers(broker, client_ids)


def test_a_joining_monitor_gets_its_share_by_hand_over_never_two_clients(stack, broker, fleet):
    client_ids = add_sites(stack, broker, 12)
    stack.start("logger")
    fleet.start("a", "b")
    wait_for(lambda: fleet.settled({"a": 6, "b": 6}), 30, "six connections each")
    fleet.start("c")
    # Each hands over its excess (6 - 4): stops the child, waits for its exit,
    # releases the claim; the newcomer claims what was released.
    wait_for(lambda: fleet.settled({"a": 4, "b": 4, "c": 4}), 30, "four connections each")
    assert not client_id_takeovers(broker, client_ids), "two clients for one site at the broker"
    handed = [r["message"] for r in stack.sql.rows("SELECT message FROM mqtt_connection_log "
                                                    "WHERE message LIKE 'stopping: handing it over%%(3 monitors)'")]
    assert len(handed) == 4


def test_a_clean_stop_is_taken_over_at_once_not_at_the_next_poll(stack, broker, fleet):
    # Polls every 30 s (renewals every 30 s too): only a NOTIFY explains a quick takeover.
    client_ids = two_monitors_with_three_each(stack, broker, fleet, SITELINK_MONITOR_INTERVAL="30",
                                              SITELINK_CLAIM_LEASE="120")
    stopped_at = time.monotonic()
    stop_process(fleet.procs.pop("a"))
    wait_for(lambda: fleet.settled({"b": 6}), 15, "b to take every connection over")
    assert time.monotonic() - stopped_at < 20  # far sooner than b's next poll (30 s)
    assert not stack.sql.rows("SELECT 1 FROM sitelink_monitor WHERE instance_id = 'a'")
    assert not client_id_takeovers(broker, client_ids)


def test_a_killed_host_is_taken_over_within_a_lease_and_an_interval(stack, broker, fleet):
    client_ids = two_monitors_with_three_each(stack, broker, fleet, SITELINK_CLAIM_LEASE="4")
    fleet.kill("a")
    wait_for(lambda: fleet.settled({"b": 6}), 4 + 1 + 15, "b to take a's connections over")
    assert not client_id_takeovers(broker, client_ids)
    # Nothing of a's is left on disk but its instance lock (reused by its next start),
    # beside the logger's socket.
    left = sorted(os.listdir(stack.runtime_dir))
    assert len([f for f in left if f.startswith("monitor-")]) == 2 and len(left) == 3 and "events.sock" in left


def test_a_frozen_monitor_with_a_15_s_lease_is_taken_over_and_does_not_fight_when_it_wakes(stack, broker, fleet):
    client_ids = two_monitors_with_three_each(stack, broker, fleet, SITELINK_CLAIM_LEASE="15")
    frozen = fleet.children("a")
    fleet.procs["a"].send_signal(signal.SIGSTOP)
    try:
        # a cannot stop its children: they stop themselves at its fence (three
        # quarters of the lease after its last renewal), before b may take over.
        wait_for(lambda: not any(alive(pid) for pid in frozen), 15, "a's children to stop by themselves")
        wait_for(lambda: fleet.settled({"b": 6}), 15 + 1 + 15, "b to take a's connections over")
        fenced = stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE message LIKE "
                                 "'Disconnected: its monitor''s lease on this connection ended%%'")
        assert fenced == 3
        woke = stack.sql.value("SELECT now()")
    finally:
        fleet.procs["a"].send_signal(signal.SIGCONT)
    wait_for(lambda: stack.sql.value("SELECT heartbeat_at > %s FROM sitelink_monitor WHERE instance_id = 'a'",
                                     woke), 15, "a to come back")
    # It does not fight for what b holds: it gets its share back by hand-over.
    wait_for(lambda: fleet.settled({"a": 3, "b": 3}), 30, "three connections each again")
    assert not client_id_takeovers(broker, client_ids), "two clients for one site at the broker"


def test_a_second_monitor_with_the_same_instance_id_elsewhere_waits_for_the_first(stack, broker, fleet, tmp_path):
    client_ids = add_sites(stack, broker, 2)
    stack.start("logger")
    fleet.env.update(SITELINK_CLAIM_LEASE="4")
    fleet.start("a")
    wait_for(lambda: fleet.settled({"a": 2}), 30, "a to run both")
    first = fleet.procs.pop("a")
    # The same instance id from another host (another runtime directory, so no shared lock).
    other_home = tmp_path / "other-host"
    fleet.start("a", SITELINK_HOME=str(other_home), SITELINK_RUNTIME_DIR=str(other_home / "run"))
    wait_for(lambda: "runs on host" in fleet.output("a"), 15, "the second to say it waits")
    assert not fleet.children("a")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    # Its lease expired, the second takes over.
    wait_for(lambda: fleet.settled({"a": 2}), 4 + 1 + 15, "the second to take over")
    assert not client_id_takeovers(broker, client_ids)


# --- the lease is the only fence -------------------------------------------------------------------

def connecting_lines(stack) -> int:
    return stack.output("monitor").count("connecting: Connecting to")


def test_a_postgres_outage_shorter_than_the_lease_drops_no_connection(own_postgres, broker):
    server, stack = own_postgres
    ids = [stack.sql.add_site(f"blip-{i}", port=broker.port, stall_after=None) for i in range(3)]
    stack.start("logger", "monitor", SITELINK_CLAIM_LEASE="16")  # renewed every 4 s, trusted for 12 s
    for cid in ids:
        stack.sql.wait_status(cid, "connected")
    children = sorted(monitor_children(stack))
    connecting = stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE message LIKE 'Connecting%%'")
    lines = connecting_lines(stack)
    stack.sql.close()
    server.stop()
    down_at = time.monotonic()
    wait_for(lambda: "PostgreSQL unreachable" in stack.output("monitor"), 10, "the monitor to notice")
    server.start()
    wait_for(lambda: "PostgreSQL reachable again after" in stack.output("monitor"), 15, "the monitor to notice")
    # Past the fence the last renewal before the outage gave: it was renewed since.
    while time.monotonic() < down_at + 13:
        assert sorted(monitor_children(stack)) == children, "a child was stopped or restarted"
        time.sleep(0.2)
    for cid in ids:
        stack.sql.wait_status(cid, "connected")
    assert stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE message LIKE 'Connecting%%'") == connecting
    assert connecting_lines(stack) == lines
    out = stack.output("monitor")
    # Logged once when it started and once when it ended, each on one line.
    assert out.count("PostgreSQL unreachable") == 1 and out.count("PostgreSQL reachable again after") == 1
    assert "cannot LISTEN" not in out and "cannot take the instance lock" not in out
    assert not [line for line in out.splitlines() if line[:1].isspace()], "a message broken over lines"


def test_a_postgres_outage_longer_than_the_lease_stops_the_children_and_they_come_back(own_postgres, broker):
    server, stack = own_postgres
    ids = [stack.sql.add_site(f"outage-{i}", port=broker.port, stall_after=None) for i in range(2)]
    stack.start("logger", "monitor", SITELINK_CLAIM_LEASE="3")
    for cid in ids:
        stack.sql.wait_status(cid, "connected")
    children = monitor_children(stack)
    stack.sql.close()
    server.stop()
    # Disconnected well before another monitor could have taken the connections over
    # (their processes may linger a little for the logger's last acks): each child
    # by itself at the fence, or told to by its monitor, which gives up its claims
    # at the same moment (whichever comes first; both are on time; a frozen
    # monitor's children stop by themselves: test_a_frozen_monitor_with_a_15_s_lease_...).
    wait_for(lambda: all(f"connection {cid} disconnected" in stack.output("monitor") for cid in ids), 3,
             "the children to disconnect at the fence")
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "the children to exit")
    server.start()
    wait_for(lambda: len(set(monitor_children(stack)) - set(children)) == 2, 20, "new children")
    for cid in ids:
        stack.sql.wait_status(cid, "connected")


# --- ordering that does not trust clocks -------------------------------------------------------------

def test_a_late_status_never_overwrites_a_newer_one_whatever_the_senders_clocks(stack, broker):
    cid = stack.sql.add_site("order", port=broker.port, active=False)
    stack.start("logger")
    now = time.time()
    sent = iter(range(1, 100))

    def send(who: str, status: str, epoch: int, ts: float, seq: int | None = None, final: bool = False) -> None:
        # Two children of one connection (two processes, two incarnations), or its monitor.
        event = StatusChange(connection_id=cid, status=status, message=f"{who} {status}", epoch=epoch, final=final)
        sender.send(protocol.encode(Envelope(sender=f"conn:{cid}" if who.startswith("conn") else who,
                                             incarnation=who.replace(":", "."), seq=seq or next(sent), floor=0,
                                             ts=ts, event=event)))

    def row():
        return stack.sql.one("SELECT status, error_message FROM mqtt_connection WHERE id = %s", cid)
    with logger_client(stack.env["SITELINK_EVENTS_ENDPOINT"]) as sender:
        # The child of epoch 2, on a host whose clock is an hour behind...
        send("conn:new", "connected", 2, now - 3600)
        wait_for(lambda: row()["status"] == "connected", what="the newer status")
        # ...then, late, the child of epoch 1 from a host whose clock is ahead.
        send("conn:old", "error", 1, now + 60)
        wait_for(lambda: stack.sql.rows("SELECT 1 FROM mqtt_connection_log WHERE message = 'conn:old error'"),
                 what="the late status logged")
        assert row()["status"] == "connected"
        # The monitor's word on epoch 2 once its child is gone ranks after all that child sent...
        send("monitor:a", "error", 2, now - 7200, final=True)
        wait_for(lambda: row()["status"] == "error", what="the monitor's final status")
        # ...and a late one of that child does not undo it.
        send("conn:new", "disconnected", 2, now + 3600, seq=50)
        wait_for(lambda: stack.sql.rows("SELECT 1 FROM mqtt_connection_log WHERE message = 'Disconnected: conn:new disconnected'"),
                 what="the late status logged")
        assert row() == {"status": "error", "error_message": "monitor:a error"}
