"""The monitor's side of the operating system: its zygote, its children's
processes, signals to them, reaping, and the files they share with it.

Everything the monitor asks of the operating system goes through
``Processes``, so that its decisions can be tested against a fake
(tests/test_monitor_states.py) while real-process tests cover this part.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass

from loguru import logger

from services.zygote import SpawnRefused, Zygote
from shared import config, process
from shared.connections import ConnectionSettings
from shared.runfile import InstanceLock, RunState

#: Exits of PIDs we do not know yet kept at most (see ``Processes.reap``).
EARLY_EXITS_KEPT = 1000


class SpawnError(Exception):
    """No child could be started (the zygote failed twice)."""


@dataclass(frozen=True)
class Exit:
    """A child of ours that has exited and been reaped."""

    connection_id: int
    pid: int
    status: int  # as os.waitpid returns it

    @property
    def code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    @property
    def description(self) -> str:
        if os.WIFSIGNALED(self.status):
            sig = os.WTERMSIG(self.status)
            try:
                return f"killed by signal {signal.Signals(sig).name}"
            except ValueError:
                return f"killed by signal {sig}"
        return f"exit code {os.WEXITSTATUS(self.status)}"


class Processes:
    """The zygote, the children by PID, and the files they share with the monitor."""

    def __init__(self, settings: config.Settings):
        self.lock = InstanceLock(settings.run_dir, settings.database_url, settings.instance_id)
        self.run_dir = settings.run_dir
        self.state: RunState | None = None
        self.zygote: Zygote | None = None
        self._connection_of: dict[int, int] = {}  # pid -> connection id
        self._early: dict[int, int] = {}  # pid -> status, exited before the zygote told us its PID
        self._pending: list[Exit] = []

    def acquire_instance(self) -> bool:
        """Become the one monitor of this instance on this host, or say it cannot yet.

        False while any process of an earlier monitor of this instance id
        (it, its zygote or a child) still runs here.
        """
        if self.zygote is not None:
            return True
        if not self.lock.acquire():
            return False
        # Children are forked by the zygote and adopted by us: we reap them
        # and are their parent for PR_SET_PDEATHSIG.
        process.become_subreaper()
        self.state = RunState.create(self.run_dir)
        self.zygote = Zygote(inherit=(self.state.fd, self.lock.fd))
        self.zygote.start()
        return True

    @property
    def lock_key(self) -> str:
        return self.lock.key

    def publish_fence(self, until: float) -> None:
        assert self.state is not None
        self.state.publish_fence(until)

    def spawn_many(self, many: list[ConnectionSettings]) -> list[int | SpawnRefused | SpawnError]:
        """Start a child for each of ``many``: for each, in order, its PID, the
        ``SpawnRefused`` that says why its settings cannot be used (the zygote
        is fine), or ``SpawnError`` when no child could be started (the zygote
        failed twice). Several at a time: the zygote forks them in a row."""
        assert self.zygote is not None and self.state is not None
        # The password travels on a socket, never in argv.
        prepared = [dataclasses.replace(settings, monitor_pid=os.getpid(), state_fd=self.state.fd)
                    for settings in many]
        out: list[int | SpawnRefused | SpawnError] = []
        failures = 0
        while len(out) < len(prepared):
            try:
                for answer in self.zygote.spawn_many(prepared[len(out):]):
                    failures = 0
                    if not isinstance(answer, SpawnRefused):
                        self._adopt(answer, prepared[len(out)].connection_id)
                    out.append(answer)
            except (OSError, ChildProcessError) as exc:
                self.zygote.discard()
                failures += 1
                if failures == 2:  # a new zygote failed too: none of the rest can start now
                    error = SpawnError(str(exc))
                    error.__cause__ = exc
                    out += [error] * (len(prepared) - len(out))
                else:
                    logger.warning("the zygote failed ({}); starting a new one", exc)
        return out

    def _adopt(self, pid: int, connection_id: int) -> None:
        self._connection_of[pid] = connection_id
        status = self._early.pop(pid, None)
        if status is not None:  # it exited before we knew its PID
            self._pending.append(self._exit(pid, status))

    def signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # exited already; reaped next

    def reap(self) -> list[Exit]:
        """Every child that has exited since the last call."""
        found, self._pending = self._pending, []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if self.zygote is not None and pid == self.zygote.pid:
                logger.warning("the zygote (pid {}) exited ({}); a new one starts with the next child",
                               pid, Exit(0, pid, status).description)
                self.zygote.close()
            elif pid in self._connection_of:
                found.append(self._exit(pid, status))
            else:
                # A child can exit before the zygote has told us its PID.
                self._early[pid] = status
                while len(self._early) > EARLY_EXITS_KEPT:
                    self._early.pop(next(iter(self._early)))
        return found

    def _exit(self, pid: int, status: int) -> Exit:
        return Exit(self._connection_of.pop(pid), pid, status)

    def pause(self, seconds: float) -> None:
        """Let time pass while children exit (the stop recipe's waits)."""
        time.sleep(seconds)

    def close(self) -> None:
        """Stop the zygote (it exits when its control socket closes) and reap it."""
        if self.zygote is not None:
            pid = self.zygote.pid
            self.zygote.close()
            deadline = time.monotonic() + 5
            while pid and time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG) != (0, 0):
                        break
                except ChildProcessError:
                    break
                time.sleep(0.02)
            self.zygote = None
        if self.state is not None:
            self.state.close()
            self.state = None
        self.lock.close()
