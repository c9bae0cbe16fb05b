"""The zygote: a preloaded parent that forks connection children cheaply.

A fresh Python interpreter per connection costs tens of MiB and most of a
second of CPU. The monitor instead starts this process once (a fresh
interpreter itself, so it inherits no socket, thread or database connection
from the monitor); it imports everything a child needs, freezes those objects
out of the garbage collector's reach (so children share their pages), and
then forks one child per request.

Each request on the control socket (a SOCK_SEQPACKET pair with the monitor)
is a child's settings, password included; the answer is the child's PID, or
a refusal with its reason when the request cannot be used (too large, not
settings, or settings with problems): that is the connection's fault, not the
zygote's, and the monitor shows it as that connection's ``error``. The
monitor sends up to FORK_BATCH requests before it reads their answers; the
zygote reads what is waiting, decodes it all, then forks the children one
after the other, answering each in the requests' order. A child is
the monitor's child, not the zygote's: the monitor reaps it and is its parent
for PR_SET_PDEATHSIG, exactly as if it had started it itself. The zygote forks
it with clone(CLONE_PARENT), one fork (``_parent_clone``); where that is not
available, through a short-lived intermediate that exits at once, so that the
child is re-parented to the monitor (a child subreaper): two forks, twice the
cost.

    python -m services.zygote --fd N --monitor-pid PID   (started by the monitor)
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import signal
import socket
import struct
import subprocess
import sys
import traceback
from collections.abc import Iterator

#: An answer: the child's PID, FORK_FAILED, or REFUSED followed by the reason (UTF-8).
PID = struct.Struct("!q")
REFUSED = 0
FORK_FAILED = -1
MAX_REQUEST = 1 << 20
MAX_REASON = 8192
#: Requests the zygote reads at most before forking their children, and the
#: monitor sends at most before reading their answers. Their answers (a PID,
#: or a refusal of MAX_REASON bytes at most) fit in a socket's default buffer,
#: so that neither side can wait on a full buffer while the other waits too.
FORK_BATCH = 16
#: Exit code of a child whose start failed inside the zygote (EX_SOFTWARE).
EXIT_CHILD_SETUP = 70
#: clone(2) flags (linux/sched.h).
CLONE_PARENT = 0x00008000
CLONE_CHILD_CLEARTID = 0x00200000
CLONE_CHILD_SETTID = 0x01000000
#: clone's syscall number by machine, and whether its ``tls`` argument comes
#: before ``child_tid`` (it comes after on x86_64).
CLONE_SYSCALL = {"x86_64": (56, False), "aarch64": (220, True)}


class SpawnRefused(Exception):
    """No child for these settings: they are unusable. The settings' fault,
    not the zygote's: the zygote is fine and keeps serving."""


def serve(control: socket.socket, monitor_pid: int) -> int:
    gc.disable()  # no collection before the freeze: the garbage it frees would leave holes
    from services import connection  # the preload: paho, pyzmq, msgpack, loguru, parsers
    from shared import config, curve, exitcodes, logs, process, protocol
    from shared.connections import ConnectionSettings

    process.set_name("sitelink-zygote")
    if not process.die_with(monitor_pid, signal.SIGTERM, wait=0):
        return exitcodes.ORPHANED
    settings = config.load()
    # Set up once here, not in each child: loguru's sinks cost a child 1.5 MiB to build.
    logs.setup("zygote", settings.log_level)
    process.set_title(f"sitelink: zygote of monitor {settings.instance_id}", "sitelink-zygote")
    keys = curve.for_client(settings.events_endpoint, settings.runtime_dir)  # read once, for every child
    _warm_up(connection, protocol, ConnectionSettings, settings)
    global _clone_parent
    _clone_parent = _parent_clone()
    gc.freeze()  # children share these pages instead of copying them on the first GC
    gc.enable()  # from here on only what is allocated after the freeze is collected
    while True:
        requests, closed = _receive(control)
        if closed:
            # The monitor closed its end: it is stopping, and could not hear the
            # PIDs of what it sent last: none of that starts.
            return 0
        # Every request read and decoded before the first fork: after a fork each
        # page the zygote writes is copied, and decoding one request between two
        # forks wrote some 150 pages (a millisecond of its CPU per child, here).
        decoded = [read_request(request, flags, protocol, ConnectionSettings) for request, flags in requests]
        for conn, refusal in decoded:
            if refusal is not None:
                control.send(PID.pack(REFUSED) + refusal.encode("utf-8", "replace")[:MAX_REASON])
                continue
            try:
                pid = _fork_child(lambda: _run(conn, control, settings, keys, connection))
            except OSError as exc:
                print(f"sitelink zygote: cannot fork: {exc}", file=sys.stderr, flush=True)
                pid = FORK_FAILED
            control.send(PID.pack(pid))  # at once: a PID the monitor has not heard of runs unwatched
        del decoded, requests  # not kept until the next batch (the children have their copy)


