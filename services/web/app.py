"""The status page's web process: one FeedClient in, every browser out.

    feed (ZeroMQ, every host) --> FeedClient (its own thread) --> Board --> WebSocket --> browsers
    PostgreSQL (read-only, bounded, its own thread) <-- GET /api/sites/<id>/errors <-- a click

- ``Follower`` runs one ``shared.feed.FeedClient`` in a thread of its own
  (its ZeroMQ sockets never leave that thread; its snapshot requests block)
  and hands the event loop the current state, then each change.
- ``Hub`` keeps the ``Board`` (services/web/board.py) and the browsers: a
  browser that connects gets the whole state, then only the rows that
  changed, gathered for ``FLUSH_AFTER``. Every browser has a bounded queue; one that cannot keep up is
  disconnected, reconnects by itself and takes the state again, so a slow
  browser costs memory for a few messages, never for the feed's history.
- ``SiteErrors`` reads the latest errors of a site through ``shared.db``:
  named queries (sql/queries.sql), a read-only transaction, every call
  bounded by ``SITELINK_WEB_DB_TIMEOUT``. shared/db.py is synchronous (one
  owner of connections, psycopg's blocking API), so its calls run in one
  worker thread: the event loop never waits on PostgreSQL, the connection is
  used by one thread only, and a slow database delays clicks, never the live
  updates. Requests beyond a few waiting ones are refused (503) rather than
  queued without end.

The page itself is plain files in ``static/`` (no build step, nothing from
another host). They build every node with ``textContent``: whatever a site
name, a log message or a payload sample holds is shown as text. The
Content-Security-Policy below allows scripts from this origin only, so even
a mistake there could not run injected code.

Browsers reach the page from anywhere they browse, so the process checks the
``Host`` header (a DNS-rebinding page gets no answer) and a WebSocket's
``Origin`` (another site's page cannot open it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from loguru import logger

from shared import config, db, exitcodes, feed
from services.web.board import Board

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The format of the messages the page's script reads (``v``); the script
#: asks for a reload when the server speaks another.
PAGE_VERSION = 1
#: Messages waiting for one browser; beyond, it is disconnected (it reconnects
#: and takes the whole state again).
CLIENT_QUEUE = 200
#: Browsers at once.
MAX_CLIENTS = 100
#: Changes are gathered this long and sent as one message: a busy feed costs a
#: browser at most 1/FLUSH_AFTER messages a second, each site in it once.
FLUSH_AFTER = 0.05
#: The server says the time this often; a page that hears nothing for three
#: times as long takes its socket for dead and reconnects.
TICK_EVERY = 5.0
#: How long the feed thread waits on its sockets per pass (and so how long it
#: takes to notice that it must stop).
POLL_WAIT = 0.25
#: After the FeedClient fails in a way it does not handle itself, a new one
#: starts after this long.
FOLLOW_RESTART = 2.0
#: Rows of each log one click shows, by default and at most.
ERRORS_DEFAULT, ERRORS_MAX = 20, 200
#: Characters of each text (message, traceback, payload sample) an answer holds.
TEXT_MAX = 4000
#: Database requests waiting for the worker thread before more are refused.
DB_WAITING_MAX = 8

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def url_of(settings: config.Settings) -> str:
    """The page's address, as a user types it."""
    host = settings.web_host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.web_port}/"


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def allowed_hosts(settings: config.Settings) -> frozenset[str] | None:
    """``Host`` headers the page answers (None: any, when it listens beyond loopback)."""
    if not is_loopback(settings.web_host):
        return None
    port = settings.web_port
    names = {"127.0.0.1", "localhost", "[::1]", urlsplit(url_of(settings)).netloc.rsplit(":", 1)[0]}
    return frozenset(f"{name}:{port}" for name in names)


# ---------------------------------------------------------------- the feed

