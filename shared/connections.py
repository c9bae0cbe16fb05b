"""One MQTT connection's broker settings, as the monitor hands them to a child."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import parsers

#: Columns of ``mqtt_connection`` whose change restarts the connection's child.
BROKER_FIELDS = ("site_id", "broker_host", "broker_port", "username", "password", "client_id",
                 "keepalive", "use_tls", "tls_ca_path", "topics", "qos", "parser_name",
                 "stall_after", "ping_timeout", "mqtt_protocol", "clean_session")
SECRET_FIELDS = frozenset({"password"})


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
    # orphaned, and the file through which its children share the connect rate.
    monitor_pid: int = 0
    attempt_slots: str | None = None
    reset_session: bool = False  # the topics changed: drop the old persistent session once

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any], **extra: Any) -> ConnectionSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        if "id" in row and "connection_id" not in values:
            values["connection_id"] = row["id"]
        values.update(extra)
        values["topics"] = tuple(values.get("topics") or ())
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
            digest.update(repr(getattr(self, name)).encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def problems(self) -> list[str]:
        """What makes these settings unusable, in words an operator can act on."""
        found = []
        if self.parser_name not in parsers.names():
            found.append(f"unknown parser {self.parser_name!r} (known: {', '.join(parsers.names())})")
        if not self.topics or any(not t for t in self.topics):
            found.append("topics must be a non-empty list of non-empty MQTT topic filters")
        for topic in self.topics:
            if ("#" in topic and not (topic == "#" or topic.endswith("/#")) or topic.count("#") > 1):
                found.append(f"topic filter {topic!r} is invalid: '#' must be last and alone in its level")
        if self.password is not None and self.username is None:
            found.append("a password is set without a username")
        if self.tls_ca_path and not self.use_tls:
            found.append("tls_ca_path is set but use_tls is false")
        if self.mqtt_protocol not in ("3.1.1", "5"):
            found.append(f"mqtt_protocol {self.mqtt_protocol!r} is not 3.1.1 or 5")
        if self.use_tls and self.tls_ca_path and not Path(self.tls_ca_path).is_file():
            found.append(f"CA file {self.tls_ca_path!r} does not exist")
        return found
