"""Reconnect after a broker restart: how long K connections take to come back, and how hard they knock.

K (SITELINK_BENCH_CHILDREN, default 200) active connections, ``stall_after``
NULL, point at a Mosquitto this benchmark starts itself (its own
world-traversable directory, so it can stop it and start it again on the
same port, persistent sessions kept). The logger and the monitor run with
the services' defaults (SITELINK_RETRY_BASE, SITELINK_RETRY_CAP,
SITELINK_CONNECT_RATE...). Once all K are ``connected``:

1. the broker gets SIGTERM; the benchmark waits until no row is
   ``connected`` any more (the logger committed every loss);
2. the broker is started again on the same port, and PostgreSQL is polled
   every 50 ms until all K are ``connected`` again.

Measured: broker start -> all K ``connected`` committed, and the connection
attempts made after the broker start: the ``mqtt_connection_log`` rows with
a message ``Connecting%`` (one per attempt, stamped with the child's own
event time) whose ``timestamp`` is at or after the broker start. Their rate
is the busiest sliding 1-s window (attempts with a timestamp in [t, t + 1)),
the busiest 100-ms window x 10, and the mean from the first to the last.
The target is the busiest 1-s window <= SITELINK_CONNECT_RATE.

The same is measured a second time with SITELINK_CONNECT_RATE at
SITELINK_BENCH_RECONNECT_RATE (default 50), on a fresh database and broker,
to show the limit binding: then K connections cannot all be attempted in
under K / rate seconds.
"""

from __future__ import annotations

import bisect
import time
from pathlib import Path

import pytest

from tests.bench import results
from tests.bench.harness import (CpuMeter, default, descendants, env_float, env_int, fmt, measure_quietly,
                                 service_defaults, wait_until_quiet)
from tests.stack import SQL, Stack
from tests.support import Mosquitto, remove_tree, wait_for, world_traversable_tmpdir

K = env_int("SITELINK_BENCH_CHILDREN", 200)
#: SITELINK_CONNECT_RATE of the second run, low enough for the limit to bind.
LOW_RATE = env_float("SITELINK_BENCH_RECONNECT_RATE", 50.0)
TIMEOUT = env_float("SITELINK_BENCH_RECONNECT_TIMEOUT", 90.0)
RATE_SETTING = "SITELINK_CONNECT_RATE"

pytestmark = [pytest.mark.bench, pytest.mark.timeout(int(3 * TIMEOUT) + 240)]


def busiest(times: list[float], width: float) -> int:
    """The most of ``times`` within one window [t, t + width), t anywhere (sliding)."""
    ordered = sorted(times)
    # The busiest window can always be made to start at one of the times.
    return max((bisect.bisect_left(ordered, t + width) - i for i, t in enumerate(ordered)), default=0)


def shortest_span(times: list[float], n: int) -> float | None:
    """The shortest time from one of ``times`` to the ``n``-th after it (n + 1 attempts); None if too few."""
    ordered = sorted(times)
    return min((ordered[i + n] - ordered[i] for i in range(len(ordered) - n)), default=None)


def _connected(sql: SQL) -> int:
    return sql.value("SELECT count(*) FROM mqtt_connection WHERE status = 'connected'")


def _wait_count(sql: SQL, check, timeout: float) -> tuple[float | None, int]:
    """Poll every 50 ms until ``check(connected count)``; (time.time() when it held or None, last count)."""
    deadline = time.monotonic() + timeout
    while True:
        n = _connected(sql)
        if check(n):
            return time.time(), n
        if time.monotonic() >= deadline:
            return None, n
        time.sleep(0.05)


