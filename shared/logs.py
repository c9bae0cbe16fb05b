"""loguru set-up shared by every process.

Process logs go to stderr (supervisord keeps them under var/log/). The
logger process adds the two operator-facing files: ``mqtt_connections.log``
and ``mqtt_parsing.log``, selected by the ``channel`` bound to a record.
The standard ``logging`` module (and so paho's and psycopg's loggers) is
routed into loguru.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {extra[process]} | {message}"
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {message}"
CHANNEL_FILES = {"connections": "mqtt_connections.log", "parsing": "mqtt_parsing.log"}


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
    logger.configure(extra={"process": process, "channel": None})
    logger.add(sys.stderr, level=level, format=FORMAT, backtrace=False, diagnose=False)
    if channel_dir is not None:
        channel_dir.mkdir(parents=True, exist_ok=True)
        for channel, filename in CHANNEL_FILES.items():
            logger.add(channel_dir / filename, level="DEBUG", format=FILE_FORMAT,
                       filter=lambda record, c=channel: record["extra"].get("channel") == c,
                       rotation="50 MB", retention=10, encoding="utf-8",
                       backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)


def channel(name: str):
    """A logger whose records go to the file of ``name`` (and to stderr)."""
    return logger.bind(channel=name)
