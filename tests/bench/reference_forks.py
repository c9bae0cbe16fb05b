"""The floor under starting children: bare forks that connect and say so.

    python tests/bench/reference_forks.py --port 1883 --children 200

Issue 11's floor, built to be measured in the same run as sitelink: a parent
that has imported paho, pyzmq and msgpack (and nothing of sitelink) forks a
collector (one ZeroMQ PULL socket), then N children one after the other, as
fast as it can. Each child opens a ZeroMQ context and one PUSH socket to the collector,
connects a paho client to the broker, subscribes to one topic and, once the
broker has acknowledged the subscription, sends one msgpack message; then it
sleeps in paho's loop (woken by traffic or every 20 s, not paho's default
every second). No settings, no database, no status rows, no logs, no
connect-rate cap.

Prints one JSON line once all N have reported (or --timeout passed): the
seconds from the first fork to the last fork and to the last report, each
fork's duration per chunk of 250 (median and p90, ms, and the chunk's wall
time, s), and the children's pids, which stay alive, connected, until a line
arrives on stdin (so that their memory can be read); then it kills them and
exits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import statistics
import sys
import time

import msgpack
import paho.mqtt.client as mqtt
import zmq

CHUNK = 250
PR_SET_PDEATHSIG = 1


def child(port: int, endpoint: str, n: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    ctx = zmq.Context(1)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(endpoint)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"reference-fork-{n}")

    def on_connect(c, userdata, flags, reason, properties):
        c.subscribe(f"reference/{n}/#", qos=1)

    def on_subscribe(c, userdata, mid, reasons, properties):
        push.send(msgpack.packb({"n": n, "pid": os.getpid(), "at": time.time()}))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port, keepalive=60)
    # paho's default loop wakes every second (select's timeout of 1 s): 2000
    # such children are a core's worth of wake-ups on a VM, which made the
    # floor itself slow past 1000 children. Woken only by traffic, like
    # sitelink's child, whose timers are computed. paho sends its ping from
    # the loop: waking every 20 s, it is sent at most 80 s after the last
    # traffic, inside the broker's 1.5 x keepalive (90 s).
    client.loop_forever(timeout=20.0)


def collector(n: int, timeout: float, out: int) -> None:
    """Bind the PULL socket, write its port to ``out``, count the children's
    reports; then write how many came and when the last did (CLOCK_MONOTONIC,
    the same clock in every process)."""
    ctx = zmq.Context(1)
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    os.write(out, f"{port}\n".encode())
    reported: set[int] = set()
    last = None
    deadline = time.monotonic() + timeout
    while len(reported) < n and time.monotonic() < deadline:
        if pull.poll(500):
            reported.add(msgpack.unpackb(pull.recv())["n"])
            last = time.monotonic()
    os.write(out, (json.dumps({"connected": len(reported), "last": last}) + "\n").encode())
    os.read(0, 1)  # until the parent is done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--children", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()

    # The reports go to a process of their own: the connections a PULL socket
    # accepts (buffers, sessions) would grow the forking parent, and with it
    # the cost of each fork, by the children already forked.
    r, w = os.pipe()
    pids: list[int] = []
    helper = os.fork()
    if helper == 0:
        try:
            os.close(r)
            collector(args.children, args.timeout, w)
        finally:
            os._exit(0)
    os.close(w)
    answers = os.fdopen(r)
    endpoint = f"tcp://127.0.0.1:{int(answers.readline())}"
    forks: list[float] = []
    ends: list[float] = []
    t0 = time.monotonic()
    try:
        for n in range(args.children):
            t = time.monotonic()
            pid = os.fork()
            if pid == 0:
                try:
                    os.closerange(3, 1 << 20)  # nothing of the parent's (close_range(2): one call)
                    child(args.port, endpoint, n)
                finally:
                    os._exit(0)
            forks.append(time.monotonic() - t)
            ends.append(time.monotonic() - t0)
            pids.append(pid)
        last_fork = time.monotonic() - t0
        result = json.loads(answers.readline())
        all_connected = (result["last"] - t0 if result["connected"] == args.children and result["last"]
                         else None)
        chunks = []
        for k in range(0, len(forks), CHUNK):
            part = sorted(forks[k:k + CHUNK])
            last = k + len(part) - 1
            chunks.append({"from": k, "to": last, "median_ms": 1000 * statistics.median(part),
                           "p90_ms": 1000 * part[int(len(part) * 0.9)],
                           "wall_s": ends[last] - (ends[k - 1] if k else 0.0)})
        print(json.dumps({"children": args.children, "connected": result["connected"], "last_fork": last_fork,
                          "all_connected": all_connected, "forks": chunks, "pids": pids}), flush=True)
        sys.stdin.readline()
    finally:
        for pid in [*pids, helper]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in [*pids, helper]:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    main()
