"""Hostile bytes, hostile neighbours: whatever reaches the logger's socket or a
child's broker connection, the good traffic of every site is stored meanwhile,
no process restarts, and each bad thing leaves a clear row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
import zmq

from shared import protocol
from shared.protocol import Ack, Data, Envelope, Refusal
from tests import hostile
from tests.hostile import doc, pack
from tests.support import (Publisher, SteadyPublisher, alive, comm, free_port, memory_kib, monitor_children,
                           one_line_log, wait_for)


def processes(stack) -> dict[str, int | list[int]]:
    return {"logger": stack.pid("logger"), "monitor": stack.pid("monitor"),
            "children": sorted(monitor_children(stack))}


def assert_nothing_restarted(stack, before) -> None:
    assert processes(stack) == before
    assert alive(before["logger"]) and alive(before["monitor"])


def two_sites(stack, broker, **env):
    north = stack.sql.add_site("h-north", port=broker.port, stall_after=None)
    south = stack.sql.add_site("h-south", port=broker.port, stall_after=None)
    stack.start("logger", "monitor", **env)
    for cid in (north, south):
        stack.sql.wait_status(cid, "connected")
    wait_for(lambda: len(monitor_children(stack)) == 2, what="two children")
    return north, south


def all_good_readings_stored(stack, traffic: SteadyPublisher, sites: int = 2) -> None:
    per_site = traffic.stop()
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == sites * per_site, timeout=30,
             what=f"all {sites * per_site} good readings")


@pytest.fixture
def hostile_socket(stack):
    context = zmq.Context()
    sockets = []

    def make():
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(stack.env["SITELINK_EVENTS_ENDPOINT"])
        sockets.append(sock)
        return sock
    yield make
    for sock in sockets:
        sock.close(linger=0)
    context.term()


def test_hostile_frames_stop_nothing_and_every_sender_that_can_be_told_is(stack, broker, hostile_socket):
    north, south = two_sites(stack, broker)
    before = processes(stack)
    traffic = SteadyPublisher(broker.port, ["h-north", "h-south"])
    sock = hostile_socket()
    try:
        cases = hostile.envelopes(north, south)
        told: dict[str, int] = {}  # incarnation -> the seq the logger must name as refused
        for k, (_, raw, attributable) in enumerate(cases):
            raw["i"] = f"666.case{k}"
            sock.send(pack(raw))
            if attributable:
                told[raw["i"]] = raw["n"]
        for _, raw in hostile.unattributable():
            sock.send(pack(raw))
        bad_messages = hostile.frames()
        for _, parts in bad_messages:
            sock.send_multipart(parts)
        sock.send(pack(doc(cid=999_999, i="666.ghost", n=1)))  # a connection that does not exist
        told["666.ghost"] = 1
        # A frame over the wire's limit: ZeroMQ itself drops that peer.
        hostile_socket().send(b"\x00" * (protocol.MAX_FRAME_BYTES + 1))

        refused: dict[str, set[int]] = {}
        refusals = []

        def answered():
            while sock.poll(0):
                reply = protocol.decode_reply(sock.recv())
                if isinstance(reply, Refusal):
                    refusals.append(reply.reason)
                else:
                    refused.setdefault(reply.incarnation, set()).update(seq for seq, _ in reply.refused)
            return all(seq in refused.get(i, ()) for i, seq in told.items()) and len(refusals) >= len(bad_messages)
        wait_for(answered, timeout=30, what="an answer to every hostile sender that can be told")

        # A sequence number far beyond what a known stream stored is no real sender's.
        sock.send(pack(doc(cid=north, i="666.stream", n=1)))
        wait_for(lambda: sock.poll(100) and protocol.decode_reply(sock.recv()).upto == 1, what="a normal ack")
        sock.send(pack(doc(cid=north, i="666.stream", n=2**62, f=1)))

        def far_refused():
            while sock.poll(0):
                reply = protocol.decode_reply(sock.recv())
                if isinstance(reply, Ack) and any(seq == 2**62 for seq, _ in reply.refused):
                    return True
            return False
        wait_for(far_refused, what="the far sequence number refused")

        all_good_readings_stored(stack, traffic)
        assert_nothing_restarted(stack, before)
    finally:
        traffic.close()
    rows = stack.sql.rows("SELECT message FROM mqtt_connection_log WHERE connection_id = %s "
                          "AND message LIKE 'refused an event%%'", north)
    # Every refusal about the north connection is a row of its log (a monitor's cycle is about none).
    about_north = [raw for _, raw, attributable in cases if attributable and (
        raw["s"] == f"conn:{north}" or isinstance(raw["b"], dict) and raw["b"].get("connection_id") == north)]
    assert len(rows) >= len(about_north)
    assert all(r["message"].isprintable() for r in rows)
    one_line_log(stack.log_dir / "mqtt_connections.log")
    # No forged status froze a row: the connection still follows what happens.
    stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", north)
    stack.sql.wait_status(north, "disconnected")
    stack.sql.rows("UPDATE mqtt_connection SET is_active = true WHERE id = %s", north)
    stack.sql.wait_status(north, "connected")


PAYLOAD_LIMIT = 8192
HOSTILE_PAYLOADS = hostile.payloads(PAYLOAD_LIMIT)


def test_hostile_payloads_become_rows_and_the_connection_keeps_running(stack, broker):
    north, _ = two_sites(stack, broker, SITELINK_MAX_PAYLOAD=str(PAYLOAD_LIMIT))
    before = processes(stack)
    traffic = SteadyPublisher(broker.port, ["h-north", "h-south"])
    publisher = Publisher(broker.port)
    try:
        for name, payload, _ in HOSTILE_PAYLOADS:
            publisher.publish(f"sites/h-north/{name.replace(' ', '-')}", payload)
        rows = wait_for(lambda: len(r := stack.sql.rows(
            "SELECT * FROM mqtt_parsing_log WHERE connection_id = %s ORDER BY id", north)) >= len(HOSTILE_PAYLOADS)
            and r, timeout=30, what="a parsing-log row for every hostile payload")
        all_good_readings_stored(stack, traffic)
        assert_nothing_restarted(stack, before)
    finally:
        traffic.close()
        publisher.close()
    by_topic = {r["topic"].rsplit("/", 1)[1]: r for r in rows}
    quarantine = {r["parsing_log_id"]: r for r in stack.sql.rows("SELECT * FROM mqtt_quarantine")}
    for name, payload, error_type in HOSTILE_PAYLOADS:
        row = by_topic[name.replace(" ", "-")]
        assert row["error_type"] == error_type, (name, row["error_message"])
        assert row["payload_sample"] is not None and row["error_message"].isprintable()
        kept = quarantine[row["id"]]
        assert (kept["topic"], kept["error_type"], kept["payload_bytes"]) == (row["topic"], error_type, len(payload))
        if len(payload) > PAYLOAD_LIMIT:
            assert row["payload_sample"]["bytes"] == len(payload) and row["payload_sample"]["truncated"]
            assert "SITELINK_MAX_PAYLOAD" in row["error_message"]
            assert not kept["replayable"] and payload.startswith(kept["payload"])  # its beginning (up to 64 KiB)
        else:  # kept whole, byte for byte, for a replay
            assert kept["replayable"] and kept["payload"] == payload, name
    assert len(one_line_log(stack.log_dir / "mqtt_parsing.log")) == len(rows)


VALID_BIG = 200


def test_a_childs_memory_stays_bounded_whatever_it_receives(stack, broker):
    """A retained 64 MB message, more giants while connected, and big valid
    messages while the logger is behind: the child's peak resident memory stays
    within a few MiB of an idle child's (README, "Security and limits")."""
    giant = b"{" + b" " * (64 * 2**20) + b"}"
    publisher = Publisher(broker.port)
    publisher.client.publish("sites/h-big/retained", giant, qos=1, retain=True).wait_for_publish(30)
    try:
        big = stack.sql.add_site("h-big", port=broker.port, stall_after=None)
        idle = stack.sql.add_site("h-idle", port=broker.port, stall_after=None)
        stack.start("logger", "monitor", SITELINK_MAX_UNACKED_BYTES=str(4 * 2**20))
        for cid in (big, idle):
            stack.sql.wait_status(cid, "connected")
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_parsing_log WHERE connection_id = %s", big),
                 timeout=60, what="the retained giant recorded")
        for n in range(3):
            publisher.publish(f"sites/h-big/giant-{n}", b"[" + b"1," * (10 * 2**20) + b"1]")
        # Valid messages of 200 KB (about 4000 values each): with the logger
        # stopped, the child holds them until its byte limit, then reads no more.
        os.kill(stack.pid("logger"), signal.SIGSTOP)
        sensors = {f"S{i}": {f"m{j}": float(j) for j in range(40)} for i in range(100)}
        for n in range(VALID_BIG):
            publisher.client.publish("sites/h-big/valid", json.dumps(
                {"gateway": "G", "ts": 1795860000 + n, "sensors": sensors}), qos=1)
        [child_big] = [p for p in monitor_children(stack) if comm(p) == f"sitelink-c{big}"]
        [child_idle] = [p for p in monitor_children(stack) if p != child_big]
        os.kill(stack.pid("logger"), signal.SIGCONT)
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_parsing_log WHERE connection_id = %s", big) >= 4,
                 timeout=60, what="every giant recorded")
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading r JOIN sensor s ON s.id = r.sensor_id "
                                         "JOIN gateway g ON g.id = s.gateway_id WHERE g.site_id = "
                                         "(SELECT site_id FROM mqtt_connection WHERE id = %s)", big)
                 == VALID_BIG * 100,
                 timeout=60, what="every valid big message stored")
        peak_big, peak_idle = memory_kib(child_big, "VmHWM"), memory_kib(child_idle, "VmHWM")
        assert peak_big - peak_idle < 24 * 1024, f"peak {peak_big} KiB vs an idle child's {peak_idle} KiB"
    finally:
        publisher.client.publish("sites/h-big/retained", b"", qos=1, retain=True).wait_for_publish(10)
        publisher.close()


