"""The sender's side of the wire, against a real ZeroMQ ROUTER standing in for
the logger (no processes): frames within the wire's limit, refusals heard."""

from __future__ import annotations

import time

import pytest
import zmq

from shared import protocol
from shared.events import EventSender, EventTooLarge
from shared.protocol import Ack, Data, ParseFailure, Refusal
from tests.support import wait_for


@pytest.fixture
def logger_socket(tmp_path):
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/e.sock"
    router.bind(endpoint)
    sender = EventSender(context, endpoint, "conn:1", resend_after=0.2)
    yield router, sender
    sender.close()
    router.close(linger=0)
    context.term()


def received(router, count):
    """(identity, items) for each frame until ``count`` envelopes arrived."""
    frames, seen = [], 0

    def more():
        nonlocal seen
        while router.poll(0):
            identity, frame = router.recv_multipart()
            assert len(frame) <= protocol.MAX_FRAME_BYTES
            items = protocol.decode_events(frame)
            frames.append((identity, items))
            seen += len(items)
        return seen >= count
    wait_for(more, what=f"{count} envelopes")
    return frames


def big_data(n):
    sensors = {f"sensor-{i:04d}-{'x' * 100}": {f"metric-{j:03d}-{'y' * 100}": float(j) for j in range(9)}
               for i in range(900)}  # about 1.1 MB packed
    return Data(connection_id=1, topic="t", gateway="GW", ts=time.time() - n, sensors=sensors)


def test_deferred_events_are_split_into_frames_within_the_wire_limit(logger_socket):
    router, sender = logger_socket
    for n in range(8):
        sender.send(big_data(n), defer=True)
    assert sender.unacked == 8 and sender.unacked_bytes > 2 * protocol.MAX_FRAME_BYTES
    sender.flush_deferred()
    frames = received(router, 8)
    assert len(frames) >= 3
    seqs = [item.seq for _, items in frames for item in items]
    assert seqs == list(range(1, 9))


def test_an_event_no_frame_can_hold_is_refused_before_it_takes_a_number(logger_socket):
    router, sender = logger_socket
    huge = ParseFailure(connection_id=1, topic="t" * 5_000_000, parser_name="json", error_type="PARSE_ERROR",
                        error_message="m", payload=b"")
    with pytest.raises(EventTooLarge):
        sender.send(huge)
    assert sender.send(big_data(0)) == 1  # no gap in the sequence


def test_an_ack_with_refusals_moves_the_window_and_resend_asks_for_everything(logger_socket):
    router, sender = logger_socket
    for n in range(3):
        sender.send(big_data(n))
    [(identity, _), *_] = received(router, 3)
    router.send_multipart([identity, protocol.encode(Ack(sender.incarnation, 2, refused=((2, "bad"),)))])
    wait_for(lambda: sender.receive_acks() == 2, what="the ack")
    assert sender.unacked == 1 and sender.refused == 1
    router.send_multipart([identity, protocol.encode(Ack(sender.incarnation, 2, resend=True))])
    wait_for(lambda: (sender.receive_acks(), router.poll(0))[1], what="the resend")
    [(_, items)] = received(router, 1)
    assert [i.seq for i in items] == [3]


def test_a_forged_ack_beyond_what_was_sent_acknowledges_nothing_more(logger_socket):
    router, sender = logger_socket
    sender.send(big_data(0))
    sender.send(big_data(1))
    [(identity, _), *_] = received(router, 2)
    router.send_multipart([identity, protocol.encode(Ack(sender.incarnation, 2**62))])
    wait_for(lambda: sender.receive_acks() == 2, what="the ack")
    assert sender.acked == 2 and sender.send(big_data(2)) == 3


def test_replies_that_are_not_acks_are_survived(logger_socket):
    router, sender = logger_socket
    sender.send(big_data(0))
    [(identity, _)] = received(router, 1)
    for junk in (b"\xc1", b"", protocol.encode(Refusal("no")), b"x" * 1000):
        router.send_multipart([identity, junk])
    router.send_multipart([identity, protocol.encode(Ack(sender.incarnation, 1))])
    wait_for(lambda: sender.receive_acks() == 1, what="the real ack after the junk")
