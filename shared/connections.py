"""One MQTT connection's broker settings, as the monitor hands them to a child,
and the rules that a row of ``mqtt_connection`` must follow to be usable.

A row enters here: ``ConnectionSettings.from_mapping`` takes any values
without raising, and ``problems()`` says, in words an operator can act on,
everything that keeps them from running. Settings with problems are never
started: the connection becomes status ``error`` with them as its
``error_message``. The schema checks the same rules wherever PostgreSQL can
(``sql/migrations/0004_row_checks.sql``); ``problems()`` also checks what it
cannot (the CA file, the parser's name) and the rows written before the rules.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import ipaddress
import os
import re
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import parsers

#: Columns of ``mqtt_connection`` whose change restarts the connection's child.
BROKER_FIELDS = ("site_id", "broker_host", "broker_port", "username", "password", "client_id",
                 "keepalive", "use_tls", "tls_ca_path", "topics", "qos", "parser_name",
                 "stall_after", "ping_timeout", "mqtt_protocol", "clean_session")
SECRET_FIELDS = frozenset({"password"})

# --- the limits of a row: the one list ---------------------------------------
# The CHECK constraints of sql/migrations/0004_row_checks.sql use the same
# numbers; tests/test_bad_rows.py checks that the schema and problems() agree.
# Together they keep a settings frame under 210 KB, far inside the zygote's
# MAX_REQUEST (tests/test_bad_rows.py measures the largest).

#: MQTT's limit on any string: client id, username, password, topic filter.
MQTT_STRING_MAX_BYTES = 65535
CLIENT_ID_MAX_CHARS = 128
BROKER_HOST_MAX_CHARS = 253  # the longest DNS name
TOPICS_MAX_COUNT = 256
#: All of a connection's filters together: its SUBSCRIBE stays under 67 KB,
#: far inside MQTT's 256 MB and the 128 KB of the strictest broker we know
#: (AWS IoT Core).
TOPICS_MAX_BYTES = 65536
#: Mosquitto closes the connection of a client that subscribes to a filter with more levels.
TOPIC_MAX_LEVELS = 200
PARSER_NAME_MAX_CHARS = 64
CA_PATH_MAX_BYTES = 4096  # PATH_MAX
#: A bundle of every public CA is about 200 KB.
CA_FILE_MAX_BYTES = 1 << 20
KEEPALIVE_RANGE = (5, 3600)
PING_TIMEOUT_RANGE = (1, 3600)
STALL_AFTER_RANGE = (0, 2**31 - 1)
PORT_RANGE = (1, 65535)
QOS_VALUES = (0, 1, 2)
MQTT_PROTOCOLS = ("3.1.1", "5")
#: Problems listed per rule at most, so that an error message stays readable.
MAX_LISTED = 3


@dataclass(frozen=True)
class ConnectionSettings:
    connection_id: int
    site_id: int
    broker_host: str
    broker_port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in repr, logs or argv
    client_id: str | None = None
    keepalive: int = 60
    use_tls: bool = False
    tls_ca_path: str | None = None
    topics: tuple[str, ...] = ("#",)
    qos: int = 1
    parser_name: str = "json"
    stall_after: int | None = 0  # seconds; 0 = the SITELINK_STALL_AFTER default, None = never
    ping_timeout: int | None = None  # seconds; None = half the keepalive
    mqtt_protocol: str = "3.1.1"
    clean_session: bool = False
    # Runtime facts the monitor adds: its PID, so the child can tell it was
    # orphaned; the descriptor of the file its children share (attempt rate,
    # fence: shared/runfile.py); the epoch of the claim the child runs under.
    monitor_pid: int = 0
    state_fd: int | None = None
    epoch: int = 0
    reset_session: bool = False  # the topics changed: drop the old persistent session once
    site_name: str = ""  # for the child's process title; not configuration (a rename restarts nothing)

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any], **extra: Any) -> ConnectionSettings:
        """Settings from a row of ``mqtt_connection`` or a decoded settings frame.

        Any values are taken as they are: what is wrong with them is for
        ``problems()`` to say. Only a missing required field raises (TypeError).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        if "id" in row and "connection_id" not in values:
            values["connection_id"] = row["id"]
        values.update(extra)
        topics = values.get("topics")
        values["topics"] = () if topics is None else tuple(topics) if isinstance(topics, (list, tuple)) else topics
        return cls(**values)

    @property
    def effective_client_id(self) -> str:
        """Stable per connection, so a reconnect resumes the broker session."""
        return self.client_id or f"sitelink-{self.connection_id}"

    def stall_seconds(self, default: float) -> float | None:
        """Seconds of silence after which a connected connection counts as stalled."""
        if self.stall_after is None:
            return None
        return float(self.stall_after) if self.stall_after > 0 else default

    @property
    def ping_seconds(self) -> float:
        """Seconds to wait for a PINGRESP: a dead path shows in about keepalive x 1.5."""
        return float(self.ping_timeout) if self.ping_timeout else self.keepalive / 2

    def changed_fields(self, other: ConnectionSettings) -> list[str]:
        """Names (never values) of the broker settings that differ from ``other``."""
        return [name for name in BROKER_FIELDS if getattr(self, name) != getattr(other, name)]

    @functools.cached_property
    def fingerprint(self) -> str:
        """Digest of the broker settings: a different one means restart the child."""
        digest = hashlib.sha256()
        for name in BROKER_FIELDS:
            digest.update(repr(getattr(self, name)).encode("utf-8", "backslashreplace"))
            digest.update(b"\0")
        return digest.hexdigest()

    def redact(self, text: str) -> str:
        """``text`` (an exception's message, a traceback) without the credentials in it."""
        for secret in (self.password, self.username):
            if isinstance(secret, str) and secret:
                text = text.replace(secret, "***")
        return text

    def problems(self) -> list[str]:
        """What makes these settings unusable, in words an operator can act on.

        Never raises, whatever the values; never shows the username or the
        password (either may be a token), only what is wrong with them.
        """
        found = [_int_problem("connection_id", self.connection_id, 1, 2**63 - 1),
                 _int_problem("site_id", self.site_id, 1, 2**63 - 1),
                 _host_problem(self.broker_host),
                 _int_problem("broker_port", self.broker_port, *PORT_RANGE),
                 *self._credential_problems(),
                 _client_id_problem(self.client_id),
                 _int_problem("keepalive", self.keepalive, *KEEPALIVE_RANGE),
                 _int_problem("ping_timeout", self.ping_timeout, *PING_TIMEOUT_RANGE, none_ok=True),
                 _int_problem("stall_after", self.stall_after, *STALL_AFTER_RANGE, none_ok=True),
                 _bool_problem("use_tls", self.use_tls),
                 *self._tls_problems(),
                 *_topics_problems(self.topics),
                 _choice_problem("qos", self.qos, QOS_VALUES),
                 _parser_problem(self.parser_name),
                 _choice_problem("mqtt_protocol", self.mqtt_protocol, MQTT_PROTOCOLS),
                 _bool_problem("clean_session", self.clean_session)]
        return [p for p in found if p]

    def _credential_problems(self) -> list[str | None]:
        found: list[str | None] = []
        if self.username is not None:
            found.append(_string_problem("username", self.username, text=True))
        if self.password is not None:
            # MQTT passwords are binary: only their size and encoding matter.
            found.append(_string_problem("password", self.password, text=False))
            if self.username is None:
                found.append("a password is set without a username (MQTT 3.1.1 does not allow it): "
                             "set the username, or set the password to NULL")
        return found

    def _tls_problems(self) -> list[str | None]:
        path = self.tls_ca_path
        if path is None:
            return []  # with use_tls, the system's CAs
        if not isinstance(path, str):
            return [f"tls_ca_path must be text, not {_show(path)}"]
        if not self.use_tls:
            return ["tls_ca_path is set but use_tls is false: set use_tls, or tls_ca_path to NULL"]
        if not path.startswith("/"):
            return [f"tls_ca_path {_show(path)} is not an absolute path (it must start with '/')"]
        if _SURROGATE.search(path) or "\0" in path or len(path.encode()) > CA_PATH_MAX_BYTES:
            return [f"tls_ca_path {_show(path)} is not a usable path "
                    f"(at most {CA_PATH_MAX_BYTES} bytes of valid Unicode, no NUL)"]
        return [ca_file_problem(path)]