def _receive(control: socket.socket) -> tuple[list[tuple[bytes, int]], bool]:
    """The requests waiting (one at least, waited for; at most FORK_BATCH), and
    whether the monitor has closed its end."""
    requests: list[tuple[bytes, int]] = []
    while len(requests) < FORK_BATCH:
        try:
            request, _, flags, _ = control.recvmsg(MAX_REQUEST, 0, socket.MSG_DONTWAIT if requests else 0)
        except (BlockingIOError, InterruptedError):
            if requests:
                break
            continue
        if not request:
            return requests, True
        requests.append((request, flags))
    return requests, False


def read_request(request: bytes, flags: int, protocol, settings_cls):
    """The settings a request holds, or why the zygote refuses it: never raises,
    whatever the bytes, so that no request can stop the zygote."""
    if flags & socket.MSG_TRUNC:
        return None, f"the settings are larger than the {MAX_REQUEST} bytes a start request may hold"
    try:
        conn = protocol.decode_settings(request, settings_cls)
        problems = conn.problems()
    except Exception as exc:
        return None, f"the start request is not valid settings ({type(exc).__name__}: {exc})"
    if problems:
        return None, "; ".join(problems)
    return conn, None


def _warm_up(connection, protocol, settings_cls, settings) -> None:
    """Run the code paths every child runs once, so that what they import or
    build lazily is loaded here, once, and shared, not in each child."""
    import time

    from loguru import logger

    from shared import parsers
    from shared.protocol import Ack, Data, Envelope, StatusChange

    sample = settings_cls(connection_id=1, site_id=1, broker_host="localhost", broker_port=1883,
                          username="u", password="p")
    protocol.decode_settings(protocol.encode_settings(sample), settings_cls)
    _ = sample.fingerprint, sample.problems()
    _warm_up_session(connection, sample, settings)
    [record] = parsers.get("json")(b'{"gateway": "G", "ts": 1795860000, "sensors": {"S": {"t": 1}}}', "t")
    event = Data(connection_id=1, topic="t", gateway=record.gateway, ts=record.ts, sensors=record.sensors)
    packed = [protocol.pack_envelope(Envelope(sender="conn:1", incarnation="i", seq=n, floor=0, ts=time.time(),
                                              event=event)) for n in (1, 2)]
    protocol.decode(protocol.frame_of(packed))
    protocol.decode_reply(protocol.encode(Ack("i", 2)))
    for status in ("connecting", "connected"):
        protocol.pack_envelope(Envelope(sender="conn:1", incarnation="i", seq=3, floor=0, ts=time.time(),
                                        event=StatusChange(connection_id=1, status=status, message="m",
                                                           broker_host="localhost", epoch=1)))
    logger.info("the zygote of monitor {} is ready (pid {})", settings.instance_id, os.getpid())