class Follower:
    """One FeedClient, in a thread of its own; what it hears goes to ``deliver``
    on the event loop: ``deliver(bodies, health, full)``, ``full`` when
    ``bodies`` is the whole state (at start, or from a new FeedClient)."""

    def __init__(self, feeds: list[str], snapshots: list[str], loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[list[dict], dict, bool], None]):
        self.feeds, self.snapshots = feeds, snapshots
        self._loop = loop
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sitelink-web-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(wait)  # a snapshot request in flight may outlast it: the thread is a daemon

    def _send(self, bodies: list[dict], health: dict, full: bool) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, bodies, health, full)
        except RuntimeError:  # the loop is closed: we are stopping
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception:  # noqa: BLE001 - a FeedClient failure must not leave the page stale forever
                logger.exception("the status feed client failed; starting a new one in {:g} s", FOLLOW_RESTART)
                self._stop.wait(FOLLOW_RESTART)

    def _follow(self) -> None:
        client = feed.FeedClient(list(self.feeds), list(self.snapshots))
        try:
            client.start()
            # The whole state, as the FeedClient holds it (this thread alone touches it).
            state = [*client.connections.values(), *client.devices.values(), *client.sites.values()]
            health = self._health(client)
            self._send(state, health, True)
            for endpoint, error in client.errors.items():
                logger.warning("no snapshot from {} yet ({}); trying again", endpoint, error)
            while not self._stop.is_set():
                changes = client.poll(POLL_WAIT)
                now = self._health(client)
                if changes or now != health:
                    if now["errors"] != health["errors"]:
                        logger.info("status feed: {}", "every host answers" if not now["errors"]
                                    else "; ".join(f"{k}: {v}" for k, v in now["errors"].items()))
                    health = now
                    self._send(changes, health, False)
        finally:
            client.close()

    @staticmethod
    def _health(client: feed.FeedClient) -> dict:
        return {"live": client.live, "errors": dict(client.errors), "hosts": len(client.snapshots)}


# ---------------------------------------------------------------- the browsers

class Client:
    """One browser's WebSocket and what waits to be sent to it."""

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws
        self.queue: asyncio.Queue[str] = asyncio.Queue(CLIENT_QUEUE)

    async def send_loop(self) -> None:
        try:
            while True:
                await self.ws.send_str(await self.queue.get())
        except (ConnectionError, RuntimeError):  # the browser went away: its handler ends it
            await self.ws.close()


class Hub:
    """The board and the browsers that watch it."""

    def __init__(self) -> None:
        self.board = Board()
        self.health: dict = {"live": False, "errors": {}, "hosts": 0}
        self.clients: set[Client] = set()
        self._dirty: set[int] = set()  # sites changed since the last message
        self._health_changed = False
        self._flush: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task] = set()  # held: the loop keeps only weak references to tasks

    def take(self, bodies: list[dict], health: dict, full: bool) -> None:
        """What the Follower heard (on the event loop)."""
        if full:
            self.board = Board()
            self.board.take(bodies)
            self.health = health
            self._dirty.clear()
            self._health_changed = False
            self.broadcast(self.state_text())
            return
        self._dirty |= self.board.take(bodies)
        if health != self.health:
            self.health = health
            self._health_changed = True
        if (self._dirty or self._health_changed) and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        """Send what changed since the last message: each changed site's row, the feed's health."""
        self._flush = None
        message: dict[str, Any] = {"type": "update"}
        if self._dirty:
            message["sites"] = self.board.rows(s for s in self._dirty if self.board.knows(s))
            gone = sorted(s for s in self._dirty if not self.board.knows(s))
            if gone:
                message["gone"] = gone  # sites deleted from PostgreSQL
            self._dirty = set()
        if self._health_changed:
            message["feed"] = self.health
            self._health_changed = False
        if len(message) > 1:
            self.broadcast(self._text(message))

    def state(self) -> dict:
        return {"type": "state", "sites": self.board.rows(), "feed": self.health}

    def state_text(self) -> str:
        return self._text(self.state())

    def tick(self) -> None:
        self.broadcast(self._text({"type": "tick"}))

    @staticmethod
    def _text(message: dict) -> str:
        return json.dumps({"v": PAGE_VERSION, "now": now_iso(), **message}, separators=(",", ":"))

    def broadcast(self, text: str) -> None:
        for client in list(self.clients):
            try:
                client.queue.put_nowait(text)
            except asyncio.QueueFull:
                self.drop(client, "too slow to follow the feed")

    def drop(self, client: Client, why: str) -> None:
        if client in self.clients:
            self.clients.discard(client)
            logger.info("disconnecting a browser: {}", why)
            task = asyncio.ensure_future(client.ws.close(code=1013, message=b"too slow: reconnect"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        clients, self.clients = list(self.clients), set()
        for client in clients:
            await client.ws.close(code=1001, message=b"the status page is stopping")


# ---------------------------------------------------------------- the database

class Busy(Exception):
    """Too many database requests wait already."""


class SiteErrors:
    """The latest errors of a site, from PostgreSQL: read-only, bounded, off the event loop."""

    def __init__(self, url: str, bound: float):
        self.bound = bound
        self._db = db.Database(url, "sitelink-web", bound)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sitelink-web-db")
        self._waiting = 0

    async def latest(self, site_id: int, limit: int) -> dict | None:
        """``None`` if the site does not exist."""
        if self._waiting >= DB_WAITING_MAX:
            raise Busy(f"{self._waiting} requests wait for the database already")
        self._waiting += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._read, site_id, limit)
            # Each call is bounded by the connection's own limits; this only
            # keeps a request from waiting out the ones queued before it.
            return await asyncio.wait_for(future, timeout=DB_WAITING_MAX * 5 * self.bound + 5)
        finally:
            self._waiting -= 1

    def _read(self, site_id: int, limit: int) -> dict | None:
        params = {"site_id": site_id, "limit": limit, "text_max": TEXT_MAX}
        with self._db.transaction() as s:
            s.run("read_only_transaction")
            site = s.one("web_site", params)
            if site is None:
                return None
            connection_log = s.rows("web_connection_errors", params)
            parsing_log = s.rows("web_parsing_errors", params)
        return {"site_id": site["site_id"], "site": site["site"], "read_at": now_iso(),
                "connection_log": [_jsonable(r) for r in connection_log],
                "parsing_log": [_jsonable(r) for r in parsing_log]}

    def close(self) -> None:
        self._executor.submit(self._db.close)
        self._executor.shutdown(wait=True)


def _jsonable(row: dict) -> dict:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


# ---------------------------------------------------------------- the HTTP side

HUB = web.AppKey("hub", Hub)
ERRORS = web.AppKey("errors", SiteErrors)
SETTINGS = web.AppKey("settings", config.Settings)
FOLLOWER = web.AppKey("follower", Follower)
TICKER = web.AppKey("ticker", asyncio.Task)


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_guard(hosts: frozenset[str] | None):
    @web.middleware
    async def guard(request: web.Request, handler):
        # DNS rebinding: a page of another site, its name pointed at 127.0.0.1,
        # would send its own name as Host.
        if hosts is not None and request.host not in hosts:
            return _json_error(421, "unknown Host: open the page by its address (127.0.0.1, localhost)")
        return await handler(request)
    return guard


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def state(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    return web.json_response({"v": PAGE_VERSION, "now": now_iso(), **hub.state()})


async def health(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    return web.json_response({"feed": hub.health, "browsers": len(hub.clients)},
                             status=200 if hub.health["live"] else 503)


def _site_id(request: web.Request) -> int:
    site_id = int(request.match_info["site_id"])  # the route admits digits only
    if site_id >= 1 << 63:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such site"}), content_type="application/json")
    return site_id


async def site_errors(request: web.Request) -> web.Response:
    site_id = _site_id(request)
    raw = request.query.get("limit", str(ERRORS_DEFAULT))
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= ERRORS_MAX:
        return _json_error(400, f"limit must be a whole number from 1 to {ERRORS_MAX}")
    try:
        found = await request.app[ERRORS].latest(site_id, int(raw))
    except Busy as exc:
        return _json_error(503, f"the database is busy ({exc}); try again")
    except db.DatabaseUnavailable as exc:
        logger.warning("errors of site {}: the database is not reachable: {}", site_id, exc)
        return _json_error(503, "the database is not reachable or did not answer in time; try again")
    except asyncio.TimeoutError:
        logger.warning("errors of site {}: the database requests before it did not finish in time", site_id)
        return _json_error(503, "the database did not answer in time; try again")
    except db.DatabaseError as exc:
        logger.error("errors of site {}: {}", site_id, exc)
        return _json_error(500, "the database refused the request (see the web program's log)")
    if found is None:
        return _json_error(404, f"no site {site_id}")
    return web.json_response(found)


async def site_devices(request: web.Request) -> web.Response:
    site_id = _site_id(request)
    board = request.app[HUB].board
    if not board.knows(site_id):
        return _json_error(404, f"no site {site_id} on the feed")
    devices, truncated = board.devices(site_id)
    return web.json_response({"site_id": site_id, "devices": devices, "truncated": truncated})


async def websocket(request: web.Request) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    # A page of another site may open a WebSocket to any address; only ours
    # may read this one. (Clients without Origin are not browsers.)
    if origin is not None and urlsplit(origin).netloc != request.host:
        return _json_error(403, "cross-origin WebSocket refused")
    hub = request.app[HUB]
    if len(hub.clients) >= MAX_CLIENTS:
        return _json_error(503, f"{MAX_CLIENTS} browsers watch already")
    ws = web.WebSocketResponse(heartbeat=TICK_EVERY * 2, max_msg_size=4096)
    await ws.prepare(request)
    client = Client(ws)
    # The state, then every change: both queued on the event loop, in order.
    client.queue.put_nowait(hub.state_text())
    hub.clients.add(client)
    sender = asyncio.create_task(client.send_loop())
    try:
        async for message in ws:  # the page sends nothing; this waits for the close
            if message.type == WSMsgType.ERROR:
                break
    finally:
        hub.clients.discard(client)
        sender.cancel()
    return ws


async def _tick(hub: Hub) -> None:
    while True:
        await asyncio.sleep(TICK_EVERY)
        hub.tick()


async def _on_startup(app: web.Application) -> None:
    settings = app[SETTINGS]
    hub = app[HUB]
    follower = Follower([settings.status_feed, *settings.web_feeds],
                        [settings.snapshot_endpoint, *settings.web_snapshots],
                        asyncio.get_running_loop(), hub.take)
    app[FOLLOWER] = follower
    follower.start()
    app[TICKER] = asyncio.create_task(_tick(hub))


async def _on_shutdown(app: web.Application) -> None:
    app[TICKER].cancel()
    await app[HUB].close_all()


async def _on_cleanup(app: web.Application) -> None:
    await asyncio.get_running_loop().run_in_executor(None, app[FOLLOWER].stop)
    await asyncio.get_running_loop().run_in_executor(None, app[ERRORS].close)


def make_app(settings: config.Settings) -> web.Application:
    app = web.Application(middlewares=[make_guard(allowed_hosts(settings))], client_max_size=4096)
    app[SETTINGS] = settings
    app[HUB] = Hub()
    app[ERRORS] = SiteErrors(settings.database_url, settings.web_db_timeout)
    app.on_response_prepare.append(_security_headers)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/api/state", state)
    app.router.add_get("/api/health", health)
    app.router.add_get(r"/api/sites/{site_id:[0-9]{1,19}}/errors", site_errors)
    app.router.add_get(r"/api/sites/{site_id:[0-9]{1,19}}/devices", site_devices)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
    return app


async def serve(settings: config.Settings, stop: asyncio.Event) -> int:
    """Serve until ``stop`` is set; an exit code."""
    app = make_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.web_host, settings.web_port)
    try:
        await site.start()
    except OSError as exc:
        logger.error("cannot listen on {}:{}: {}", settings.web_host, settings.web_port, exc)
        await runner.cleanup()
        return exitcodes.CONFIG
    if not is_loopback(settings.web_host):
        logger.warning("the status page listens on {}, beyond loopback: it has no login, so anyone who "
                       "reaches that address reads it", settings.web_host)
    logger.info("status page on {} (feeds: {})", url_of(settings),
                ", ".join([settings.status_feed, *settings.web_feeds]))
    started = time.monotonic()
    try:
        await stop.wait()
    finally:
        logger.info("stopping after {:.0f} s, {} browsers connected", time.monotonic() - started,
                    len(app[HUB].clients))
        await runner.cleanup()
    return 0
