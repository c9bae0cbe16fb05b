"""Every setting of sitelink, read from ``SITELINK_*`` environment variables.

This module is the only reader of the environment. ``load()`` returns one
frozen, typed ``Settings``; a bad value raises ``ConfigError`` naming the
variable, so a service fails at start rather than misbehaving later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "SITELINK_"
#: sun_path holds 108 bytes, NUL included.
MAX_IPC_PATH_BYTES = 107

#: The checkout (or installed tree) that holds sql/, supervisor_conf/ and var/.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting has a value sitelink cannot use."""


def _embedded_database_url(home: Path, port: int) -> str:
    # The password stays in the libpq password file the embedded PostgreSQL's
    # script writes (supervisor_conf/bin/postgres): the URL only names it.
    var = home / "var"
    return f"postgresql://sitelink@/sitelink?host={var / 'run'}&port={port}&passfile={var / 'secrets' / 'pgpass'}"


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be a number >= 0")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be an integer >= 1")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 65535:
        raise ValueError("must be a port number between 1 and 65535")
    return number


def _zmq_endpoint(value: str) -> str:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must be a ZeroMQ endpoint such as tcp://127.0.0.1:5556")
    if value.startswith("ipc://") and len(value[len("ipc://"):].encode()) > MAX_IPC_PATH_BYTES:
        raise ValueError(f"an ipc:// path is at most {MAX_IPC_PATH_BYTES} bytes long (a Unix socket's limit)")
    return value


def _endpoints(value: str) -> tuple[str, ...]:
    """A comma-separated list of ZeroMQ endpoints."""
    return tuple(_zmq_endpoint(part.strip()) for part in value.split(",") if part.strip())


def _listen_host(value: str) -> str:
    """An address to listen on: an IP literal, or localhost."""
    if value == "localhost":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("must be an IP address (such as 127.0.0.1 or ::1) or localhost") from None


def _instance_id(value: str) -> str:
    if not value.isascii() or not value.isprintable() or " " in value or len(value) > 200:
        raise ValueError("must be 1-200 printable ASCII characters without spaces")
    return value


