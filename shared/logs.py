"""loguru set-up shared by every process.

Process logs go to stderr (supervisord keeps them under var/log/). The
logger process adds the two operator-facing files: ``mqtt_connections.log``
and ``mqtt_parsing.log``, selected by the ``channel`` bound to a record.
The standard ``logging`` module (and so paho's and psycopg's loggers) is
routed into loguru.

One event is one line: whatever a message holds (a topic, a device name, a
broker's or PostgreSQL's multi-line error), newlines and every other
non-printable character are escaped before any sink sees it, so nobody can
forge a log line by naming a sensor "x\\n2026-... | ERROR | ...".
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from loguru import logger

from shared import limits

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {extra[process]} | {message}"
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {message}"
CHANNEL_FILES = {"connections": "mqtt_connections.log", "parsing": "mqtt_parsing.log"}


def _one_line_record(record) -> None:
    record["message"] = limits.printable(record["message"])


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def setup(process: str, level: str = "INFO", channel_dir: Path | None = None) -> None:
    """Route everything to stderr; with ``channel_dir``, also write the channel files."""
    logger.remove()
    logger.configure(extra={"process": process, "channel": None}, patcher=_one_line_record)
    logger.add(sys.stderr, level=level, format=FORMAT, backtrace=False, diagnose=False)
    if channel_dir is not None:
        channel_dir.mkdir(parents=True, exist_ok=True)
        for channel, filename in CHANNEL_FILES.items():
            logger.add(channel_dir / filename, level="DEBUG", format=FILE_FORMAT,
                       filter=lambda record, c=channel: record["extra"].get("channel") == c,
                       rotation="50 MB", retention=10, encoding="utf-8",
                       backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)


def rename(process: str) -> None:
    """Name the process in the lines of a set-up inherited through a fork
    (the zygote's children): cheaper than a new ``setup``."""
    logger.configure(extra={"process": process, "channel": None})


def channel(name: str):
    """A logger whose records go to the file of ``name`` (and to stderr)."""
    return logger.bind(channel=name)


class Throttle:
    """Log a kind of trouble at most once per ``every`` seconds, counting the rest.

    For what a hostile or broken peer can repeat thousands of times a second.
    """

    def __init__(self, every: float = 10.0):
        self.every = every
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, key: str, text: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        suffix = f" (and {quiet} more like it in the last {self.every:g} s)" if quiet else ""
        logger.opt(depth=1).warning(text + suffix, *args)
