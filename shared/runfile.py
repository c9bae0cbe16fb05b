"""Files a monitor shares with every process it runs (its zygote and children).

``InstanceLock``: one file per instance id and database under the runtime
directory. The monitor takes it with ``flock(LOCK_EX)``, and its zygote and
children inherit that one open file description, so the lock is free again
only once the monitor and every process it started have exited. A new
monitor of the same instance id on this host whose ``LOCK_EX | LOCK_NB``
succeeds knows that no process of an earlier one still holds a broker
connection: it may take the earlier one's claims back at once instead of
waiting out their lease.

``RunState``: a file without a name (nothing is left behind, however the
monitor ends) holding two numbers:

- the earliest free connection-attempt slot (CLOCK_MONOTONIC), so that all
  the children of one monitor share one attempt rate;
- the fence: until when (``clock()``) the monitor's claims may be trusted.
  A child checks it on every tick and before every connection attempt and,
  past it, disconnects and exits with ``exitcodes.FENCED``: a monitor frozen
  (SIGSTOP) or cut off from PostgreSQL cannot stop its children in time, so
  they stop themselves.

Every process opens the state file anew through /proc/self/fd: ``flock``
belongs to an open file description, so each process needs its own for the
lock to exclude the others.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import struct
import time
from pathlib import Path

#: The file holds two of these: the next free attempt slot, then the fence.
_VALUE = struct.Struct("d")
_FENCE_OFFSET = _VALUE.size


def clock() -> float:
    """The lease's clock: CLOCK_BOOTTIME, one clock for every process of this
    boot that, unlike CLOCK_MONOTONIC, goes on counting while the machine is
    suspended (a lease must not survive a night of suspend)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can open: created 0700 if
    missing; an existing one must already be this user's and closed to others
    (it is never loosened nor tightened behind the operator's back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)  # made here: 0700 whatever the umask (which only takes bits away)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}): "
                              f"sitelink's runtime directory must be its own")
    if st.st_mode & 0o077:
        raise PermissionError(f"{path} is open to other users (mode {st.st_mode & 0o7777:04o}): "
                              f"make it 0700 or choose another SITELINK_RUNTIME_DIR")
    return path


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


class InstanceLock:
    """The lock every process of one monitor holds (see the module's docstring)."""

    def __init__(self, directory: Path, database_url: str, instance_id: str):
        private_dir(directory)
        # Named by a digest: instance ids are free text, and the URL may hold a password.
        digest = hashlib.sha256(f"{database_url}\0{instance_id}".encode()).hexdigest()[:20]
        self.path = directory / f"monitor-{digest}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> bool:
        """Take the lock if no process of any monitor of this instance holds it."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @property
    def key(self) -> str:
        """Names this file on this boot of this host: a monitor that recorded the
        same key in PostgreSQL is gone once we hold the lock."""
        st = os.fstat(self.fd)
        return f"{socket.gethostname()}:{_boot_id()}:{st.st_dev}:{st.st_ino}"

    def close(self) -> None:
        os.close(self.fd)


class RunState:
    """The attempt slot and the fence (see the module's docstring)."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def create(cls, directory: Path) -> RunState:
        """A new, nameless state file (the monitor makes one per run)."""
        private_dir(directory)
        return cls(os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600))

    @classmethod
    def attach(cls, inherited_fd: int) -> RunState:
        """The state file of our monitor, through a descriptor inherited from it."""
        return cls(os.open(f"/proc/self/fd/{inherited_fd}", os.O_RDWR | os.O_CLOEXEC))

    def _read(self, offset: int) -> float:
        raw = os.pread(self.fd, _VALUE.size, offset)
        return _VALUE.unpack(raw)[0] if len(raw) == _VALUE.size else 0.0

    def reserve_attempt(self, per_second: float) -> float:
        """Book the next free attempt slot; return the monotonic time at which it starts."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            # CLOCK_MONOTONIC is one clock for every process of this boot.
            slot = max(time.monotonic(), self._read(0))
            os.pwrite(self.fd, _VALUE.pack(slot + 1.0 / per_second), 0)
            return slot
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def publish_fence(self, until: float) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            os.pwrite(self.fd, _VALUE.pack(until), _FENCE_OFFSET)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def fence(self) -> float:
        """Until when (``clock()``) our monitor's claims hold; 0 before it published any."""
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        try:
            return self._read(_FENCE_OFFSET)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)
