"""Signals for event loops: handlers only record; the loop acts.

``SignalPipe`` installs handlers that do nothing but note the signal, and
makes Python write each signal's number to a non-blocking pipe whose read end
the main loop polls beside its sockets. No logging or work in handlers.
"""

from __future__ import annotations

import os
import signal


class SignalPipe:
    def __init__(self, *signals: signal.Signals):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._note)

    @staticmethod
    def _note(signum: int, frame: object) -> None:
        # Recorded through the wakeup fd; the loop reads it from the pipe.
        pass

    def fileno(self) -> int:
        return self._read

    def drain(self) -> set[int]:
        """The signals that arrived since the last call."""
        seen: set[int] = set()
        while True:
            try:
                data = os.read(self._read, 512)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            seen.update(data)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)