# --- the rules, one function each ------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NONCHARACTER = re.compile("[\ufdd0-\ufdef" + "".join(chr(plane << 16 | 0xfffe) + chr(plane << 16 | 0xffff)
                                                     for plane in range(17)) + "]")
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"(?:{_HOST_LABEL}\.)*{_HOST_LABEL}\.?")
_IPV4_BYTE = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?:{_IPV4_BYTE}\.){{3}}{_IPV4_BYTE}")
_ENDS_IN_NUMBER = re.compile(r"(?:.*\.)?[0-9]+\.?", re.DOTALL)
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")


def _show(value: Any, width: int = 60) -> str:
    """A value for a message: quoted, escaped, cut; a non-text value by its type."""
    if isinstance(value, str):
        return repr(value if len(value) <= width else value[:width - 3] + "...")
    if value is None or isinstance(value, (bool, int)):
        return repr(value)
    return f"a value of type {type(value).__name__}"


def _plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_problem(name: str, value: Any, low: int, high: int, none_ok: bool = False) -> str | None:
    if value is None and none_ok:
        return None
    if not _plain_int(value):
        return f"{name} must be a whole number, not {_show(value)}"
    if not low <= value <= high:
        return f"{name} must be between {low} and {high}, not {value}"
    return None


def _choice_problem(name: str, value: Any, allowed: tuple) -> str | None:
    if type(value) in {type(a) for a in allowed} and value in allowed:
        return None
    *others, last = (repr(a) for a in allowed)
    return f"{name} must be {', '.join(others)} or {last}, not {_show(value)}"


