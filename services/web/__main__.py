"""``python -m services.web``: serve the status page until SIGTERM or SIGINT.

``python -m services.web --url`` prints the page's address (``make up`` says it).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from shared import boot, config
from services.web import app


async def _run(settings: config.Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # the handler only records; serve() acts
    return await app.serve(settings, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = boot.settings("web")
    if argv == ["--url"]:
        print(app.url_of(settings))
        return 0
    if argv:
        print("usage: python -m services.web [--url]", file=sys.stderr)
        return 2
    # The page starts without PostgreSQL (its errors answer 503 until it is there).
    boot.start("web", lambda s: f"sitelink: web {app.url_of(s)}", "sitelink-web", database=False, loaded=settings)
    return asyncio.run(_run(settings))


if __name__ == "__main__":
    sys.exit(main())
