"""Helpers for tests that run the real things: processes, ports, deadlines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import paho.mqtt.client as mqtt
import psycopg
import zmq

from shared import feed

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    """A TCP port the OS just handed out on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], T], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (psycopg.OperationalError, OSError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, theirs, ...)."""
    found, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        found += kids
        todo += kids
    return found


def environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (/proc/<pid>/environ)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in entries if e)


def uids(pid: int) -> tuple[int, int, int, int]:
    """Real, effective, saved and filesystem uid of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                real, effective, saved, fs = (int(n) for n in line.split()[1:5])
                return real, effective, saved, fs
    raise AssertionError(f"no Uid line in /proc/{pid}/status")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
    """Signal ``proc`` by PID, wait, SIGKILL if it does not go."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)
    return proc.returncode


def world_traversable_tmpdir(prefix: str) -> Path:
    """A temporary directory the unprivileged PostgreSQL user can reach."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class PostgresServer:
    """A throw-away PostgreSQL cluster on a free loopback port.

    Started by the embedded stack's own script, it wants a password as that
    one does: ``url()`` names the password file the script wrote (passfile=).
    """

    def __init__(self, base: Path, fast: bool = True):
        self.base = base
        self.fast = fast  # SITELINK_PG_FAST: no fsync, for tests; benchmarks measure durable
        self.datadir = base / "pgdata"
        self.socketdir = base / "run"
        self.secrets_dir = base / "secrets"
        self.passfile = self.secrets_dir / "pgpass"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = base / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://sitelink@127.0.0.1:{self.port}/{dbname}?passfile={self.passfile}"

    def start(self, timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SITELINK_PG_FAST"}
        if self.fast:
            env["SITELINK_PG_FAST"] = "1"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(ROOT / "supervisor_conf" / "bin" / "postgres"), str(self.datadir), str(self.port),
                 str(self.socketdir), str(self.secrets_dir)], env=env, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited: {self.log.read_text()[-3000:]}")
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        wait_for(ready, timeout, "PostgreSQL to accept connections")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT, timeout=30)
            self.proc = None

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(sql)


class Mosquitto:
    """A Mosquitto broker on a free loopback port.

    ``anonymous`` (the default, for the tests of everything else) starts the
    embedded stack's script with ``--allow-anonymous``, so a client needs no
    credentials; ``anonymous=False`` runs it with its defaults, as the
    embedded stack does: only the users it generates in ``secrets_dir``
    (default ``base/secrets``) get in. ``listener_conf``, if given, replaces
    the generated configuration: lines for the listener on ``self.port``
    (password file, TLS...).
    """

    def __init__(self, base: Path, listener_conf: list[str] | None = None, *, anonymous: bool = True,
                 secrets_dir: Path | None = None):
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = base / "mosquitto.log"
        self.listener_conf = listener_conf
        self.anonymous = anonymous
        self.secrets_dir = secrets_dir or base / "secrets"

    def start(self, timeout: float = 15.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.listener_conf is not None:
            conf = self.base / "custom.conf"
            conf.write_text("\n".join([f"user {_user()}", "per_listener_settings false",
                                        f"listener {self.port} 127.0.0.1", "persistence true",
                                        f"persistence_location {self.base}/", "log_dest stderr",
                                        *self.listener_conf]) + "\n")
            env["SITELINK_MOSQUITTO_CONF"] = str(conf)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(ROOT / "supervisor_conf" / "bin" / "mosquitto"),
                 *(["--allow-anonymous"] if self.anonymous else []),
                 str(self.port), str(self.base), str(self.secrets_dir)],
                stdout=log, stderr=subprocess.STDOUT, env=env)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.log.read_text()[-3000:]}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        wait_for(ready, timeout, "Mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()
            stop_process(self.proc, signal.SIGTERM)
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a dead path)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