def test_only_sitelinks_user_can_open_the_logger_socket(stack):
    stack.start("logger")
    path = stack.runtime_dir / "events.sock"
    wait_for(path.exists, what="the logger's socket")
    mode = stack.runtime_dir.stat().st_mode & 0o777
    assert mode == 0o700, oct(mode)
    if os.geteuid() != 0:
        pytest.skip("needs root to try as another user")
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\nsys.exit(0)\n")
    result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                             "-c", probe, str(path)], capture_output=True, timeout=30)
    assert result.returncode == 13, result.stderr


def test_on_tcp_only_clients_with_the_installations_key_get_through(stack, broker):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cid = stack.sql.add_site("h-curve", port=broker.port, stall_after=None)
    stack.start("logger", "monitor", SITELINK_EVENTS_ENDPOINT=endpoint)
    stack.sql.wait_status(cid, "connected")  # the monitor and the child hold the key
    keys = stack.runtime_dir / "curve"
    assert keys.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in keys.iterdir() if f.name.endswith(".secret"))
    context = zmq.Context()
    intruders = []
    try:
        plain = context.socket(zmq.DEALER)
        stranger = context.socket(zmq.DEALER)
        stranger.curve_serverkey = zmq.curve_public((keys / "logger.secret").read_bytes().strip())
        stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
        for sock in (plain, stranger):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            forged = Envelope(sender=f"conn:{cid}", incarnation="666.forged", seq=1, floor=0, ts=1795860000.0,
                              event=Data(connection_id=cid, topic="t", gateway="FORGED", ts=1795860000.0,
                                         sensors={"S": {"t": 1.0}}))
            sock.send(protocol.encode(forged))
            intruders.append(sock)
        publisher = Publisher(broker.port)
        publisher.publish("sites/h-curve/GW", {"gateway": "GW", "ts": 1795860000, "sensors": {"S": {"t": 1}}})
        publisher.close()
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM gateway WHERE name = 'GW'"), what="the real reading")
        assert not any(sock.poll(0) for sock in intruders)  # nobody answered them
        assert stack.sql.value("SELECT count(*) FROM gateway WHERE name = 'FORGED'") == 0
    finally:
        for sock in intruders:
            sock.close(linger=0)
        context.term()


def test_a_topic_that_is_not_utf8_is_a_parse_error():
    from services.connection import _topic
    message = mqtt.MQTTMessage(mid=1, topic=b"sites/x/\xff\xfe")
    assert _topic(message) == ("sites/x/\\xff\\xfe", False)
    assert _topic(mqtt.MQTTMessage(mid=1, topic="sites/é".encode())) == ("sites/é", True)
