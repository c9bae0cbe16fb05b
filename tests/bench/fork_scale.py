"""How a bare fork's cost grows with the children already forked, on this machine.

Not a pytest benchmark: ``.venv/bin/python tests/bench/fork_scale.py 2000``.
A parent that has imported what a sitelink child imports (and touched some
heap, as a preloaded zygote has) forks N children one after the other;
each child touches about 1.5 MiB and sleeps until the parent exits. Prints
the fork's median and p90 per 250 children. On the Xeon VM of 2026-12-02 the
fork cost 0.8-0.9 ms up to 1500-1750 children, then 1.3-1.5 ms (p90
13-15 ms). The benches now measure the floor in the same run with
tests/bench/reference_forks.py (children the size of sitelink's, connected);
this loop stays for looking at the fork alone.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import msgpack  # noqa: F401  (a parent of a child's size)
import paho.mqtt.client  # noqa: F401
import zmq  # noqa: F401

CHUNK = 250


def main(n: int) -> None:
    ballast = [bytearray(4096) for _ in range(5000)]  # about 20 MiB of touched heap  # noqa: F841
    r, w = os.pipe()
    children, times = [], []
    for _ in range(n):
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            touched = [bytearray(1024) for _ in range(1500)]  # noqa: F841
            os.close(w)
            os.read(r, 1)  # until the parent exits
            os._exit(0)
        times.append(time.perf_counter() - t)
        children.append(pid)
    os.close(w)
    for k in range(0, len(times), CHUNK):
        chunk = sorted(times[k:k + CHUNK])
        print(f"children {k:5d}-{k + len(chunk) - 1:5d}: fork median {statistics.median(chunk) * 1000:.2f} ms, "
              f"p90 {chunk[int(len(chunk) * 0.9)] * 1000:.2f} ms")
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
