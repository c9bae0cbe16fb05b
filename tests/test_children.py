"""A child's start and its quiet when idle.

The zygote forks each child once, as its own parent's child
(clone(CLONE_PARENT)): the process that started the zygote (the monitor)
is the child's parent from its first instant and reaps it, with no
intermediate and no re-parenting. An idle connected child sleeps until the
first of its own timers is due, not on a fixed tick.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import time
from types import SimpleNamespace

import pytest

from services import connection
from services.connection import TICK, TIMER_SLACK, ConnectionChild
from services.processes import Processes, SpawnError
from services.zygote import CLONE_SYSCALL, FORK_BATCH, SpawnRefused, Zygote
from shared import protocol, runfile
from shared.connections import ConnectionSettings
from shared.runfile import RunState
from tests.support import children_of, comm, free_port, wait_for


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.skipif(platform.machine() not in CLONE_SYSCALL, reason="the zygote forks through an intermediate here")
def test_a_child_is_its_monitors_child_from_the_start_and_its_exit_status_reaches_it():
    zygote = Zygote(request_timeout=30)
    zygote.start()
    pid = None
    try:
        # Nobody listens on this port: the child keeps retrying until it is killed.
        pid = zygote.spawn(ConnectionSettings(connection_id=7, site_id=7, broker_host="127.0.0.1",
                                              broker_port=free_port(), monitor_pid=os.getpid()))
        # Forked through an intermediate, it would be ours only once that exits, and
        # then only if we were a child subreaper (this test process is not).
        assert _parent(pid) == os.getpid()
        # It runs as the monitor's child: die_with() found us its parent at once.
        wait_for(lambda: comm(pid) == "sitelink-c7", 15, "the child to name itself")
        os.kill(pid, signal.SIGKILL)
        reaped, status = os.waitpid(pid, 0)
        pid = None
        assert reaped and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        zygote_pid = zygote.pid
        zygote.close()  # it exits when its control socket closes
        os.waitpid(zygote_pid, 0)



@pytest.fixture
def processes(tmp_path):
    """The monitor's ``Processes`` with its zygote and state file, in this test
    process (not made a subreaper: the zygote's children are ours anyway);
    every child it started is killed and reaped at the end."""
    procs = Processes(SimpleNamespace(run_dir=tmp_path / "run", database_url="postgresql://t/t", instance_id="t"))
    procs.state = RunState.create(tmp_path / "run")
    procs.state.publish_fence(runfile.clock() + 120)  # the children keep trying meanwhile
    procs.zygote = Zygote(inherit=(procs.state.fd, procs.lock.fd))
    procs.zygote.start()
    zygotes = [procs.zygote.pid]
    yield procs, zygotes
    for pid in procs._connection_of:
        os.kill(pid, signal.SIGKILL)
    zygotes.append(procs.zygote.pid)
    procs.close()
    for pid in [*procs._connection_of, *zygotes]:
        try:
            os.waitpid(pid, 0)
        except (ChildProcessError, TypeError):
            pass


def _start_request(cid: int, **kw) -> ConnectionSettings:
    # Nobody listens on this port: a started child keeps retrying until it is killed.
    return ConnectionSettings(**{**dict(connection_id=cid, site_id=cid, broker_host="127.0.0.1",
                                        broker_port=free_port()), **kw})


@pytest.mark.skipif(platform.machine() not in CLONE_SYSCALL, reason="the zygote forks through an intermediate here")
def test_children_start_in_batches_each_with_its_own_settings_and_a_refusal_in_its_place(processes):
    procs, _ = processes
    # More than one batch (FORK_BATCH), unusable settings among them (an unknown parser).
    ids = range(1, 2 * FORK_BATCH + 4)
    answers = procs.spawn_many([_start_request(cid, parser_name="nope" if cid % 5 == 0 else "json") for cid in ids])
    assert len(answers) == len(ids)
    for cid, answer in zip(ids, answers):
        if cid % 5 == 0:
            assert isinstance(answer, SpawnRefused) and "unknown parser 'nope'" in str(answer)
        else:
            assert isinstance(answer, int) and _parent(answer) == os.getpid()
    started = {pid: cid for cid, pid in zip(ids, answers) if isinstance(pid, int)}
    # Each PID is the child of the connection it was answered for.
    wait_for(lambda: all(comm(pid) == f"sitelink-c{cid}" for pid, cid in started.items()), 30,
             "each child to name itself")
    assert procs._connection_of == started


@pytest.mark.skipif(platform.machine() not in CLONE_SYSCALL, reason="the zygote forks through an intermediate here")
def test_a_dead_zygote_is_replaced_and_its_batch_started_by_the_new_one(processes):
    procs, zygotes = processes
    os.kill(zygotes[0], signal.SIGKILL)
    os.waitpid(zygotes[0], 0)
    answers = procs.spawn_many([_start_request(cid) for cid in (1, 2, 3)])
    assert all(isinstance(pid, int) for pid in answers), answers
    assert procs.zygote.pid not in (None, zygotes[0])
    wait_for(lambda: [comm(pid) for pid in answers] == ["sitelink-c1", "sitelink-c2", "sitelink-c3"], 30,
             "the children to name themselves")


@pytest.mark.skipif(platform.machine() not in CLONE_SYSCALL, reason="the zygote forks through an intermediate here")
def test_when_a_new_zygote_fails_too_the_whole_batch_is_a_spawn_error(processes, monkeypatch):
    procs, zygotes = processes

    def broken_start(self) -> None:  # a zygote that is gone before it answers
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.close()
        self.control, self.proc = ours, None
    monkeypatch.setattr(Zygote, "start", broken_start)
    procs.zygote.discard()
    os.waitpid(zygotes.pop(), 0)
    answers = procs.spawn_many([_start_request(cid) for cid in (1, 2, 3)])
    assert [type(a) for a in answers] == [SpawnError] * 3
    assert procs._connection_of == {}



@pytest.mark.skipif(platform.machine() not in CLONE_SYSCALL, reason="the zygote forks through an intermediate here")
def test_garbage_within_a_batch_is_refused_in_its_place_and_the_rest_start():
    """Whatever bytes sit among a batch's requests (not msgpack, msgpack that is not
    settings, empty-ish, settings with problems), each gets its own answer, in order."""
    zygote = Zygote(request_timeout=30)
    zygote.start()
    zygote_pid, started = zygote.pid, []
    def good(cid: int) -> bytes:
        return protocol.encode_settings(_start_request(cid, monitor_pid=os.getpid()))
    bad = [b"garbage", b"\x81\xa1v\x01", b"\xc1", protocol.encode_settings(_start_request(9, parser_name="nope"))]
    requests = [good(1), *bad[:2], good(2), *bad[2:], good(3)]
    try:
        for frame in requests:  # all sent before any answer is read: the zygote takes them in batches
            zygote.control.send(frame)
        answers = [zygote._answer() for _ in requests]
        started = [a for a in answers if isinstance(a, int)]
        kinds = ["pid" if isinstance(a, int) else "refused" for a in answers]
        assert kinds == ["pid", "refused", "refused", "pid", "refused", "refused", "pid"]
        assert "unknown parser 'nope'" in str(answers[5])
        wait_for(lambda: [comm(pid) for pid in started] == ["sitelink-c1", "sitelink-c2", "sitelink-c3"], 30,
                 "each child to be its own connection's")
    finally:
        for pid in started:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        zygote.close()
        os.waitpid(zygote_pid, 0)


def test_what_a_monitor_sent_just_before_closing_its_end_is_not_started():
    """A monitor that closes its end of the socket is stopping: it will not hear
    the PIDs of its last requests, so the zygote starts none of them."""
    before = set(children_of(os.getpid()))
    zygote = Zygote(request_timeout=30)
    zygote.start()
    zygote_pid = zygote.pid
    # Sent and closed while the zygote is still importing: it finds them all, then the end.
    for cid in (1, 2, 3):
        zygote.control.send(protocol.encode_settings(_start_request(cid, monitor_pid=os.getpid())))
    zygote.close()
    os.waitpid(zygote_pid, 0)
    started = set(children_of(os.getpid())) - before
    for pid in started:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not started


# --- the loop's timers: a connected idle child sleeps until the first is due ----------------------

def _child(now: float, **kw) -> SimpleNamespace:
    """What ``ConnectionChild._timers_due_in`` reads, for a connected child whose
    paho client last sent 10 s ago and last received 5 s ago."""
    client = SimpleNamespace(socket=lambda: object(), _keepalive=25, _last_msg_out=now - 10,
                             _last_bytes_received=now - 5, _ping_t=0)
    conn = SimpleNamespace(ping_seconds=5.0, keepalive=25)
    base = dict(status="connected", connack_deadline=None, client=client, conn=conn, stall_after=None,
                last_traffic=now - 5, paused_at=None)
    return SimpleNamespace(**{**base, **kw})


def _due_in(child: SimpleNamespace, now: float) -> float:
    return ConnectionChild._timers_due_in(child, now) - TIMER_SLACK


def test_an_idle_connected_child_sleeps_until_its_keepalive_ping_is_due():
    now = time.monotonic()
    # paho pings keepalive s after the older of its last packet out and last byte in.
    assert _due_in(_child(now), now) == pytest.approx(15)
    assert TICK >= 25  # no fixed tick wakes it sooner


def test_an_unanswered_ping_a_stall_and_a_connack_deadline_wake_it_when_due():
    now = time.monotonic()
    pinged = _child(now)
    pinged.client._ping_t = pinged.client._last_msg_out = pinged.client._last_bytes_received = now - 1
    assert _due_in(pinged, now) == pytest.approx(4)  # ping_seconds after the ping
    assert _due_in(_child(now, stall_after=12.0), now) == pytest.approx(7)
    assert _due_in(_child(now, status="connecting", connack_deadline=now + 3), now) == pytest.approx(3)


def test_a_paused_child_still_looks_at_its_path_every_second():
    now = time.monotonic()
    assert ConnectionChild._timers_due_in(_child(now, paused_at=now - 2), now) == 1.0


def test_an_overdue_timer_wakes_it_at_once_but_never_before_it_is_due():
    now = time.monotonic()
    late = _child(now)
    late.client._last_msg_out = now - 26
    assert ConnectionChild._timers_due_in(late, now) == TIMER_SLACK
    assert connection.TIMER_SLACK > 0


def test_a_child_run_by_itself_reads_its_settings_from_the_database(stack):
    """``python -m services.connection --connection-id N`` reads the same settings
    query as the monitor (``connection_settings``), site name included; an id
    with no row is a plain error."""
    from shared import config

    cid = stack.sql.add_site("by-itself", port=4242, active=False)
    settings = config.load({"SITELINK_DATABASE_URL": stack.env["SITELINK_DATABASE_URL"]})
    conn = connection.load_settings_from_db(settings, cid)
    assert (conn.connection_id, conn.broker_port, conn.site_name) == (cid, 4242, "by-itself")
    with pytest.raises(SystemExit, match="no mqtt_connection with id"):
        connection.load_settings_from_db(settings, cid + 1000)
