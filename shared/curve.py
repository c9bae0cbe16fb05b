"""Who may talk to the logger over TCP: ZeroMQ CURVE with keys of this installation.

By default the logger listens on an ``ipc://`` socket in a runtime directory
only sitelink's user can open, and the file system is the guard. When
``SITELINK_EVENTS_ENDPOINT`` is ``tcp://``, every local user could connect,
so the socket is encrypted and authenticated with CURVE: the logger has a
server key pair, sitelink's own processes share one client key pair, and the
logger lets in only that client key (a ZAP handler, ``Gatekeeper``, polled in
the logger's own loop). The keys are made on first start, in
``<runtime dir>/curve/`` (mode 0700, files 0600), by whichever sitelink
process needs them first.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

from shared.runfile import private_dir

SERVER_FILE = "logger.secret"
CLIENT_FILE = "client.secret"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def needed(endpoint: str) -> bool:
    """Whether an endpoint needs CURVE (anything but a private ipc socket)."""
    return endpoint.startswith("tcp://")


@dataclass(frozen=True)
class Keys:
    server_public: bytes
    client_public: bytes
    client_secret: bytes = field(repr=False)
    server_secret: bytes | None = field(default=None, repr=False)  # the logger's only

    def secure_client(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.client_public
        socket.curve_secretkey = self.client_secret

    def secure_server(self, socket: zmq.Socket) -> None:
        assert self.server_secret is not None
        socket.curve_server = True
        socket.curve_secretkey = self.server_secret
        socket.curve_publickey = self.server_public
        socket.zap_domain = b"sitelink"


def _secret(path: Path) -> bytes:
    """The secret key in ``path``, made (atomically, mode 0600) if missing."""
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        _, key = zmq.curve_keypair()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
        os.replace(tmp, path)
    if len(key) != 40:
        raise ValueError(f"{path} does not hold a CURVE secret key (40 characters of Z85)")
    return key


def load(runtime_dir: Path, server: bool = False) -> Keys:
    """This installation's keys (made on first use, in ``<runtime_dir>/curve``);
    the server secret only for the logger."""
    directory = private_dir(private_dir(runtime_dir) / "curve")
    with open(directory / ".lock", "a") as lock:  # two processes starting together make one pair
        fcntl.flock(lock, fcntl.LOCK_EX)
        server_secret = _secret(directory / SERVER_FILE)
        client_secret = _secret(directory / CLIENT_FILE)
    return Keys(server_public=zmq.curve_public(server_secret), client_public=zmq.curve_public(client_secret),
                client_secret=client_secret, server_secret=server_secret if server else None)


def for_client(endpoint: str, runtime_dir: Path) -> Keys | None:
    """The keys a sender needs to reach the logger at ``endpoint`` (None for ipc)."""
    return load(runtime_dir) if needed(endpoint) else None


class Gatekeeper:
    """A ZAP handler that admits exactly one CURVE client key (RFC 27).

    Poll ``socket`` in the owner's loop and call ``answer`` when it is readable.
    """

    def __init__(self, context: zmq.Context, client_public: bytes):
        self.allowed = z85.decode(client_public)
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self.denied = 0

    def answer(self) -> None:
        while True:
            try:
                request = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            version, request_id = (request + [b"", b""])[:2]
            mechanism = request[5] if len(request) > 5 else b""
            key = request[6] if len(request) > 6 else b""
            ok = version == b"1.0" and mechanism == b"CURVE" and key == self.allowed
            if not ok:
                self.denied += 1
            self.socket.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                        b"OK" if ok else b"unknown client key", b"", b""])

    def close(self) -> None:
        self.socket.close(linger=0)
