"""Linux process controls the monitor and its children rely on (prctl)."""

from __future__ import annotations

import ctypes
import os
import time

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _call(option: int, value: int | bytes) -> bool:
    if _prctl is None:
        return False
    return _prctl(option, value, 0, 0, 0) == 0


def become_subreaper() -> bool:
    """Adopt orphaned descendants (children forked by the zygote) so we reap them."""
    return _call(PR_SET_CHILD_SUBREAPER, 1)


def set_name(name: str) -> None:
    """The name ``ps -o comm`` and ``top`` show (15 bytes at most)."""
    _call(PR_SET_NAME, name.encode()[:15])


def die_with(parent_pid: int, sig: int, wait: float = 2.0) -> bool:
    """Be signalled with ``sig`` when ``parent_pid``, our parent, dies, even by SIGKILL.

    A child forked by the zygote becomes the monitor's child only once the
    intermediate process exits, so this first waits (up to ``wait`` s) for
    that re-parenting. Returns False if ``parent_pid`` is not, or no longer,
    our parent: the caller must exit then, since the signal will never come.
    """
    deadline = time.monotonic() + wait
    while os.getppid() != parent_pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    _call(PR_SET_PDEATHSIG, sig)
    return os.getppid() == parent_pid  # it may have died before the prctl
