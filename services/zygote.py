"""The zygote: a preloaded parent that forks connection children cheaply.

A fresh Python interpreter per connection costs tens of MiB and most of a
second of CPU. The monitor instead starts this process once (a fresh
interpreter itself, so it inherits no socket, thread or database connection
from the monitor); it imports everything a child needs, freezes those objects
out of the garbage collector's reach (so children share their pages), and
then forks one child per request.

Each request on the control socket (a SOCK_SEQPACKET pair with the monitor)
is a child's settings, password included; the answer is the child's PID. A
child is forked through a short-lived intermediate, so that it is re-parented
to the monitor (a child subreaper): the monitor reaps it and is its parent for
PR_SET_PDEATHSIG, exactly as if it had started it itself.

    python -m services.zygote --fd N --monitor-pid PID   (started by the monitor)
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import struct
import subprocess
import sys
import traceback

PID = struct.Struct("!q")
MAX_REQUEST = 1 << 20
#: Exit code of a child whose start failed inside the zygote (EX_SOFTWARE).
EXIT_CHILD_SETUP = 70


def serve(control: socket.socket, monitor_pid: int) -> int:
    from services import connection  # the preload: paho, pyzmq, msgpack, loguru, parsers
    from shared import config, exitcodes, process, protocol
    from shared.connections import ConnectionSettings

    process.set_name("sitelink-zygote")
    if not process.die_with(monitor_pid, signal.SIGTERM, wait=0):
        return exitcodes.ORPHANED
    settings = config.load()
    _warm_up(connection, protocol, ConnectionSettings, settings)
    gc.collect()
    gc.freeze()  # children share these pages instead of copying them on the first GC
    while True:
        try:
            request = control.recv(MAX_REQUEST)
        except InterruptedError:
            continue
        if not request:
            return 0  # the monitor closed its end: it is stopping
        try:
            pid = _fork_child(lambda: _run(request, control, settings, connection, protocol,
                                           ConnectionSettings))
        except OSError as exc:
            print(f"sitelink zygote: cannot fork: {exc}", file=sys.stderr, flush=True)
            pid = -1
        control.send(PID.pack(pid))


def _warm_up(connection, protocol, settings_cls, settings) -> None:
    """Run the code paths every child runs once, so that what they import or
    build lazily is loaded here, once, and shared, not in each child."""
    from shared import parsers
    from shared.protocol import Batch, Data, Envelope

    sample = settings_cls(connection_id=0, site_id=0, broker_host="localhost", broker_port=1883,
                          username="u", password="p")
    protocol.decode_settings(protocol.encode_settings(sample), settings_cls)
    _ = sample.fingerprint, sample.problems()
    connection.new_client(sample, settings, clean_session=False, manual_ack=True)
    [record] = parsers.get("json")(b'{"gateway": "G", "ts": 1795860000, "sensors": {"S": {"t": 1}}}', "t")
    event = Data(connection_id=0, topic="t", gateway=record.gateway, ts=record.ts, sensors=record.sensors)
    envelope = Envelope(sender="s", incarnation="i", seq=1, floor=0, ts=0.0, event=event)
    protocol.decode(protocol.encode(Batch((envelope, envelope))))


def _fork_child(run) -> int:
    """Fork ``run`` through an intermediate that exits at once; return its PID."""
    read_end, write_end = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:  # the intermediate
        os.close(read_end)
        code = 0
        try:
            pid = os.fork()
            if pid == 0:  # the child
                os.close(write_end)
                run()  # never returns
            os.write(write_end, PID.pack(pid))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        data = os.read(read_end, PID.size)
    finally:
        os.close(read_end)
        os.waitpid(intermediate, 0)
    return PID.unpack(data)[0] if len(data) == PID.size else -1


def _run(request: bytes, control: socket.socket, settings, connection, protocol, settings_cls) -> None:
    code = EXIT_CHILD_SETUP
    try:
        control.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # The preloaded objects stay frozen: a collection would otherwise
        # touch, and so copy, every shared page.
        conn = protocol.decode_settings(request, settings_cls)
        code = connection.run_child(settings, conn)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_CHILD_SETUP
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.zygote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="the control socket inherited from the monitor")
    parser.add_argument("--monitor-pid", type=int, required=True)
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.fd)
    return serve(control, args.monitor_pid)


if __name__ == "__main__":
    sys.exit(main())


class Zygote:
    """The monitor's handle on its zygote process."""

    def __init__(self, request_timeout: float = 30.0):
        self.request_timeout = request_timeout
        self.proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        from shared.config import PROJECT_ROOT, without_secrets

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # The children it forks never open a database connection: they
            # inherit neither its URL nor libpq's variables.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.zygote", "--fd", str(theirs.fileno()),
                 "--monitor-pid", str(os.getpid())],
                pass_fds=[theirs.fileno()], cwd=PROJECT_ROOT, env=without_secrets())
        finally:
            theirs.close()
        self.proc.returncode = 0  # the monitor reaps by PID itself
        self.control = ours
        self.control.settimeout(self.request_timeout)

    def spawn(self, settings_frame: bytes) -> int:
        """Fork a child with these settings; return its PID. Raises OSError if the zygote is gone."""
        if self.control is None:
            self.start()
        assert self.control is not None
        self.control.send(settings_frame)
        answer = self.control.recv(PID.size)
        if len(answer) != PID.size:
            raise ConnectionError("the zygote closed its control socket")
        pid = PID.unpack(answer)[0]
        if pid <= 0:
            raise ChildProcessError("the zygote could not fork")
        return pid

    def discard(self) -> None:
        """Forget a zygote that died or stopped answering (killing it if needed)."""
        if self.proc is not None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close()

    def close(self) -> None:
        """Closing the control socket makes the zygote exit on its own."""
        if self.control is not None:
            self.control.close()
        self.control = None
        self.proc = None