def _bool_problem(name: str, value: Any) -> str | None:
    return None if isinstance(value, bool) else f"{name} must be true or false, not {_show(value)}"


def mqtt_text_problem(value: str) -> str | None:
    """Why ``value`` is not text that MQTT brokers take in a string, or None.

    MQTT strings are UTF-8 without NUL; control characters and Unicode
    non-characters are allowed to be refused, and Mosquitto closes the
    connection of a client that sends them.
    """
    if _SURROGATE.search(value):
        return "is not valid Unicode (it holds a lone surrogate)"
    if (control := _CONTROL.search(value)) is not None:
        code = ord(control.group())
        return f"holds the control character U+{code:04X}{' (NUL)' if code == 0 else ''}, which MQTT brokers refuse"
    if (nonchar := _NONCHARACTER.search(value)) is not None:
        return f"holds the Unicode non-character U+{ord(nonchar.group()):04X}, which MQTT brokers refuse"
    return None


def _string_problem(name: str, value: Any, *, text: bool) -> str | None:
    """A username or password: never shown, only what is wrong with it."""
    if not isinstance(value, str):
        return f"{name} must be text, not a value of type {type(value).__name__}"
    if text:
        problem = mqtt_text_problem(value)
    else:
        problem = "is not valid Unicode (it holds a lone surrogate)" if _SURROGATE.search(value) else None
    if problem is not None:
        return f"{name} {problem}"
    if len(value.encode()) > MQTT_STRING_MAX_BYTES:
        return f"{name} is longer than {MQTT_STRING_MAX_BYTES} bytes, MQTT's limit"
    return None


def _client_id_problem(client_id: Any) -> str | None:
    if client_id is None:
        return None  # sitelink-<connection id>
    if not isinstance(client_id, str):
        return f"client_id must be text, not {_show(client_id)}"
    if not 1 <= len(client_id) <= CLIENT_ID_MAX_CHARS:
        return f"client_id must be 1 to {CLIENT_ID_MAX_CHARS} characters (NULL for sitelink-<id>), not {len(client_id)}"
    problem = mqtt_text_problem(client_id)
    return f"client_id {_show(client_id)} {problem}" if problem else None


def is_host(host: str) -> bool:
    """A host name (ASCII: an international name in its xn-- form) or an IPv4 or
    IPv6 literal (without brackets or zone); the schema's mqtt_broker_host_ok."""
    if not 1 <= len(host) <= BROKER_HOST_MAX_CHARS:
        return False
    if ":" in host:
        if not _IPV6_CHARS.fullmatch(host) or ("." in host and not _IPV4.fullmatch(host.rsplit(":", 1)[1])):
            return False
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    if _ENDS_IN_NUMBER.fullmatch(host):
        return _IPV4.fullmatch(host) is not None
    return _HOST_NAME.fullmatch(host) is not None


def _host_problem(host: Any) -> str | None:
    if not isinstance(host, str):
        return f"broker_host must be text, not {_show(host)}"
    if is_host(host):
        return None
    return (f"broker_host {_show(host)} is not a host name or an IP address: write the host alone, "
            f"without a scheme (tcp://), port, path or spaces, at most {BROKER_HOST_MAX_CHARS} characters "
            f"(an international name in its xn-- form)")


