"""The public status feed: one format, a snapshot for late joiners and gaps,
and the subscriber class users import (shared/feed.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import zmq

from shared import feed
from tests.support import ROOT, free_port, python_service, remove_tree, stop_process, wait_for


def test_a_body_round_trips_and_names_its_topic():
    body = {"type": "mqtt_status", "site_id": 3, "connection_id": 7, "status": "connected", "seq": 4,
            "publisher": "h/1.aa"}
    frames = feed.encode(body)
    assert frames[0] == b"mqtt_status.site.3.conn.7"
    assert feed.decode(frames) == {"v": feed.FEED_VERSION, **body}
    for bad in ([b"t"], [b"t", b"{"], [b"t", b"[]"], [b"t", json.dumps({"v": 99, "type": "x"}).encode()]):
        with pytest.raises(feed.FeedError):
            feed.decode(bad)


class FakeLogger:
    """A PUB and a snapshot ROUTER speaking the feed's protocol, served by a
    thread (snapshots, and a heartbeat every 20 ms), to cut gaps at will."""

    def __init__(self, incarnation: str = "fake/1.aa"):
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.feed_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.pub.bind(self.feed_endpoint)
        self.router = self.context.socket(zmq.ROUTER)
        self.snapshot_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.router.bind(self.snapshot_endpoint)
        self.publisher = feed.Publisher(self.pub, incarnation)
        self.state: dict[int, dict] = {}
        self.lock = threading.Lock()
        self.beating = True
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.wait(0.02):
            with self.lock:
                while self.router.poll(0):
                    identity, empty, _ = self.router.recv_multipart()
                    self.router.send_multipart([identity, empty,
                                                *self.publisher.snapshot_reply(self.state.values(), [])])
                if self.beating:
                    self.publisher.heartbeat(force=True)

    def change(self, cid: int, status: str, send: bool = True) -> None:
        with self.lock:
            body = {"type": "mqtt_status", "site_id": 1, "connection_id": cid, "status": status}
            self.state[cid] = body
            if send:
                self.publisher.publish(body)
            else:
                self.publisher.seq += 1  # published, but this subscriber never got it

    def restart(self, incarnation: str) -> None:
        with self.lock:
            self.publisher = feed.Publisher(self.pub, incarnation)  # seq from 1 again

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.pub.close(linger=0)
        self.router.close(linger=0)
        self.context.term()


@pytest.fixture
def fake():
    logger = FakeLogger()
    yield logger
    logger.close()


@pytest.fixture
def client(fake):
    c = feed.FeedClient(fake.feed_endpoint, fake.snapshot_endpoint)
    yield c
    c.close()


def start_live(client: feed.FeedClient) -> list[dict]:
    state = client.start()
    wait_for(lambda: client.poll(0.05) is not None and client.live, what="the subscription to carry messages")
    return state


def test_a_late_joiner_gets_the_state_then_the_changes_after_it(fake, client):
    fake.change(1, "connected")
    fake.change(2, "error")
    state = start_live(client)
    assert {b["connection_id"]: b["status"] for b in state} == {1: "connected", 2: "error"}
    fake.change(2, "connected")
    changes = wait_for(lambda: client.poll(0.1), what="the change")
    assert [(b["connection_id"], b["status"]) for b in changes] == [(2, "connected")]
    assert client.resyncs == 0


def test_a_gap_in_seq_makes_the_subscriber_take_a_new_snapshot(fake, client):
    fake.change(1, "connected")
    start_live(client)
    fake.change(1, "disconnected", send=False)  # lost on the way
    fake.change(2, "connected")
    changes = wait_for(lambda: client.poll(0.1), what="the resync")
    assert client.resyncs == 1
    assert {b["connection_id"]: b["status"] for b in changes} == {1: "disconnected", 2: "connected"}


def test_a_heartbeat_ahead_of_what_was_seen_reveals_a_lost_last_message(fake, client):
    fake.change(1, "connected")
    start_live(client)
    fake.change(1, "error", send=False)  # the last message, lost: only heartbeats follow
    changes = wait_for(lambda: client.poll(0.1), what="the resync")
    assert [b["status"] for b in changes] == ["error"] and client.resyncs == 1


def test_a_restarted_logger_is_a_new_publisher_and_is_snapshotted_again(fake, client):
    fake.change(1, "connected")
    start_live(client)
    fake.restart("fake/2.bb")
    fake.change(1, "disconnected")
    wait_for(lambda: client.poll(0.1) or client.connections[1]["status"] == "disconnected", what="the resync")
    assert client.connections[1]["status"] == "disconnected" and client.resyncs >= 1


def test_a_logger_that_does_not_answer_is_reported_and_tried_again(fake):
    client = feed.FeedClient(fake.feed_endpoint, f"tcp://127.0.0.1:{free_port()}", timeout=0.2)
    try:
        assert client.start() == [] and list(client.errors) and not client.live
    finally:
        client.close()


def test_the_order_postgresql_assigns_wins_over_arrival_across_hosts(client):
    client._apply({"type": "mqtt_status", "connection_id": 5, "status": "connected", "order": [3, 10]})
    assert not client._apply({"type": "mqtt_status", "connection_id": 5, "status": "error", "order": [2, 99]})
    assert client.connections[5]["status"] == "connected"
    assert client._apply({"type": "mqtt_status", "connection_id": 5, "status": "error", "order": [4, 1]})


# --- with the real logger -----------------------------------------------------------

def test_the_loggers_snapshot_holds_every_connection_and_device_and_the_feed_goes_on(stack, broker, publisher):
    quiet = stack.sql.add_site("feed-quiet", port=broker.port)
    busy = stack.sql.add_site("feed-busy", port=broker.port)
    stack.start("logger", "monitor")
    for cid in (quiet, busy):
        stack.sql.wait_status(cid, "connected")
    publisher.publish("sites/feed-busy/GW", {"gateway": "GW", "datalogger": "DL", "ts": 1795860000,
                                            "sensors": {"S": {"t": 1}}})
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM sensor"), what="the devices")
    client = feed.FeedClient(stack.env["SITELINK_STATUS_FEED"], stack.env["SITELINK_SNAPSHOT_ENDPOINT"])
    try:
        state = client.start()  # a late joiner on a quiet system: the state at once
        assert {b["connection_id"]: (b["status"], b["site"]) for b in state if b["type"] == "mqtt_status"} == {
            quiet: ("connected", "feed-quiet"), busy: ("connected", "feed-busy")}
        assert sorted(k for k, _ in client.devices) == ["datalogger", "gateway", "sensor"]
        assert all(b["site"] == "feed-busy" for b in client.devices.values())
        [site_data] = [b for b in state if b["type"] == "site_data"]
        assert site_data["last_data_at"]
        stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", quiet)
        wait_for(lambda: [b for b in client.poll(0.2) if b.get("connection_id") == quiet
                          and b["status"] == "disconnected"], what="the change on the feed")
        assert client.connections[quiet]["is_active"] is False and client.resyncs == 0
    finally:
        client.close()


def test_make_watch_prints_the_current_state_at_once_then_changes(stack, broker):
    cid = stack.sql.add_site("watched", port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    env = {**stack.env, "PYTHONUNBUFFERED": "1"}
    watcher = subprocess.Popen([sys.executable, "-m", "services.admin", "watch", "--seconds", "30"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, text=True)
    try:
        lines = []

        def read_until(text):
            while True:
                line = watcher.stdout.readline()
                lines.append(line)
                if text in line or not line:
                    return text in line
        assert read_until('"status": "connected"')  # the state, before any change
        assert any(line.startswith("mqtt_status.site.") and f'"connection_id": {cid}' in line for line in lines)
        stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
        assert read_until('"status": "disconnected"')
    finally:
        watcher.terminate()
        watcher.wait(10)


def test_a_fleet_of_two_hosts_is_followed_through_every_hosts_feed(stack, broker, tmp_path):
    """Two hosts (each its logger, feed and snapshot endpoint, one PostgreSQL):
    one FeedClient sees every connection; when host b stops and host a takes
    its connections over, each connection ends connected on the subscriber's
    side, whichever host's message arrives last (PostgreSQL's order decides)."""
    ids = [stack.sql.add_site(f"fleet-feed-{i}", port=broker.port, stall_after=None) for i in range(4)]
    stack.start("logger", "monitor", SITELINK_INSTANCE_ID="a", SITELINK_CLAIM_LEASE="6")
    run_b = Path(tempfile.mkdtemp(prefix="sl-b-"))
    env_b = {**stack.env, "SITELINK_INSTANCE_ID": "b", "SITELINK_HOME": str(tmp_path / "host-b"),
             "SITELINK_RUNTIME_DIR": str(run_b), "SITELINK_EVENTS_ENDPOINT": f"ipc://{run_b}/events.sock",
             "SITELINK_STATUS_FEED": f"tcp://127.0.0.1:{free_port()}",
             "SITELINK_SNAPSHOT_ENDPOINT": f"tcp://127.0.0.1:{free_port()}"}
    host_b = [python_service("logger", env_b, tmp_path / "logger-b.out"),
              python_service("monitor", env_b, tmp_path / "monitor-b.out")]
    client = feed.FeedClient([stack.env["SITELINK_STATUS_FEED"], env_b["SITELINK_STATUS_FEED"]],
                             [stack.env["SITELINK_SNAPSHOT_ENDPOINT"], env_b["SITELINK_SNAPSHOT_ENDPOINT"]])
    try:
        wait_for(lambda: sorted(r["claimed_by"] for r in stack.sql.rows(
            "SELECT claimed_by FROM mqtt_connection WHERE status = 'connected'")) == ["a", "a", "b", "b"],
            timeout=30, what="two connections on each host")
        client.start()
        wait_for(lambda: client.poll(0.1) is not None and client.live, what="both hosts' feeds")
        assert {c: b["status"] for c, b in client.connections.items()} == {c: "connected" for c in ids}
        assert len({b["publisher"] for b in client.connections.values()}) == 1  # a snapshot holds the fleet
        stop_process(host_b.pop())  # b's monitor stops cleanly: a takes its two over at once
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection WHERE claimed_by = 'a' "
                                         "AND status = 'connected'") == 4, timeout=30, what="a to run all four")

        def all_connected_on_the_feed():
            client.poll(0.1)
            return all(client.connections[c]["status"] == "connected" for c in ids)
        wait_for(all_connected_on_the_feed, timeout=15, what="every connection connected on the feed")
        publishers = {b["publisher"] for b in client.connections.values()}
        assert len(publishers) >= 1 and all(b["order"] for b in client.connections.values())
    finally:
        client.close()
        for proc in host_b:
            stop_process(proc)
        remove_tree(run_b)


def test_a_snapshot_replaces_the_state_and_says_what_is_gone(fake, client):
    fake.change(1, "connected")
    fake.change(2, "connected")
    start_live(client)
    with fake.lock:
        del fake.state[2]  # the row was deleted: no feed message says so
    fake.change(1, "error", send=False)  # a gap: the next message makes the client look again
    fake.change(1, "connected")
    changes = wait_for(lambda: client.poll(0.1), what="the resync")
    assert {"connection_id": 2, "removed": True}.items() <= next(
        b for b in changes if b["connection_id"] == 2).items()
    assert list(client.connections) == [1]