def _bytes(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be a number of bytes between {low} and {high}")
        return number
    return parse


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def _broker_acks(value: str) -> str:
    if value not in ("after-commit", "on-receipt"):
        raise ValueError("must be after-commit or on-receipt")
    return value


def _capacity(value: str) -> int | None:
    if value.lower() == "unlimited":
        return None
    number = int(value)
    if number < 0:
        raise ValueError("must be an integer >= 0, or unlimited")
    return number


def _days(value: str) -> float | None:
    if value.lower() == "forever":
        return None
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number of days, or forever")
    return number


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _setting(env: str, default: Any, parse: Callable[[str], Any], doc: str, *, secret: bool = False) -> Any:
    """``secret``: a process that does not use it must not inherit it (``without_secrets``)."""
    return field(default=default, metadata={"env": env, "parse": parse, "doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """All of sitelink's settings. Durations are in seconds."""

    home: Path = _setting("HOME", PROJECT_ROOT, Path,
                          "Directory holding var/ (the embedded stack) and relative log dirs.")
    database_url: str = _setting("DATABASE_URL", "", _text,
                                 "PostgreSQL URL. Default: the embedded cluster under var/.", secret=True)
    embedded_pg_port: int = _setting("EMBEDDED_PG_PORT", 55432, _port,
                                     "Port of the embedded PostgreSQL (loopback).")
    embedded_mqtt_port: int = _setting("EMBEDDED_MQTT_PORT", 18830, _port,
                                       "Port of the embedded Mosquitto (loopback).")
    runtime_dir: Path = _setting("RUNTIME_DIR", Path("var/run/sitelink"), Path,
                                 "Directory (mode 0700, created by the services) of the logger's ipc socket "
                                 "and the CURVE keys (relative to SITELINK_HOME).")
    events_endpoint: str = _setting("EVENTS_ENDPOINT", "", _zmq_endpoint,
                                    "Where the logger receives events (ZeroMQ ROUTER). Default: "
                                    "ipc://<runtime dir>/events.sock, which only sitelink's user can open; "
                                    "a tcp:// endpoint is encrypted and authenticated with CURVE.")
    status_feed: str = _setting("STATUS_FEED", "tcp://127.0.0.1:5556", _zmq_endpoint,
                                "Where the logger publishes status changes (ZeroMQ PUB).")
    snapshot_endpoint: str = _setting("SNAPSHOT_ENDPOINT", "tcp://127.0.0.1:5557", _zmq_endpoint,
                                      "Where the logger answers snapshot requests of the feed's subscribers "
                                      "(ZeroMQ ROUTER; a REQ socket asks).")
    web_host: str = _setting("WEB_HOST", "127.0.0.1", _listen_host,
                             "Address the status page listens on (IP literal or localhost). The page has no "
                             "login: keep it on loopback.")
    web_port: int = _setting("WEB_PORT", 8780, _port, "Port of the status page (http://<WEB_HOST>:<port>/).")
    web_feeds: tuple[str, ...] = _setting("WEB_FEEDS", (), _endpoints,
                                          "The other hosts' status feeds the status page follows too, "
                                          "comma-separated (a fleet); one per entry of WEB_SNAPSHOTS.")
    web_snapshots: tuple[str, ...] = _setting("WEB_SNAPSHOTS", (), _endpoints,
                                              "The other hosts' snapshot endpoints, comma-separated, in the "
                                              "order of WEB_FEEDS.")
    web_db_timeout: float = _setting("WEB_DB_TIMEOUT", 3.0, _positive_float,
                                     "Longest a database call of the status page may take (connect, "
                                     "statement, TCP keepalives and user timeout).")
    log_dir: Path = _setting("LOG_DIR", Path("logs"), Path,
                             "Directory of the file logs (relative to SITELINK_HOME).")
    log_level: str = _setting("LOG_LEVEL", "INFO", _log_level, "Level of the process logs.")
    instance_id: str = _setting("INSTANCE_ID", "", _instance_id,
                                "Name of this monitor in the fleet: claims, logs, events and the feed. "
                                "Each monitor on a database needs its own; a second one with the same "
                                "name waits. Default: the host name.")
    monitor_interval: float = _setting("MONITOR_INTERVAL", 30.0, _positive_float,
                                       "Seconds between two monitor cycles (NOTIFY wakes it sooner).")
    stop_grace: float = _setting("STOP_GRACE", 5.0, _positive_float,
                                 "Seconds a child gets to stop after SIGTERM before SIGKILL.")
    restart_base: float = _setting("RESTART_BASE", 1.0, _positive_float,
                                   "First delay before restarting a crashed child.")
    restart_cap: float = _setting("RESTART_CAP", 300.0, _positive_float,
                                  "Longest delay before restarting a crashed child.")
    retry_base: float = _setting("RETRY_BASE", 1.0, _positive_float,
                                 "First delay of a child's reconnect backoff.")
    retry_cap: float = _setting("RETRY_CAP", 60.0, _positive_float,
                                "Longest delay of a child's reconnect backoff.")
    max_retries: int = _setting("MAX_RETRIES", 10, _positive_int,
                                "Failed attempts in a row after which a child gives up.")
    retry_cooldown: float = _setting("RETRY_COOLDOWN", 300.0, _positive_float,
                                     "How long a connection that gave up waits before a new start.")
    max_rejections: int = _setting("MAX_REJECTIONS", 3, _positive_int,
                                   "Rejections in a row (bad password, not authorised, TLS certificate, "
                                   "client id) after which a child gives up.")
    connect_rate: float = _setting("CONNECT_RATE", 500.0, _positive_float,
                                   "Most connection attempts per second across one monitor's children.")
    stall_after: float = _setting("STALL_AFTER", 900.0, _positive_float,
                                  "Seconds without a message after which a connected connection is taken "
                                  "for stalled and reconnected (per connection: stall_after).")
    crash_limit: int = _setting("CRASH_LIMIT", 5, _positive_int,
                                "Crashes in a row soon after start after which a child is left stopped.")
    claim_lease: float = _setting("CLAIM_LEASE", 90.0, _positive_float,
                                  "Seconds a monitor's claim on a connection lasts unless renewed; renewed "
                                  "every quarter of it, its children stop three quarters after the last "
                                  "renewal began, whatever happened to PostgreSQL meanwhile.")
    max_connections: int | None = _setting("MAX_CONNECTIONS", None, _capacity,
                                           "Most connections this monitor runs (its capacity in the fleet); "
                                           "unlimited by default, 0 = none.")
    db_timeout: float = _setting("DB_TIMEOUT", 5.0, _positive_float,
                                 "Longest a database call of the monitor may take (connect, statement, "
                                 "TCP keepalives and user timeout); a quarter of the lease if that is less.")
    connect_timeout: float = _setting("CONNECT_TIMEOUT", 10.0, _positive_float,
                                      "Seconds to wait for the TCP connection, CONNACK and SUBACK.")
    resend_after: float = _setting("RESEND_AFTER", 5.0, _positive_float,
                                   "Seconds without an ack after which events are sent again.")
    ack_linger: float = _setting("ACK_LINGER", 3.0, _non_negative_float,
                                 "Seconds a stopping process waits for its last acks.")
    # Twice the logger's largest batch (BATCH_MAX): one batch being written while
    # the next fills. At 1000 a busy site's child paused every batch and fell
    # behind its publisher (tests/bench/RESULTS.md, "Ingest throughput").
    max_unacked: int = _setting("MAX_UNACKED", 4000, _positive_int,
                                "Events a child holds that the logger has not committed; at the limit "
                                "it stops reading from its broker.")
    broker_acks: str = _setting("BROKER_ACKS", "after-commit", _broker_acks,
                                "When a child acknowledges a QoS 1/2 message to its broker: after-commit "
                                "(nothing lost) or on-receipt (paho's default; only to measure the cost "
                                "of the guarantee).")
    max_unacked_bytes: int = _setting("MAX_UNACKED_BYTES", 16 * 1024 * 1024, _bytes(64 * 1024, 1 << 32),
                                      "Bytes of events a child holds that the logger has not committed; at "
                                      "the limit it stops reading from its broker (with MAX_UNACKED, this "
                                      "bounds a child's memory).")
    max_payload: int = _setting("MAX_PAYLOAD", 256 * 1024, _bytes(1024, 64 * 1024 * 1024),
                                "Largest MQTT payload a child parses, in bytes; a larger message becomes a "
                                "VALIDATION_ERROR row with its beginning as sample, and is acknowledged.")
    batch_max: int = _setting("BATCH_MAX", 2000, _positive_int,
                              "Most events the logger writes in one transaction.")
    batch_wait: float = _setting("BATCH_WAIT", 0.01, _non_negative_float,
                                 "Seconds the logger waits to fill a batch.")
    db_retry_cap: float = _setting("DB_RETRY_CAP", 30.0, _positive_float,
                                   "Longest pause of the logger between writes to an unreachable database.")
    gateway_offline_after: float = _setting("GATEWAY_OFFLINE_AFTER", 600.0, _positive_float,
                                            "A gateway not heard for this long is marked offline.")
    datalogger_offline_after: float = _setting("DATALOGGER_OFFLINE_AFTER", 600.0, _positive_float,
                                               "A datalogger not heard for this long is marked offline.")
    sensor_offline_after: float = _setting("SENSOR_OFFLINE_AFTER", 900.0, _positive_float,
                                           "A sensor not heard for this long is marked offline.")

    keep_connection_log_days: float | None = _setting(
        "KEEP_CONNECTION_LOG_DAYS", 30.0, _days,
        "Days the connection log (mqtt_connection_log) is kept; forever: never pruned.")
    keep_status_history_days: float | None = _setting(
        "KEEP_STATUS_HISTORY_DAYS", 90.0, _days,
        "Days the status history (mqtt_status_history) is kept, each connection's state at the cut "
        "included; the reliability views need 7.")
    keep_parsing_log_days: float | None = _setting(
        "KEEP_PARSING_LOG_DAYS", 30.0, _days, "Days the parsing log (mqtt_parsing_log) is kept.")
    keep_quarantine_days: float | None = _setting(
        "KEEP_QUARANTINE_DAYS", 30.0, _days,
        "Days a payload that failed to parse is kept for replay (mqtt_quarantine).")
    keep_readings_days: float | None = _setting(
        "KEEP_READINGS_DAYS", None, _days,
        "Days readings are kept, by whole weeks (a week's partition of reading is dropped once all of it "
        "is older); forever by default.")
    retention_interval: float = _setting("RETENTION_INTERVAL", 300.0, _positive_float,
                                         "Seconds between two pruning rounds of the logger.")
    retention_batch: int = _setting("RETENTION_BATCH", 5000, _positive_int,
                                    "Rows the logger deletes in one transaction when it prunes.")

    def __post_init__(self) -> None:
        # Derived defaults: computed here so they follow SITELINK_HOME.
        if not self.database_url:
            object.__setattr__(self, "database_url",
                               _embedded_database_url(self.home, self.embedded_pg_port))
        if not self.instance_id:
            object.__setattr__(self, "instance_id", socket.gethostname())
        if not self.runtime_dir.is_absolute():
            object.__setattr__(self, "runtime_dir", self.home / self.runtime_dir)
        if not self.events_endpoint:
            object.__setattr__(self, "events_endpoint", f"ipc://{self.runtime_dir / 'events.sock'}")
        if not self.log_dir.is_absolute():
            object.__setattr__(self, "log_dir", self.home / self.log_dir)

    @property
    def var_dir(self) -> Path:
        return self.home / "var"

    @property
    def secrets_dir(self) -> Path:
        """Where the embedded stack's scripts keep the secrets they generate (mode 0700)."""
        return self.var_dir / "secrets"

    @property
    def run_dir(self) -> Path:
        """Where a monitor keeps its instance lock: the runtime directory (private)."""
        return self.runtime_dir

    # The lease, as the monitor keeps it: renewed every quarter, trusted for
    # three quarters after the renewal statement started (by the monitor's own
    # clock), so its children are gone a quarter of a lease before PostgreSQL
    # lets any other monitor take their connections over.

    @property
    def renew_every(self) -> float:
        return self.claim_lease / 4

    @property
    def lease_trusted(self) -> float:
        return self.claim_lease * 3 / 4

    @property
    def db_bound(self) -> float:
        """Bound of one database call of the monitor: never more than the quarter of a lease
        between the fence and the end of the lease."""
        return min(self.db_timeout, self.renew_every)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``environ`` (default: ``os.environ``)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        name = PREFIX + f.metadata["env"]
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = f.metadata["parse"](raw.strip())
        except ValueError as exc:
            reason = str(exc) if not str(exc).startswith(("invalid literal", "could not convert")) \
                else f"expected {f.type}"
            raise ConfigError(f"{name}={raw!r} is not valid: {reason}") from None
    settings = Settings(**values)
    try:
        _zmq_endpoint(settings.events_endpoint)
    except ValueError as exc:
        raise ConfigError(f"{PREFIX}EVENTS_ENDPOINT {settings.events_endpoint!r} (from {PREFIX}RUNTIME_DIR) "
                          f"is not valid: {exc}; set a shorter {PREFIX}RUNTIME_DIR") from None
    if settings.retry_base > settings.retry_cap:
        raise ConfigError(f"{PREFIX}RETRY_BASE ({settings.retry_base}) must not exceed "
                          f"{PREFIX}RETRY_CAP ({settings.retry_cap})")
    if settings.claim_lease <= settings.monitor_interval:
        raise ConfigError(f"{PREFIX}CLAIM_LEASE ({settings.claim_lease}) must exceed "
                          f"{PREFIX}MONITOR_INTERVAL ({settings.monitor_interval}): a monitor's heartbeat "
                          f"is written each cycle")
    if len(settings.web_feeds) != len(settings.web_snapshots):
        raise ConfigError(f"{PREFIX}WEB_FEEDS has {len(settings.web_feeds)} endpoints and {PREFIX}WEB_SNAPSHOTS "
                          f"{len(settings.web_snapshots)}: each other host has one of each")
    if settings.restart_base > settings.restart_cap:
        raise ConfigError(f"{PREFIX}RESTART_BASE ({settings.restart_base}) must not exceed "
                          f"{PREFIX}RESTART_CAP ({settings.restart_cap})")
    return settings


#: libpq reads these (PGPASSWORD, PGPASSFILE, PGHOST, ...): only a process
#: that connects to PostgreSQL needs them.
_LIBPQ_PREFIX = "PG"


def without_secrets(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) without what a process that never
    connects to PostgreSQL must not inherit: the secret settings (the database
    URL) and libpq's variables. The zygote is started with it, so no
    connection child has them in its environment (/proc/<pid>/environ)."""
    environ = os.environ if environ is None else environ
    secret = {PREFIX + f.metadata["env"] for f in dataclasses.fields(Settings) if f.metadata["secret"]}
    return {k: v for k, v in environ.items() if k not in secret and not k.startswith(_LIBPQ_PREFIX)}


def documentation() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, for the README and --help."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if f.name == "home":
            default = "the checkout"
        elif f.name == "database_url":
            default = "embedded cluster under var/"
        elif f.name == "instance_id":
            default = "the host name"
        elif f.name == "events_endpoint":
            default = "ipc://<runtime dir>/events.sock"
        elif f.name == "max_connections":
            default = "unlimited"
        elif f.metadata["parse"] is _days and default is None:
            default = "forever"
        elif default == ():
            default = "none"
        rows.append((PREFIX + f.metadata["env"], str(default), f.metadata["doc"]))
    return rows