def _measure(bench_db: str, durable_pg, tmp_path: Path, overrides: dict[str, str]) -> dict:
    """K connections to a broker of our own; restart it; time and count the reconnection."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    broker_dir = world_traversable_tmpdir("sitelink-bench-reconnect-mqtt-")
    broker = Mosquitto(broker_dir)
    broker.start()
    stack = None
    figures: dict = {"rate": float(overrides.get(RATE_SETTING) or default(RATE_SETTING))}
    try:
        sql_setup = SQL(bench_db)
        sql_setup.rows("INSERT INTO site (name) SELECT 'rc-' || g FROM generate_series(1, %s) g", K)
        sql_setup.rows("INSERT INTO mqtt_connection (site_id, broker_host, broker_port, topics, keepalive, "
                       "stall_after) SELECT id, '127.0.0.1', %s, ARRAY['sites/' || name || '/#'], 60, NULL "
                       "FROM site", broker.port)
        sql_setup.close()

        stack = Stack(bench_db, broker, tmp_path)
        service_defaults(stack, **overrides)
        stack.start("logger")
        wait_for(lambda: "logger ready" in stack.output("logger"), 30, "the logger to be ready")
        t0 = time.time()
        stack.start("monitor")
        at, n = _wait_count(stack.sql, lambda c: c >= K, TIMEOUT)
        figures["initial"] = at - t0 if at else None
        if at is None:
            raise AssertionError(f"only {n} of {K} connections were connected {TIMEOUT:g} s after the "
                                 f"monitor started")

        def monitor_family() -> list[int]:
            proc = stack.procs.get("monitor")
            return [proc.pid, *descendants(proc.pid)] if proc is not None else []
        meter = CpuMeter({"monitor + children": monitor_family, "logger": lambda: [stack.pid("logger")],
                          "mosquitto": lambda: [broker.proc.pid] if broker.proc is not None else [],
                          "postgres": lambda: [durable_pg.proc.pid, *descendants(durable_pg.proc.pid)]},
                         precise=True)  # children run ms each: whole ticks miss them
        figures["busy_before"] = wait_until_quiet()

        # 1. The broker goes away.
        t_term = time.time()
        broker.stop()  # SIGTERM, waits for it to exit (it saves its persistent sessions)
        figures["broker_exit"] = time.time() - t_term
        at, n = _wait_count(stack.sql, lambda c: c == 0, TIMEOUT)
        if at is None:
            raise AssertionError(f"{n} connections were still connected {TIMEOUT:g} s after the broker stopped")
        figures["all_lost"] = at - t_term

        # 2. The same broker comes back on the same port.
        meter.start()
        t_start = time.time()
        broker.start()
        figures["listening"] = time.time() - t_start
        figures["down"] = t_start - t_term
        at, n = _wait_count(stack.sql, lambda c: c >= K, TIMEOUT)
        meter.stop()
        figures["connected"] = n
        figures["reconnect"] = at - t_start if at else None
        figures["cpu"], figures["disturbed"] = meter.describe(), meter.disturbed()
        last = stack.sql.value("SELECT extract(epoch FROM max(last_connected_at))::float8 FROM mqtt_connection "
                               "WHERE status = 'connected'")
        figures["child_clock_last"] = last - t_start if last else None

        # Every attempt made before a connection's `connected` is committed with or before it.
        rows = stack.sql.rows(
            "SELECT connection_id, extract(epoch FROM timestamp)::float8 AS ts FROM mqtt_connection_log "
            "WHERE message LIKE 'Connecting%%' AND timestamp >= to_timestamp(%s) ORDER BY timestamp", t_term)
        attempts = [r["ts"] for r in rows if r["ts"] >= t_start]
        figures["before_restart"] = sum(1 for r in rows if r["ts"] < t_start)
        figures["attempts"] = len(attempts)
        figures["busiest_1s"] = busiest(attempts, 1.0)
        figures["busiest_100ms"] = 10 * busiest(attempts, 0.1)
        # Within the limit, limit + 1 attempts span at least 1 s.
        figures["limit_plus_one"] = shortest_span(attempts, int(figures["rate"]))
        figures["first_attempt"] = attempts[0] - t_start if attempts else None
        figures["span"] = attempts[-1] - attempts[0] if len(attempts) > 1 else None
        figures["mean_rate"] = (len(attempts) - 1) / figures["span"] if figures["span"] else None
        per_connection: dict[int, int] = {}
        for r in rows:
            if r["ts"] >= t_start:
                per_connection[r["connection_id"]] = per_connection.get(r["connection_id"], 0) + 1
        figures["most_per_connection"] = max(per_connection.values(), default=0)
        figures["failed"] = stack.sql.value(
            "SELECT count(*) FROM mqtt_connection_log WHERE level = 'ERROR' AND timestamp >= to_timestamp(%s)",
            t_start)
        figures["gave_up"] = stack.sql.value(
            "SELECT count(*) FROM mqtt_connection_log WHERE message LIKE '%%giving up%%' "
            "AND timestamp >= to_timestamp(%s)", t_term)
        figures["not_connected"] = stack.sql.rows(
            "SELECT id, status, error_message FROM mqtt_connection WHERE status <> 'connected' ORDER BY id LIMIT 5")
    finally:
        if stack is not None:
            stack.close()  # the monitor first: it stops its children
        broker.stop()
        remove_tree(broker_dir)
    print(f"\n[reconnect] {' '.join(f'{k}={v}' for k, v in overrides.items()) or 'defaults'}: "
          f"{figures['connected']}/{K} connected {fmt(figures['reconnect'], 2)} s after the broker start; "
          f"{figures['attempts']} attempts, busiest 1 s {figures['busiest_1s']}, "
          f"busiest 100 ms x10 {figures['busiest_100ms']}/s", flush=True)
    return figures


def test_reconnect_after_broker_restart(open_files_limit, databases, durable_pg, tmp_path):
    variants = {"defaults": {}, f"{RATE_SETTING}={LOW_RATE:g}": {RATE_SETTING: f"{LOW_RATE:g}"}}
    attempts = iter(range(1, 100))
    runs: dict[str, dict] = {}
    for name, overrides in variants.items():
        runs[name] = measure_quietly(f"reconnect, {name}", lambda o=overrides: _measure(
            databases.sitelink(), durable_pg, tmp_path / f"attempt-{next(attempts)}", o))
    names = list(runs)
    limits = {n: runs[n]["rate"] for n in names}

    def each(key: str, digits: int = 2, bold: bool = False) -> list[str]:
        cells = [fmt(runs[n][key], digits) for n in names]
        return [f"**{c}**" for c in cells] if bold else cells

    rows = [
        ["connection attempts per second allowed (SITELINK_CONNECT_RATE)"] + [fmt(limits[n]) for n in names]
        + [""],
        [f"monitor started -> all {K} `connected` (before the restart)"] + each("initial") + [""],
        ["SIGTERM to the broker -> broker exited"] + each("broker_exit") + [""],
        ["SIGTERM to the broker -> no row `connected`"] + each("all_lost") + [""],
        ["SIGTERM to the broker -> broker started again (down for)"] + each("down") + [""],
        ["broker started -> listening"] + each("listening") + [""],
        ["broker started -> first attempt"] + each("first_attempt") + [""],
        [f"broker started -> all {K} `connected` committed"] + each("reconnect", bold=True)
        + ["by design >= " + ", ".join(f"{n}: {K / limits[n]:g} s ({K}/{limits[n]:g})" for n in names)],
        ["broker started -> last child's own `connected` timestamp"] + each("child_clock_last") + [""],
        ["attempts after the broker start (total)"] + each("attempts", 0) + [f">= {K}"],
        ["of which failed (`error` rows after the broker start)"] + each("failed", 0) + [""],
        ["most attempts by one connection after the broker start"] + each("most_per_connection", 0) + [""],
        ["attempts between SIGTERM and the broker start (refused)"] + each("before_restart", 0) + [""],
        ["busiest 1-s window (attempts, sliding)"] + each("busiest_1s", 0, bold=True)
        + ["<= the limit: " + ", ".join(
            f"{n}: {results.verdict(runs[n]['busiest_1s'], limits[n], higher_is_better=False)}" for n in names)],
        ["shortest time spanning limit + 1 attempts"] + each("limit_plus_one", 3)
        + [">= 1 s when the busiest 1-s window is within the limit"],
        ["busiest 100-ms window x 10 (attempts/s)"] + each("busiest_100ms", 0) + [""],
        ["first -> last attempt (s)"] + each("span") + [""],
        ["mean rate first -> last attempt (attempts/s)"] + each("mean_rate", 0) + [""],
        ["CPU from the broker start to all connected (% of one core)"] + [runs[n]["cpu"] for n in names] + [""],
    ]
    table = results.table(["measure (seconds unless said)"] + names + ["target"], rows)
    notes = ""
    for n in names:
        f = runs[n]
        if f["connected"] < K:
            notes += (f"\n\n**{n}: only {f['connected']} of {K} were connected again {TIMEOUT:g} s after the "
                      f"broker start**; not connected, e.g.: " + "; ".join(
                          f"{r['id']} {r['status']} {r['error_message'] or ''}" for r in f["not_connected"]))
        if f["gave_up"]:
            notes += f"\n\n**{n}: {f['gave_up']} connection(s) gave up into the cool-down during the outage.**"
        if f["disturbed"]:
            notes += f"\n\n**{n}: {f['disturbed']}**; its timings are less reliable."
    body = f"""`tests/bench/bench_reconnect.py`: {K} active connections (`stall_after` NULL, keepalive
60 s) to a Mosquitto the benchmark starts itself (persistence on, as `supervisor_conf/bin/mosquitto`
writes it); the logger and the monitor run with the services' defaults
(SITELINK_RETRY_BASE {default('SITELINK_RETRY_BASE')}, SITELINK_RETRY_CAP {default('SITELINK_RETRY_CAP')},
SITELINK_MAX_RETRIES {default('SITELINK_MAX_RETRIES')}, SITELINK_CONNECT_RATE {default(RATE_SETTING)}
per monitor). Once all {K} are `connected`, the broker gets SIGTERM; once no
row is `connected`, it is started again on the same port, and PostgreSQL is
polled every 50 ms until all {K} are `connected` again. Attempts are the
`mqtt_connection_log` rows `Connecting%` (the child's own event time) at or
after the broker start; a window of 1 s counts those in [t, t + 1), t sliding.
The second column repeats it all (fresh database and broker) with
{RATE_SETTING}={LOW_RATE:g}, to show the limit binding.

{table}

The limit is per second; the 100-ms figure (x 10) shows how evenly the attempts
are spread within a second (at {limits[names[0]]:g}/s, evenly spread is {limits[names[0]] / 10:g} per 100 ms).
The children book attempt slots 1/limit apart ({', '.join(f"{1000 / limits[n]:g} ms at {limits[n]:g}/s" for n in names)}), but an
attempt is stamped when its child sends the `connecting` event, a little after its
slot starts; a window can so hold one attempt more than the slots it spans, and the
shortest time spanning limit + 1 attempts says by how much they were squeezed.
Machine load just before the broker was stopped:
{', '.join(f"{n} {runs[n]['busy_before']:.2f}" for n in names)} cores busy.{notes}
"""
    results.update_section("Reconnect after a broker restart", body)
    print("\n" + body, flush=True)
    assert all(f["connected"] > 0 for f in runs.values())
