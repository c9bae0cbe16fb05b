"""A connection-attempt rate shared by all the children of one monitor.

When a broker restarts, every connection to it fails together; jitter spreads
their retries, and this limit caps how many attempts per second the children
of one monitor make in total. The state is one number in a small file (the
earliest free slot on the system-wide monotonic clock), updated under an
exclusive ``flock``: no process to ask, nothing to clean up if a child dies.
"""

from __future__ import annotations

import fcntl
import os
import struct
import tempfile
import time
from pathlib import Path

_SLOT = struct.Struct("d")


def create(directory: Path | None = None) -> Path:
    """A new, empty slot file (the monitor makes one per run and removes it after)."""
    fd, name = tempfile.mkstemp(prefix="sitelink-attempts-", dir=directory)
    os.close(fd)
    return Path(name)


class AttemptSlots:
    def __init__(self, path: str | os.PathLike, per_second: float):
        self.interval = 1.0 / per_second
        self._fd = os.open(path, os.O_RDWR)

    def reserve(self) -> float:
        """Book the next free slot; return the monotonic time at which it starts."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self._fd, _SLOT.size, 0)
            next_free = _SLOT.unpack(raw)[0] if len(raw) == _SLOT.size else 0.0
            # CLOCK_MONOTONIC is one clock for every process of this boot.
            slot = max(time.monotonic(), next_free)
            os.pwrite(self._fd, _SLOT.pack(slot + self.interval), 0)
            return slot
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)
