"""The logger's status lane: a status change is stored and published before the
data batch it arrived behind, and nothing of that batch is lost or reordered."""

from __future__ import annotations

import time

import psycopg

from shared import protocol
from shared.protocol import Ack, Data, Envelope, StatusChange
from tests.support import logger_client, wait_for

BASE_TS = 1795860000  # 2026-11-28T10:00:00Z
READINGS = 50


def _joined_feed(stack):
    """A feed subscriber, joined once a heartbeat arrives: nothing published after it is missed."""
    feed = stack.feed()
    wait_for(lambda: feed.socket.poll(0) and feed.socket.recv_multipart(), timeout=30, what="a feed heartbeat")
    return feed


def _sender(sock, cid: int, incarnation: str):
    def send(seq, event):
        sock.send(protocol.encode(Envelope(sender=f"conn:{cid}", incarnation=incarnation, seq=seq, floor=0,
                                           ts=time.time(), event=event)))
    return send


def _send_readings(send, cid: int) -> None:
    for n in range(1, READINGS + 1):
        send(n, Data(connection_id=cid, topic="t", gateway="GW", ts=BASE_TS + n, datalogger="DL",
                     sensors={"S": {"n": float(n)}}))


def _status_comes_first(stack, feed, send, cid: int) -> None:
    """A status sent behind the readings is stored and published while none of them is stored."""
    send(READINGS + 1, StatusChange(connection_id=cid, status="connected", message="up"))
    _, body = feed.wait_for(lambda t, b: b.get("type") == "mqtt_status" and b["connection_id"] == cid,
                            what="the status on the feed")
    assert body["status"] == "connected"
    assert stack.sql.status(cid) == "connected"
    assert stack.sql.value("SELECT count(*) FROM reading") == 0


def test_a_status_change_is_stored_and_published_while_the_data_batch_is_held_back(stack):
    cid = stack.sql.add_site("lane", port=stack.broker.port, active=False)
    # The data batch cannot be due before the logger stops: it waits to be filled.
    stack.start("logger", SITELINK_BATCH_WAIT="3600", SITELINK_BATCH_MAX="100000")
    feed = _joined_feed(stack)
    with logger_client(stack.env["SITELINK_EVENTS_ENDPOINT"]) as sender:
        send = _sender(sender, cid, "lane-1")
        _send_readings(send, cid)
        _status_comes_first(stack, feed, send, cid)
        # Behind it, the data batch is still held: nothing of it is acknowledged either.
        uptos = []
        while sender.poll(0):
            message = protocol.decode_reply(sender.recv())
            if isinstance(message, Ack):
                uptos.append(message.upto)
        assert all(upto == 0 for upto in uptos)

        # On SIGTERM the logger stores the held batch: every reading once, the floor past the status.
        stack.stop("logger")
    assert stack.sql.value("SELECT count(*) FROM reading") == READINGS
    assert stack.sql.value("SELECT committed_upto FROM sitelink_stream WHERE sender = %s AND incarnation = %s",
                           f"conn:{cid}", "lane-1") == READINGS + 1
    assert stack.sql.status(cid) == "connected"


