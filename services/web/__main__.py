"""``python -m services.web``: serve the status page until SIGTERM or SIGINT.

``python -m services.web --url`` prints the page's address (``make up`` says it).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from shared import config, exitcodes, logs, process
from services.web import app


async def _run(settings: config.Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # the handler only records; serve() acts
    return await app.serve(settings, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"sitelink web: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    if argv == ["--url"]:
        print(app.url_of(settings))
        return 0
    if argv:
        print("usage: python -m services.web [--url]", file=sys.stderr)
        return 2
    process.set_title(f"sitelink: web {app.url_of(settings)}", "sitelink-web")
    logs.setup("web", settings.log_level)
    return asyncio.run(_run(settings))


if __name__ == "__main__":
    sys.exit(main())
