"""The states of a connection, as its monitor and as its child see them, and
the transitions each allows. Only the states live here; the code that moves
between them is ``Monitor.change_state`` and ``ConnectionChild.transition``.
"""

from __future__ import annotations

import enum


class IllegalTransition(RuntimeError):
    """A state change the tables below do not allow: a bug, never bad input."""


class ConnState(enum.Enum):
    """A connection as one monitor sees it: its claim (ours or not) and its child."""

    IDLE = "idle"            # no claim of ours, no child
    STARTING = "starting"    # claimed by us under a new epoch, its child being started
    RUNNING = "running"      # our claim, our child
    STOPPING = "stopping"    # our child told to stop; what follows is the record's ``after_stop``
    BACKOFF = "backoff"      # our claim, no child: started again once ``until`` has passed
    HELD = "held"            # our claim, no child until ``until`` or until the row changes
    FATAL = "fatal"          # our claim, no child: crashed too often, until the row changes
    RELEASING = "releasing"  # our claim, no child: released at the next cycle


S = ConnState
#: Where each state may go. A claim that is lost, or a lease that ran out,
#: takes any state that holds a claim but no child back to IDLE.
TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    S.IDLE: frozenset({S.STARTING, S.HELD, S.RELEASING}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.HELD}),  # HELD: the zygote refused the settings
    S.RUNNING: frozenset({S.STOPPING, S.BACKOFF, S.HELD, S.FATAL, S.IDLE}),
    S.STOPPING: frozenset({S.BACKOFF, S.RELEASING, S.IDLE}),
    S.BACKOFF: frozenset({S.STARTING, S.HELD, S.RELEASING, S.IDLE}),
    S.HELD: frozenset({S.BACKOFF, S.RELEASING, S.IDLE}),
    S.FATAL: frozenset({S.BACKOFF, S.RELEASING, S.IDLE}),
    S.RELEASING: frozenset({S.IDLE}),
}
#: States in which the record has a child process.
WITH_CHILD = frozenset({S.RUNNING, S.STOPPING})
#: States in which this monitor holds the connection's claim.
CLAIMED = frozenset(TRANSITIONS) - {S.IDLE}


class ChildStatus(str, enum.Enum):
    """A connection as its child reports it (the ``status`` column)."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    ERROR = "error"


C = ChildStatus
CHILD_TRANSITIONS: dict[ChildStatus, frozenset[ChildStatus]] = {
    C.DISCONNECTED: frozenset({C.CONNECTING, C.ERROR}),  # an attempt; settings the client refuses
    C.CONNECTING: frozenset({C.CONNECTED, C.ERROR, C.DISCONNECTED}),  # subscribed; failed; stopped
    C.CONNECTED: frozenset({C.DISCONNECTED}),  # lost, dropped or stopped
    C.ERROR: frozenset({C.CONNECTING, C.DISCONNECTED}),  # the retry; stopped
}
