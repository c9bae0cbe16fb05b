"""What every service does first, in one place.

Read the settings (a bad one stops the service with exit code CONFIG and a
message naming the variable), lift the open-file limit, say who it is (the
process title ``ps`` shows), set up its logs and, for those that need it,
wait for a reachable, migrated database. A service that cannot start as
configured exits with ``exitcodes.CONFIG``: supervisord shows the code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from loguru import logger

from shared import config, db, exitcodes, logs, process


def settings(service: str) -> config.Settings:
    """The settings, or exit with CONFIG saying which variable is wrong."""
    try:
        return config.load()
    except config.ConfigError as exc:
        print(f"sitelink {service}: {exc}", file=sys.stderr)
        raise SystemExit(exitcodes.CONFIG) from None


def start(service: str, title: Callable[[config.Settings], str], short: str, *,
          files: bool = False, database: bool = True, bound: float | None = None,
          loaded: config.Settings | None = None) -> config.Settings:
    """Start ``service`` (its name in logs, ``sitelink-<service>`` towards
    PostgreSQL): title ``title(settings)``, short name ``short``; ``files``:
    write the operator's log files too; ``database``: wait until it is
    reachable and fully migrated (each call bounded by ``bound`` seconds)."""
    found = loaded if loaded is not None else settings(service)
    process.raise_fd_limit()
    process.set_title(title(found), short)
    logs.setup(service, found.log_level, channel_dir=found.log_dir if files else None)
    if database:
        try:
            db.wait_until_ready(found.database_url, f"sitelink-{service}", bound).close()
        except db.SchemaBehind as exc:
            logger.error("{}", exc)
            raise SystemExit(exitcodes.CONFIG) from None
    return found