def _warm_up_session(connection, sample, settings) -> None:
    """A paho session against a listener of our own on loopback (CONNECT,
    CONNACK, SUBSCRIBE, SUBACK, DISCONNECT): paho's and the socket module's
    connect paths, run once here, cost each child 1.6 MiB less."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = connection.new_client(sample, settings, clean_session=False, manual_ack=True)
        client.connect("127.0.0.1", listener.getsockname()[1], 60)
        broker, _ = listener.accept()
        with broker:
            broker.settimeout(5)
            client.loop_write()
            broker.recv(4096)
            broker.sendall(b"\x20\x02\x00\x00")  # CONNACK: accepted
            client.on_connect = lambda c, *args: c.subscribe([("t/#", 1)])
            client.loop_read()
            client.loop_write()
            broker.recv(4096)
            broker.sendall(b"\x90\x03\x00\x01\x01")  # SUBACK: mid 1, QoS 1
            client.loop_read()
            client.loop_misc()
            client.disconnect()
            client.loop_write()


#: A fork whose child is our parent's (``_parent_clone``), once proven to work here.
_clone_parent = None


def _parent_clone():
    """fork(2), but the child is our parent's child: clone(CLONE_PARENT), or None
    where that cannot be had (another machine, a libc that keeps its thread's
    ID elsewhere, a kernel or sandbox that refuses it).

    Python has no call for it, so this does what os.fork() does around the
    system call (PyOS_BeforeFork / PyOS_AfterFork_*, with the GIL held: a
    PyDLL call keeps it) and what glibc's fork does for the thread's ID: the
    kernel writes the child's TID where glibc keeps it (CLONE_CHILD_SETTID,
    found in the thread's descriptor) and clears it at exit
    (CLONE_CHILD_CLEARTID). The zygote has one thread, holds no lock when it
    forks, and its libraries need no pthread_atfork handler in the child
    (OpenSSL and libsodium notice a fork by the PID). A first clone, of our
    own child, proves the TID lands where glibc reads it.
    """
    import _signal  # the signal module's C half (see below)
    import ctypes
    import platform
    import threading

    spec = CLONE_SYSCALL.get(platform.machine())
    if spec is None:
        return None
    number, tls_first = spec
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        syscall, pthread_self = libc.syscall, libc.pthread_self
        before = ctypes.pythonapi.PyOS_BeforeFork
        after_in_child = ctypes.pythonapi.PyOS_AfterFork_Child
        after_in_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
    except (OSError, AttributeError):
        return None
    syscall.restype, syscall.argtypes = ctypes.c_long, [ctypes.c_long] * 6
    pthread_self.restype, pthread_self.argtypes = ctypes.c_void_p, []
    for f in (before, after_in_child, after_in_parent):
        f.restype, f.argtypes = None, []

    def tid_in(address: int) -> int:
        return int.from_bytes(ctypes.string_at(address, 4), sys.byteorder, signed=True)

    me, tid = pthread_self(), threading.get_native_id()
    places = [me + at for at in range(0, 4096, 4) if tid_in(me + at) == tid]
    if len(places) != 1:
        return None
    [tid_at] = places
    base = CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | signal.SIGCHLD
    # The C functions under the signal module's: its wrappers make an enum of
    # each signal of every mask they take and return (110 us per clone here,
    # against 1.4 us; in py-spy profiles of a 2000-site start they showed in
    # a sixth of the zygote's samples).
    sigmask, every_signal = _signal.pthread_sigmask, _signal.valid_signals()

    def clone(flags: int) -> int:
        args = (0, 0, 0, tid_at) if tls_first else (0, 0, tid_at, 0)
        mask = sigmask(signal.SIG_BLOCK, every_signal)  # as glibc's fork does
        before()
        pid = syscall(number, base | flags, *args)
        if pid == 0:
            after_in_child()
        else:
            after_in_parent()
        error = ctypes.get_errno()
        sigmask(signal.SIG_SETMASK, mask)
        if pid < 0:
            raise OSError(error, os.strerror(error))
        return pid

    try:
        pid = clone(0)  # the proof: a child of ours, which we can reap
    except OSError:
        return None
    if pid == 0:
        os._exit(0 if tid_in(tid_at) == threading.get_native_id() == os.getpid() else 1)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        return None
    return lambda: clone(CLONE_PARENT)


def _fork_child(run) -> int:
    """Fork ``run`` as our parent's child; return its PID."""
    if _clone_parent is not None:
        pid = _clone_parent()
        if pid == 0:  # the child
            run()  # never returns
        return pid
    # Through an intermediate that exits at once: the child is re-parented to the monitor.
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
    return PID.unpack(data)[0] if len(data) == PID.size else FORK_FAILED