def test_a_status_is_published_while_postgresql_is_still_writing_a_data_batch(stack):
    """Data batches are written by a thread and a connection of their own: a
    status change that arrives while PostgreSQL writes one (here: held by a
    lock a user took on ``reading``) is stored and published at once, and
    the batch then lands whole, with its sender's floor past both."""
    cid = stack.sql.add_site("writing", port=stack.broker.port, active=False)
    stack.start("logger")
    feed = _joined_feed(stack)
    blocker = psycopg.connect(stack.sql.url)
    try:
        blocker.execute("LOCK TABLE reading IN SHARE MODE")  # INSERTs wait until it commits
        with logger_client(stack.env["SITELINK_EVENTS_ENDPOINT"]) as sender:
            send = _sender(sender, cid, "writing-1")
            _send_readings(send, cid)
            wait_for(lambda: stack.sql.value(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sitelink-logger-data' "
                "AND wait_event_type = 'Lock'") == 1, timeout=30, what="the data batch waiting on the lock")

            _status_comes_first(stack, feed, send, cid)

            blocker.commit()
            wait_for(lambda: stack.sql.value("SELECT count(*) FROM reading") == READINGS, timeout=30,
                     what="the data batch stored")
            # The status lane committed #51 while #1-#50 were being written: the
            # floor still reaches past both, so a restart stores neither again.
            wait_for(lambda: stack.sql.value(
                "SELECT committed_upto FROM sitelink_stream WHERE sender = %s AND incarnation = %s",
                f"conn:{cid}", "writing-1") == READINGS + 1, timeout=30, what="the floor past the status")
    finally:
        blocker.close()
    assert stack.sql.status(cid) == "connected"


def test_the_statuses_of_a_burst_share_a_commit(stack):
    """A thousand children starting at once send a thousand statuses: the logger
    stores those already queued together (one transaction, one fsync), not one
    commit each, which made PostgreSQL's commits the bound of a start-up."""
    ids = [stack.sql.add_site(f"burst-{n}", port=stack.broker.port, active=False) for n in range(20)]
    with logger_client(stack.env["SITELINK_EVENTS_ENDPOINT"]) as sender:
        # Queued by ZeroMQ until the logger listens, then delivered together.
        for n, cid in enumerate(ids):
            sender.send(protocol.encode(Envelope(sender=f"conn:{cid}", incarnation=f"burst-{n}", seq=1, floor=0,
                                                 ts=time.time(), event=StatusChange(connection_id=cid,
                                                                                    status="connected",
                                                                                    message="up"))))
        stack.start("logger")
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection WHERE id = ANY(%s) "
                                         "AND status = 'connected'", ids) == len(ids),
                 timeout=30, what="every status stored")
    # Rows written by one transaction carry its id (xmin).
    assert stack.sql.value("SELECT count(DISTINCT xmin::text) FROM mqtt_connection WHERE id = ANY(%s)", ids) == 1


def test_statuses_arriving_one_by_one_in_a_burst_share_commits(stack):
    """Hundreds of children starting send their statuses a few ms apart, never
    queued together: once the logger sees a burst by its rate, it waits
    briefly for more (URGENT_LINGER) instead of paying a commit for each."""
    ids = [stack.sql.add_site(f"trickle-{n}", port=stack.broker.port, active=False) for n in range(101)]
    stack.start("logger")

    def connected(n: int, cid: int) -> bytes:
        return protocol.encode(Envelope(sender=f"conn:{cid}", incarnation=f"trickle-{n}", seq=1, floor=0,
                                        ts=time.time(), event=StatusChange(connection_id=cid, status="connected",
                                                                           message="up")))
    with logger_client(stack.env["SITELINK_EVENTS_ENDPOINT"]) as sender:
        # The first one stored: the logger reads as they come, nothing queued for it.
        sender.send(connected(0, ids[0]))
        wait_for(lambda: stack.sql.status(ids[0]) == "connected", timeout=30, what="the first status stored")
        start = time.monotonic()
        for n, cid in enumerate(ids[1:], 1):
            while time.monotonic() < start + n * 0.002:  # one every 2 ms on average, as a start brings
                time.sleep(0.0005)
            sender.send(connected(n, cid))
        wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection WHERE id = ANY(%s) "
                                         "AND status = 'connected'", ids) == len(ids),
                 timeout=30, what="every status stored")
    # Rows written by one transaction carry its id (xmin). The last 60 arrived
    # over some 120 ms, well into the burst: a handful of commits, not one each.
    commits = stack.sql.value("SELECT count(DISTINCT xmin::text) FROM mqtt_connection WHERE id = ANY(%s)", ids[41:])
    assert commits <= 15