class FeedSubscriber:
    """A ZeroMQ SUB on the status feed, collecting every message."""

    def __init__(self, endpoint: str, topic: str = ""):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)
        self.messages: list[tuple[str, dict]] = []

    def poll(self) -> list[tuple[str, dict]]:
        """Every message so far but heartbeats, decoded as any subscriber would (shared/feed.py)."""
        while self.socket.poll(0):
            frames = self.socket.recv_multipart()
            body = feed.decode(frames)
            if body["type"] != "heartbeat":
                self.messages.append((frames[0].decode(), body))
        return self.messages

    def wait_for(self, match: Callable[[str, dict], bool], timeout: float = 15.0,
                 what: str = "a feed message") -> tuple[str, dict]:
        def found():
            for topic, body in self.poll():
                if match(topic, body):
                    return topic, body
            return None
        return wait_for(found, timeout, what)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def python_service(name: str, env: dict[str, str], log: Path, *args: str,
                   new_session: bool = False) -> subprocess.Popen:
    """``python -m services.<name>``; with ``new_session``, in a process group of its own
    (that a test may kill whole, as a host that dies)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", f"services.{name}", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session)


def client_id_takeovers(broker: Mosquitto, client_ids: list[str]) -> list[str]:
    """The broker's log lines saying that a second client connected with one of
    ``client_ids`` while the first still was (Mosquitto closes the old one): two
    clients for one site."""
    wanted = set(client_ids)
    return [line for line in broker.log.read_text(errors="replace").splitlines()
            if "already connected, closing old connection" in line
            and line.split("Client ", 1)[-1].split(" already connected", 1)[0] in wanted]


@contextmanager
def logger_client(endpoint: str) -> Iterator[zmq.Socket]:
    """A DEALER connected to the logger, as every sender's is: for frames a test makes itself."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        context.term()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Publisher:
    """A gateway of a site, publishing at QoS 1 and waiting for the broker's ack."""

    def __init__(self, port: int):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-pub-{os.getpid()}-{id(self)}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str | dict) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def reading(gateway="GW-01", datalogger="DL-07", ts="2026-11-28T10:00:00Z", **sensors) -> dict:
    """A payload in the documented JSON format."""
    doc = {"gateway": gateway, "ts": ts}
    if datalogger:
        doc["datalogger"] = datalogger
    if sensors:
        doc["sensors"] = sensors
    return doc


def comm(pid: int) -> str:
    """The process name ``ps -o comm`` shows."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def named_connection_children(monitor_pid: int) -> list[tuple[int, str]]:
    """(PID, name) of a monitor's connection children (named sitelink-c<id>),
    each name read once: a child gone since it was listed reads "" and is left out."""
    return [(pid, name) for pid, name in ((pid, comm(pid)) for pid in children_of(monitor_pid))
            if name.startswith("sitelink-c")]


def connection_children(monitor_pid: int) -> list[int]:
    """PIDs of a monitor's connection children (named sitelink-c<id>)."""
    return [pid for pid, _ in named_connection_children(monitor_pid)]


def monitor_children(stack) -> list[int]:
    """PIDs of the connection children of the stack's monitor."""
    return connection_children(stack.pid("monitor"))


def joined_feed(stack):
    """A feed subscriber that has seen a monitor cycle, so it missed nothing since."""
    feed = stack.feed()
    feed.wait_for(lambda t, b: b["type"] == "monitor_cycle", what="a monitor cycle on the feed")
    return feed


class SteadyPublisher:
    """Gateways that publish a numbered reading per site every ``interval``
    seconds at QoS 1, in a thread, until stopped: the good traffic that must
    keep flowing while something hostile happens."""

    def __init__(self, port: int, sites: list[str], interval: float = 0.02, base_ts: int = 1795860000):
        self.sites = sites
        self.interval = interval
        self.base_ts = base_ts
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"steady-{os.getpid()}-{id(self)}")
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.sent = 0  # readings per site
        self._infos: list[mqtt.MQTTMessageInfo] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for site in self.sites:
                body = {"gateway": "GW", "ts": self.base_ts + self.sent, "sensors": {"S": {"n": self.sent}}}
                self._infos.append(self.client.publish(f"sites/{site}/GW", json.dumps(body), qos=1))
            self.sent += 1

    def stop(self) -> int:
        """Stop publishing, wait for the broker to have everything; return readings per site."""
        self._stop.set()
        self._thread.join()
        wait_for(lambda: all(i.is_published() for i in self._infos), 30, "the broker to take every reading")
        return self.sent

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
        self.client.loop_stop()
        self.client.disconnect()


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` from /proc/<pid>/status (VmRSS now, VmHWM its peak), in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def one_line_log(path: Path) -> list[str]:
    """The lines of a file log, each checked to be one whole record."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        assert line[:4].isdigit() and line.isprintable(), f"not one log record: {line[:200]!r}"
    return lines