def _run(conn, control: socket.socket, settings, keys, connection) -> None:
    code = EXIT_CHILD_SETUP
    try:
        control.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # The preloaded objects stay frozen: a collection would otherwise
        # touch, and so copy, every shared page.
        code = connection.run_child(settings, conn, keys, logs_ready=True)
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

    def __init__(self, request_timeout: float = 30.0, inherit: tuple[int, ...] = ()):
        self.request_timeout = request_timeout
        # Descriptors every child must hold (shared/runfile.py): the zygote
        # keeps them open and its children inherit them with the fork.
        self.inherit = inherit
        self.proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        from shared.config import PROJECT_ROOT, without_secrets

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Room for a whole batch of answers (FORK_BATCH), whatever this host's default.
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * FORK_BATCH * (PID.size + MAX_REASON))
        try:
            # The children it forks never open a database connection: they
            # inherit neither its URL nor libpq's variables.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.zygote", "--fd", str(theirs.fileno()),
                 "--monitor-pid", str(os.getpid())],
                pass_fds=[theirs.fileno(), *self.inherit], cwd=PROJECT_ROOT, env=without_secrets())
        finally:
            theirs.close()
        # Room for the largest settings (the kernel caps it at net.core.wmem_max x 2).
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_REQUEST)
        self.proc.returncode = 0  # the monitor reaps by PID itself
        self.control = ours
        self.control.settimeout(self.request_timeout)

    def spawn(self, settings) -> int:
        """Fork a child with these ``ConnectionSettings``; return its PID.

        Raises ``SpawnRefused`` when the settings are unusable (hold that
        connection; the zygote is fine), OSError or ChildProcessError when the
        zygote is gone or broken (start a new one).
        """
        [answer] = self.spawn_many([settings])
        if isinstance(answer, SpawnRefused):
            raise answer
        return answer

    def spawn_many(self, many: list) -> Iterator[int | SpawnRefused]:
        """Fork a child for each of ``many`` (``ConnectionSettings``): yield, in
        their order, its PID or the ``SpawnRefused`` that says why not.

        The requests go FORK_BATCH at a time, their answers read after them:
        the zygote forks a batch's children one after the other. Raises
        OSError or ChildProcessError when the zygote is gone or broken: what
        was yielded until then stands, the rest is unknown (start a new one).
        """
        for at in range(0, len(many), FORK_BATCH):
            sent = [self._send(settings) for settings in many[at:at + FORK_BATCH]]
            for refused in sent:
                yield refused if refused is not None else self._answer()

    def _send(self, settings) -> SpawnRefused | None:
        """Send one request; the refusal if it cannot be sent (nothing sent then)."""
        from shared import protocol

        try:
            frame = protocol.encode_settings(settings)  # the password travels on a socket, never in argv
        except Exception as exc:  # its message could quote the password: the type only
            return SpawnRefused(f"the settings cannot be encoded ({type(exc).__name__})")
        if len(frame) > MAX_REQUEST:
            return SpawnRefused(f"the settings take {len(frame)} bytes; a start request holds at most {MAX_REQUEST}")
        if self.control is None:
            self.start()
        assert self.control is not None
        try:
            self.control.send(frame)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:  # nothing was sent: the zygote is fine
                return SpawnRefused(f"the settings take {len(frame)} bytes, more than this host lets a "
                                    f"local socket carry at once (net.core.wmem_max)")
            raise
        return None

    def _answer(self) -> int | SpawnRefused:
        assert self.control is not None
        answer = self.control.recv(PID.size + MAX_REASON)
        if len(answer) < PID.size:
            raise ConnectionError("the zygote closed its control socket")
        pid = PID.unpack_from(answer)[0]
        if pid == REFUSED:
            return SpawnRefused(answer[PID.size:].decode("utf-8", "replace") or "the zygote refused these settings")
        if pid < 0:
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