def topic_filter_problem(topic: str) -> str | None:
    """Why ``topic`` is not an MQTT topic filter that brokers take, or None."""
    if topic == "":
        return "is empty (an empty level, as in 'a//b', is fine; an empty filter is not)"
    problem = mqtt_text_problem(topic)
    if problem is not None:
        return problem
    if len(topic.encode()) > MQTT_STRING_MAX_BYTES:
        return f"is longer than {MQTT_STRING_MAX_BYTES} bytes, MQTT's limit"
    levels = topic.split("/")
    if len(levels) > TOPIC_MAX_LEVELS:
        return f"has {len(levels)} levels; brokers take at most {TOPIC_MAX_LEVELS}"
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "is invalid: '#' must be the last level and alone in it, as in 'a/#'"
        if "+" in level and level != "+":
            return "is invalid: '+' must be a whole level, as in 'a/+/b'"
    return None


def _topics_problems(topics: Any) -> list[str]:
    if not isinstance(topics, tuple) or not all(isinstance(t, str) for t in topics):
        return ["topics must be a one-dimensional list of topic filters (text)"]
    if not 1 <= len(topics) <= TOPICS_MAX_COUNT:
        return [f"topics must hold 1 to {TOPICS_MAX_COUNT} topic filters, not {len(topics)}"]
    found = []
    bad = [(t, p) for t in topics if (p := topic_filter_problem(t)) is not None]
    found += [f"topic filter {_show(t)} {p}" for t, p in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        found.append(f"and {len(bad) - MAX_LISTED} more invalid topic filters")
    twice = [t for t, count in collections.Counter(topics).items() if count > 1]
    if twice:
        listed = ", ".join(_show(t) for t in twice[:MAX_LISTED])
        more = f" and {len(twice) - MAX_LISTED} more" if len(twice) > MAX_LISTED else ""
        found.append(f"topics lists {listed}{more} more than once")
    if not bad:
        size = sum(len(t.encode()) for t in topics)
        if size > TOPICS_MAX_BYTES:
            found.append(f"topics hold {size} bytes together; at most {TOPICS_MAX_BYTES}")
    return found


def _parser_problem(name: Any) -> str | None:
    if not isinstance(name, str):
        return f"parser_name must be text, not {_show(name)}"
    if name not in parsers.names():
        return f"unknown parser {_show(name)} (known: {', '.join(parsers.names())})"
    return None


def ca_file_problem(path: str) -> str | None:
    """Why the CA file at ``path`` cannot verify a broker, or None.

    The same load paho's ``tls_set`` does, checked before any child starts.
    """
    shown = _show(path, 120)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"CA file {shown} does not exist"
    except PermissionError:
        return f"CA file {shown} cannot be reached by {_user()}: permission denied on a directory of its path"
    except (OSError, ValueError) as exc:
        return f"CA file {shown} cannot be read: {getattr(exc, 'strerror', None) or exc}"
    if stat.S_ISDIR(info.st_mode):
        return f"CA file {shown} is a directory: tls_ca_path names one PEM file"
    if not stat.S_ISREG(info.st_mode):
        return f"CA file {shown} is not a regular file"
    if info.st_size > CA_FILE_MAX_BYTES:
        return f"CA file {shown} is larger than {CA_FILE_MAX_BYTES} bytes: that is not a CA file"
    return _ca_load_problem(path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _ca_load_problem(path: str, *identity: int) -> str | None:
    # Cached per version of the file (``identity``): a thousand connections
    # that share one CA bundle load it once per process, not once per start.
    shown = _show(path, 120)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        return f"CA file {shown} cannot be read by {_user()}: permission denied"
    except OSError as exc:
        return f"CA file {shown} cannot be read: {exc.strerror or exc}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        detail = "" if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND" else f" ({exc.reason or exc})"
        return f"CA file {shown} holds no PEM certificate{detail}: is it a private key, a DER file or something else?"
    except OSError as exc:
        return f"CA file {shown} cannot be read: {exc.strerror or exc}"
    if not context.cert_store_stats().get("x509"):
        return f"CA file {shown} holds no certificate (only revocation lists)"
    return None


def _user() -> str:
    import pwd

    uid = os.geteuid()
    try:
        return f"this service's user ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"this service's user (uid {uid})"
