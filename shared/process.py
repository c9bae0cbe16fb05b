"""Linux process controls the monitor and its children rely on (prctl)."""

from __future__ import annotations

import ctypes
import os
import resource
import time

import setproctitle

from shared import limits

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
#: Longest process title set (the kernel keeps what fits the original command line's room).
TITLE_CHARS = 120

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


def set_title(title: str, name: str) -> None:
    """Say who this process is: ``title`` is what ``ps -ef`` and ``top -c``
    show as its command line ("sitelink: conn 12 north-pier"), ``name`` what
    ``ps -o comm`` and ``top`` show (15 bytes). A title holds names from the
    database: non-printable characters are escaped, and it is cut short."""
    setproctitle.setproctitle(limits.printable(title)[:TITLE_CHARS])
    set_name(name)  # setproctitle sets the short name too, cut from the title: ours instead


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


def raise_fd_limit() -> int:
    """Lift our soft limit on open files to the hard limit; return the new soft limit.

    The logger holds a connection per child and the monitor's children
    inherit its limit: 1000 sites need more than the usual soft 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft
