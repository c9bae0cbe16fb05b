"""The live status page (services/web): a real Chromium on the real stack.

The browser tests drive Debian's ``chromium`` through ``chromedriver``
(selenium): the page is what an operator opens, the stack is the real one
(PostgreSQL, Mosquitto, logger, monitor, and the web process started like
the others). Without chromium they skip, saying what to install; as root
(``make setup`` installs it, CI runs as root) they must run, so they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.web import board as board_module
from services.web.board import Board
from tests.support import free_port, python_service, stop_process, wait_for

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_PAYLOAD = "<script>window.pwned = 1</script> not json"
SECRET = "s3cret-broker-pw"


# ------------------------------------------------------------ helpers

def http(url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def start_web(stack) -> str:
    """The web process of ``stack`` on a free port (the same one when started again);
    returns the page's URL once its feed is live."""
    port = int(stack.env.get("SITELINK_WEB_PORT") or free_port())
    stack.start("web", SITELINK_WEB_PORT=str(port))
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: http(url + "api/health")[0] == 200, 20, f"the status page to follow the feed "
             f"(output: {stack.output('web')[-2000:]})")
    return url


def page_rows(driver) -> dict[str, dict]:
    """What the page shows, site name -> cells, read from the DOM as a person reads it."""
    return driver.execute_script("""
        const out = {};
        for (const tr of document.querySelectorAll('#sites tbody tr.site')) {
          const cell = (c) => tr.querySelector('.c-' + c).textContent;
          out[cell('site')] = {id: Number(tr.dataset.siteId), status: tr.querySelector('.c-status .badge').textContent,
                               paused: tr.querySelector('.c-status .paused').offsetParent !== null,
                               active: cell('active'), errors: cell('errors'), data: cell('data'),
                               retry: cell('retry'), devices: tr.querySelector('.c-devices button').textContent};
        }
        return out;""")


def wait_row(driver, name: str, check=lambda row: True, timeout: float = 20.0, what: str = "") -> dict:
    def found():
        row = page_rows(driver).get(name)
        return row if row is not None and check(row) else None
    return wait_for(found, timeout, what or f"the page to show site {name!r}", interval=0.02)


def link_state(driver) -> str:
    return driver.execute_script("return document.getElementById('link').dataset.state")


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(lambda: link_state(driver) == "open", 15, "the page's WebSocket to open")
    driver.execute_script("window.sameDocument = true")  # a reload would lose it


def still_same_document(driver) -> bool:
    return driver.execute_script("return window.sameDocument === true")


def site_connected_on_page(driver, stack, broker, name: str) -> tuple[int, str]:
    """A site on the broker, the logger, the monitor and the web process; the page
    open and showing the site connected. Returns its connection id and the page's URL."""
    cid = stack.sql.add_site(name, port=broker.port)
    stack.start("logger", "monitor")
    stack.sql.wait_status(cid, "connected")
    url = start_web(stack)
    open_page(driver, url)
    wait_row(driver, name, lambda r: r["status"] == "connected" and r["active"] == "yes" and not r["paused"])
    return cid, url


# ------------------------------------------------------------ the browser

def _browser_missing() -> str | None:
    missing = [pkg for pkg, path in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER)) if path is None]
    if not missing:
        return None
    return (f"the status page's browser tests need the Debian packages {' and '.join(missing)}: "
            f"apt-get install {' '.join(missing)} as root (make setup does)")


def browser_test(test):
    """A test in the browser on the real stack. An ordinary user without chromium
    skips it before any stack starts; as root (make setup installs chromium, CI
    runs as root) the ``browser`` fixture fails instead."""
    skip = pytest.mark.skipif(_browser_missing() is not None and os.geteuid() != 0,
                              reason=str(_browser_missing()))
    return skip(pytest.mark.slow(pytest.mark.integration(test)))


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    reason = _browser_missing()
    if reason is not None:
        pytest.fail(reason + "; run as root, make setup would have installed them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # This machine has no network beyond loopback: nothing in the background.
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------ the requirements

@browser_test
def test_inactive_site_shows_disconnected_within_a_second_and_a_new_site_appears(browser, stack, broker):
    cid, _ = site_connected_on_page(browser, stack, broker, "north-pier")

    started = time.monotonic()
    stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
    wait_row(browser, "north-pier", lambda r: r["status"] == "disconnected" and r["active"] == "no",
             timeout=10, what="the page to show north-pier inactive and disconnected")
    elapsed = time.monotonic() - started
    # The issue's own requirement, checked as the user would: the only timed assertion here.
    assert elapsed < 1.0, f"the page showed the change {elapsed:.2f} s after the UPDATE"

    stack.sql.add_site("south-quay", port=broker.port)
    wait_row(browser, "south-quay", lambda r: r["active"] == "yes", what="the new site on the page")
    assert still_same_document(browser), "the page was reloaded"
    names = list(page_rows(browser))
    assert names == sorted(names)


@browser_test
def test_the_page_reconnects_after_the_web_process_restarts_and_takes_the_state_again(browser, stack, broker):
    cid, _ = site_connected_on_page(browser, stack, broker, "harbour")

    stack.stop("web")
    wait_for(lambda: link_state(browser) in ("closed", "connecting"), 10, "the page to notice")
    # While nobody serves the page, the state moves on.
    later = stack.sql.add_site("lighthouse", port=broker.port)
    stack.sql.wait_status(later, "connected")
    start_web(stack)
    wait_for(lambda: link_state(browser) == "open", 20, "the page to reconnect by itself")
    wait_row(browser, "lighthouse", lambda r: r["status"] == "connected", what="the state taken again")
    # And the new socket carries the changes.
    stack.sql.rows("UPDATE mqtt_connection SET is_active = false WHERE id = %s", cid)
    wait_row(browser, "harbour", lambda r: r["status"] == "disconnected" and r["active"] == "no")
    assert still_same_document(browser), "the page was reloaded"


@browser_test
def test_latest_errors_of_a_site_on_a_click_and_hostile_text_stays_text(browser, stack, broker, publisher):
    dead_port = free_port()  # nothing listens there
    hostile = stack.sql.add_site(HOSTILE_NAME, port=dead_port, topics=["sites/hostile/#"],
                                 username="site-user", password=SECRET)
    good = stack.sql.add_site("vineyard", port=broker.port)
    stack.start("logger", "monitor", SITELINK_MAX_RETRIES="50", SITELINK_RETRY_BASE="0.2")
    stack.sql.wait_status(good, "connected")
    publisher.publish("sites/vineyard/GW-01", HOSTILE_PAYLOAD)
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_parsing_log") == 1, what="the parse error")
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM mqtt_connection_log WHERE connection_id = %s "
                                     "AND level = 'ERROR'", hostile), what="the hostile site's errors")
    open_page(browser, start_web(stack))

    row = wait_row(browser, HOSTILE_NAME, lambda r: r["errors"] not in ("-", "0"))
    assert browser.execute_script("return document.querySelectorAll('#sites img, #sites script').length") == 0

    from selenium.webdriver.common.by import By
    button = browser.find_element(By.CSS_SELECTOR, f'tr.site[data-site-id="{row["id"]}"] button.errors')
    button.click()
    detail = f'tr.detail[data-site-id="{row["id"]}"]'
    log_rows = wait_for(lambda: browser.execute_script(
        f"return [...document.querySelectorAll('{detail} .connection-log tbody tr')].map(t => t.textContent)"),
        10, "the connection log on the page")
    assert all("ERROR" in text for text in log_rows) and any("refused" in text for text in log_rows)
    assert HOSTILE_NAME in browser.find_element(By.CSS_SELECTOR, f"{detail} .panel-head").text

    vineyard = page_rows(browser)["vineyard"]
    browser.find_element(By.CSS_SELECTOR, f'tr.site[data-site-id="{vineyard["id"]}"] button.errors').click()
    sample = wait_for(lambda: browser.execute_script(
        f"""const pre = document.querySelector('tr.detail[data-site-id="{vineyard["id"]}"] .parsing-log pre');
            return pre && pre.textContent"""), 10, "the parse error's payload sample on the page")
    assert "<script>window.pwned = 1</script>" in sample
    assert browser.execute_script("return window.pwned === undefined && document.querySelectorAll("
                                  "'#sites img, #sites script').length === 0")
    from selenium.common.exceptions import NoAlertPresentException
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text

    # No secret reaches the page or its API.
    assert SECRET not in browser.page_source
    port = stack.env["SITELINK_WEB_PORT"]
    for path in (f"api/sites/{hostile}/errors", "api/state", f"api/sites/{row['id']}/devices"):
        assert SECRET not in http(f"http://127.0.0.1:{port}/{path}")[2].decode()


@browser_test
def test_devices_online_and_offline_counted_and_listed_on_demand(browser, stack, broker, publisher):
    cid = stack.sql.add_site("alpine", port=broker.port)
    stack.start("logger", "monitor", SITELINK_SENSOR_OFFLINE_AFTER="3")
    stack.sql.wait_status(cid, "connected")
    publisher.publish("sites/alpine/GW-01", {"gateway": "GW-01", "datalogger": "DL-1",
                                             "sensors": {"S-1": {"t": 1}, "S-2": {"t": 2}},
                                             "ts": time.time()})
    wait_for(lambda: stack.sql.value("SELECT count(*) FROM sensor") == 2, what="the sensors")
    open_page(browser, start_web(stack))
    wait_row(browser, "alpine", lambda r: r["devices"] == "4 online" and r["data"].endswith("ago"))
    # Only the gateway keeps reporting: the sensors go offline, and the page says so.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and page_rows(browser)["alpine"]["devices"] != "2 online · 2 offline":
        publisher.publish("sites/alpine/GW-01", {"gateway": "GW-01", "datalogger": "DL-1", "ts": time.time()})
        time.sleep(0.5)  # a gateway's heartbeat every half second, as long as it takes
    row = wait_row(browser, "alpine", lambda r: r["devices"] == "2 online · 2 offline", timeout=1)

    from selenium.webdriver.common.by import By
    browser.find_element(By.CSS_SELECTOR, f'tr.site[data-site-id="{row["id"]}"] button.devices').click()
    listed = wait_for(lambda: browser.execute_script(
        f"""return [...document.querySelectorAll('tr.detail[data-site-id="{row["id"]}"] .device-list tbody tr')]
                   .map(t => [...t.cells].map(c => c.textContent))"""), 10, "the device list")
    assert [cells[:2] for cells in listed] == [["gateway", "GW-01"], ["datalogger", "DL-1"],
                                               ["sensor", "S-1"], ["sensor", "S-2"]]
    assert [cells[2].split()[0].rstrip(",") for cells in listed] == ["online", "online", "offline", "offline"]
    assert re.fullmatch(r"offline(, last seen| since) 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d", listed[2][2]), listed[2]


# ------------------------------------------------------------ the web process alone (no browser)

def _web_env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITELINK_")}
    env.update({"SITELINK_HOME": str(tmp_path), "SITELINK_DATABASE_URL": database_url,
                "SITELINK_STATUS_FEED": f"tcp://127.0.0.1:{free_port()}",
                "SITELINK_SNAPSHOT_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
                "SITELINK_WEB_PORT": str(free_port()), **extra})
    return env


@pytest.fixture
def web_alone(tmp_path: Path, database_url: str) -> Iterator[tuple[str, dict]]:
    env = _web_env(tmp_path, database_url)
    proc = python_service("web", env, tmp_path / "web.out")
    url = f"http://127.0.0.1:{env['SITELINK_WEB_PORT']}/"
    try:
        wait_for(lambda: http(url + "api/state")[0] == 200, 15, "the web process to answer")
        yield url, env
    finally:
        stop_process(proc)


def test_the_page_and_its_api_refuse_other_origins_and_say_what_is_wrong(web_alone, database_url):
    url, env = web_alone
    status, headers, body = http(url)
    assert status == 200 and b"/static/app.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    # DNS rebinding: another site's name pointed at 127.0.0.1 gets nothing.
    assert http(url + "api/state", {"Host": f"evil.example:{env['SITELINK_WEB_PORT']}"})[0] == 421
    # Another site's page may not open the WebSocket.
    ws_headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Origin": "http://evil.example"}
    assert http(url + "ws", ws_headers)[0] == 403
    assert http(url + "api/sites/999/errors")[0] == 404
    for limit in ("100000", "0", "-1", "%C2%B2", "", "1" * 5000):
        status, _, body = http(url + f"api/sites/1/errors?limit={limit}")
        assert status == 400 and b"limit" in body, (limit, status, body)
    assert http(url + "api/sites/99999999999999999999/errors")[0] == 404
    assert http(url + "static/../app.py")[0] == 404
    assert http(url + "api/health")[0] == 503  # no logger: the feed is not live, and it says so
    assert json.loads(http(url + "api/state")[2])["feed"]["live"] is False


def test_a_silent_database_answers_503_and_never_stalls_the_page(tmp_path: Path):
    """A database that accepts the connection and never answers: the click gets
    a clear 503 once the bound passes, and the page answers meanwhile."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:  # take every connection, answer none
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    env = _web_env(tmp_path, f"postgresql://sitelink@127.0.0.1:{silent.getsockname()[1]}/sitelink",
                   SITELINK_WEB_DB_TIMEOUT="1")
    proc = python_service("web", env, tmp_path / "web.out")
    url = f"http://127.0.0.1:{env['SITELINK_WEB_PORT']}/"
    try:
        wait_for(lambda: http(url + "api/state")[0] == 200, 15, "the web process to answer")
        answer: dict = {}
        click = threading.Thread(target=lambda: answer.update(r=http(url + "api/sites/1/errors")))
        click.start()
        wait_for(lambda: held, 10, "the web process to call the database")
        # While the database call waits, the event loop serves everyone else.
        assert http(url + "api/state", timeout=5)[0] == 200 and http(url, timeout=5)[0] == 200
        assert "r" not in answer, "the click was answered before the database's bound"
        click.join(30)
        status, _, body = answer["r"]
        assert status == 503 and b"not reachable" in body
    finally:
        stop_process(proc)
        silent.close()
        for conn in held:
            conn.close()
    assert "Traceback" not in (tmp_path / "web.out").read_text()


# ------------------------------------------------------------ the board (pure)

def _status(site_id, cid, status="connected", **extra):
    return {"type": "mqtt_status", "site_id": site_id, "site": f"s{site_id}", "connection_id": cid,
            "status": status, "is_active": True, **extra}


def _device(site_id, kind, did, online):
    return {"type": "device_status", "site_id": site_id, "site": f"s{site_id}", "kind": kind, "id": did,
            "name": f"{kind}-{did}", "is_online": online, "last_seen_at": None}


def test_the_board_counts_devices_and_says_which_sites_changed():
    b = Board()
    assert b.take([_status(1, 10), _device(1, "sensor", 5, True), _device(1, "sensor", 6, False),
                   _status(2, 20, "error", connection_errors=3)]) == {1, 2}
    assert b.row(1)["devices"]["sensor"] == {"online": 1, "offline": 1}
    assert b.take([_device(1, "sensor", 6, True)]) == {1}
    assert b.row(1)["devices"]["sensor"] == {"online": 2, "offline": 0}
    assert b.row(2)["status"] == "error" and b.row(2)["connection_errors"] == 3
    assert b.take([{"type": "site_data", "site_id": 2, "site": "s2", "last_data_at": "2026-11-28T10:00:00+00:00"}]) == {2}
    assert b.row(2)["last_data_at"] == "2026-11-28T10:00:00+00:00"
    assert [r["site_id"] for r in b.rows()] == [1, 2]


def test_the_board_shows_a_sites_newest_connection_and_skips_what_it_cannot_place():
    b = Board()
    b.take([_status(1, 10, "connected"), _status(1, 11, "connecting")])  # deleted and made anew
    assert b.row(1)["connection_id"] == 11 and b.row(1)["status"] == "connecting"
    junk = [{"type": "mqtt_status"}, {"type": "mqtt_status", "site_id": "1", "connection_id": 3},
            {"type": "device_status", "site_id": 1, "kind": "toaster", "id": 1},
            {"type": "device_status", "site_id": 1, "kind": "sensor", "id": True},
            {"type": "monitor_cycle", "site_id": 1}, {"site_id": 1}]
    assert b.take(junk) == set()
    assert b.site_ids() == [1]


def test_the_board_forgets_what_postgresql_no_longer_holds():
    b = Board()
    b.take([_status(1, 10), _device(1, "sensor", 5, True), _status(2, 20)])
    assert b.take([{**_device(1, "sensor", 5, True), "removed": True}]) == {1}
    assert b.row(1)["devices"]["sensor"] == {"online": 0, "offline": 0} and b.knows(1)
    assert b.take([{**_status(2, 20), "removed": True}]) == {2}
    assert not b.knows(2) and b.site_ids() == [1]


def test_the_board_lists_at_most_so_many_devices():
    b = Board()
    b.take([_device(1, "sensor", i, True) for i in range(5)] + [_device(1, "gateway", 99, False)])
    listed, truncated = b.devices(1, limit=3)
    assert [d["kind"] for d in listed] == ["gateway", "sensor", "sensor"] and truncated
    assert b.devices(1)[1] is False and board_module.MAX_DEVICES_LISTED >= 1000


# ------------------------------------------------------------ the hub (one event loop, fake sockets)

class _FakeSocket:
    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self.closed_with = code


def test_changes_go_out_gathered_and_a_browser_that_cannot_keep_up_is_dropped():
    from services.web.app import CLIENT_QUEUE, FLUSH_AFTER, Client, Hub

    async def scenario() -> tuple[Hub, list[dict], Client, _FakeSocket]:
        hub = Hub()
        watching, stuck = Client(_FakeSocket()), Client(_FakeSocket())
        hub.clients |= {watching, stuck}
        health = {"live": True, "errors": {}, "hosts": 1}
        hub.take([_status(1, 10)], health, True)
        for status in ("connecting", "connected", "error"):  # three changes in a burst...
            hub.take([_status(2, 20, status)], health, False)
        hub.take([_device(1, "gateway", 5, True)], health, False)
        deadline = time.monotonic() + 5  # ... and the flush timer they set
        while watching.queue.qsize() < 2 and time.monotonic() < deadline:
            await asyncio.sleep(FLUSH_AFTER / 5)
        sent = [json.loads(watching.queue.get_nowait()) for _ in range(watching.queue.qsize())]
        for _ in range(CLIENT_QUEUE):  # a browser that reads nothing
            hub.broadcast("{}")
        await asyncio.sleep(0)
        return hub, sent, stuck, stuck.ws

    hub, sent, stuck, ws = asyncio.run(scenario())
    assert [m["type"] for m in sent] == ["state", "update"]  # one message for the burst
    rows = {row["site_id"]: row for row in sent[1]["sites"]}
    assert rows.keys() == {1, 2} and rows[2]["status"] == "error"
    assert rows[1]["devices"]["gateway"] == {"online": 1, "offline": 0}
    assert stuck not in hub.clients and ws.closed_with == 1013
