"""1000 live connections: start-up, the monitor's cycle, nothing lost, memory of the whole stack.

N active connections (SITELINK_BENCH_SITES, default 1000), each with its own
site, point at a Mosquitto of this benchmark's own (the suite's script, so
the same configuration as the embedded broker; a fresh one, so that no other
benchmark's persistent sessions share its client ids). SITELINK_BENCH_ROWS -
N more rows (default 9,000, so 10,000 in all), each with its own site, have
``is_active = false``. Every row has ``stall_after`` NULL (a quiet site is
not reconnected). This process raises its RLIMIT_NOFILE (soft = hard) before
the broker starts, so Mosquitto inherits it; the services raise their own.

The logger and then the monitor run as real processes with the services'
defaults except SITELINK_MONITOR_INTERVAL=2. Measured:

1. start-up: PostgreSQL is polled every 0.25 s from the monitor's start until
   all N are ``connected``;
2. the monitor's cycle: every ``monitor_cycle`` message of the status feed
   (its ``duration``), those of the steady state (N running, none started or
   stopped) reported apart, idle and under the publishing load;
3. nothing lost: SITELINK_BENCH_THOUSAND_PUBLISHERS (default 2) publisher
   processes (tests/bench/sites_publisher.py: paho, QoS 1, one client each,
   many topics ``sites/<name>/GW/DL``) publish one reading per site every
   SITELINK_BENCH_PERIOD s (default 3) for SITELINK_BENCH_THOUSAND_SECONDS
   (default 30), each message with its own ``ts``; afterwards
   ``count(reading)`` must equal the number of messages the publishers got a
   PUBACK for (also compared per site);
4. memory, two thirds into the publishing: USS (Private_Clean +
   Private_Dirty) and PSS of /proc/PID/smaps_rollup of the monitor, the
   zygote, the N children, the logger, Mosquitto and PostgreSQL (postmaster
   and its backends), summed per group and in all; the per-child median USS.

5. idle cost (the 1000-site run): the CPU of the whole stack (the monitor, the
   zygote and the children, the logger, Mosquitto, PostgreSQL) over
   SITELINK_BENCH_IDLE_SECONDS (default 60) while every site is connected and
   nobody publishes, against issue 11's 3 % of one core. It is measured at the
   end, with the monitor restarted with the services' own defaults (its
   30-s interval, not the bench's 2 s, which would cost fifteen times the
   cycles an installation pays for).

A second run, "2000 live sites" (SITELINK_BENCH_LARGE_SITES, default 2000; 0
skips it), does the same with 2000 sites but no idle measure, against the
2000-site targets: all connected, the whole stack's USS, the cycle's max.

Timings are reported, never asserted.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.bench import results
from tests.bench.harness import (BENCH_DIR, CpuMeter, LineProcess, StealSampler, bare_forks, descendants,
                                 describe_broker, describe_pg, env_float, env_int, fmt, median, memory, percentile,
                                 service_defaults, start_time, threads_cpu_and_wakeups, wait_until_quiet)
from tests.stack import SQL, Stack
from tests.support import (Mosquitto, alive, children_of, comm, remove_tree, wait_for,
                           world_traversable_tmpdir)

N = env_int("SITELINK_BENCH_SITES", 1000)
#: The sites of the second run, "2000 live sites" (SITELINK_BENCH_LARGE_SITES; 0 skips it).
LARGE = env_int("SITELINK_BENCH_LARGE_SITES", 2000)
ROWS_SETTING = env_int("SITELINK_BENCH_ROWS", 10000)
#: Seconds the whole stack's CPU is measured while every site is connected and nothing is published.
IDLE_SECONDS = env_float("SITELINK_BENCH_IDLE_SECONDS", 60.0)
PERIOD = env_float("SITELINK_BENCH_PERIOD", 3.0)
PUBLISH_SECONDS = env_float("SITELINK_BENCH_THOUSAND_SECONDS", 30.0)
PUBLISHERS = max(1, env_int("SITELINK_BENCH_THOUSAND_PUBLISHERS", 2))
CONNECT_TIMEOUT = env_float("SITELINK_BENCH_THOUSAND_TIMEOUT", 90.0)
DRAIN_TIMEOUT = env_float("SITELINK_BENCH_DRAIN", 15.0)
INTERVAL = 2
MIB = 1024.0
#: Start-up pace is shown per this many children (the spawns', and the bare forks').
PACE_CHUNK = 250
#: Issue 11's floor: 200 bare forks spawned and connected in 0.8 s on its machine. The
#: targets here are shown as a multiple of that floor grown linearly (4 s for 1000 sites)
#: too, against the bare forks of the same run.
ISSUE_FLOOR_PER_CHILD = 0.8 / 200


@dataclass(frozen=True)
class Plan:
    """One run: its sites, its section of RESULTS.md and the targets (issue 11) it is held to."""

    n: int           # active connections
    nominal: int     # the number of sites the targets are for
    section: str
    idle_seconds: float  # 0: no idle CPU measure
    connect_s: float     # all connected within
    cycle_median_ms: float | None
    cycle_max_ms: float
    uss_gib: float | None  # whole stack USS at most
    idle_cpu_pct: float | None = None

    @property
    def rows(self) -> int:
        return max(ROWS_SETTING, self.n)


THOUSAND = Plan(n=N, nominal=1000, section="1000 live connections", idle_seconds=IDLE_SECONDS, connect_s=8.0,
                cycle_median_ms=30.0, cycle_max_ms=100.0, uss_gib=None, idle_cpu_pct=3.0)
TWO_THOUSAND = Plan(n=LARGE, nominal=2000, section="2000 live sites", idle_seconds=0.0, connect_s=15.0,
                    cycle_median_ms=None, cycle_max_ms=150.0, uss_gib=11.0)

pytestmark = [pytest.mark.bench,
              pytest.mark.timeout(int(CONNECT_TIMEOUT + PUBLISH_SECONDS + DRAIN_TIMEOUT + IDLE_SECONDS) + 600)]


# ------------------------------------------------------------------ helpers

def _raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _open_files_limit(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
    except OSError:
        pass
    return "?"


def _established(port: int) -> int:
    """Established TCP connections whose local end is 127.0.0.1:port (the broker's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _seed(url: str, port: int, p: Plan) -> None:
    sql = SQL(url)
    try:
        sql.rows("INSERT INTO site (name) SELECT 'site-' || g FROM generate_series(1, %s) g", p.n)
        sql.rows("INSERT INTO mqtt_connection (site_id, broker_host, broker_port, topics, stall_after) "
                 "SELECT id, '127.0.0.1', %s, ARRAY['sites/' || name || '/#'], NULL FROM site ORDER BY id",
                 port)
        if p.rows > p.n:
            sql.rows("INSERT INTO site (name) SELECT 'idle-' || g FROM generate_series(1, %s) g", p.rows - p.n)
            sql.rows("INSERT INTO mqtt_connection (site_id, broker_host, broker_port, topics, stall_after, "
                     "is_active) SELECT id, '127.0.0.1', %s, ARRAY['sites/' || name || '/#'], NULL, false "
                     "FROM site WHERE name LIKE 'idle-%%' ORDER BY id", port)
        sql.rows("ANALYZE")
    finally:
        sql.close()


def _family(stack: Stack) -> dict[str, list[int]]:
    monitor = stack.pid("monitor")
    kids = children_of(monitor)
    return {"monitor": [monitor],
            "zygote": [p for p in kids if comm(p) == "sitelink-zygote"],
            "children": [p for p in kids if comm(p).startswith("sitelink-c")]}


def _stack_memory(stack: Stack, broker: Mosquitto, durable_pg) -> dict[str, list[dict]]:
    groups = _family(stack)
    groups["logger"] = [stack.pid("logger")]
    groups["mosquitto"] = [broker.proc.pid]
    groups["postgres"] = [durable_pg.proc.pid, *descendants(durable_pg.proc.pid)]
    return {name: [m for p in pids if (m := memory(p)) is not None] for name, pids in groups.items()}


def _probe_cycle_queries(url: str, repeat: int = 5) -> dict[str, list[float]]:
    """The SQL of one monitor cycle, run from the bench's own connection while the monitor runs:
    what the database part of a cycle costs (each in a transaction rolled back, so without the
    commit's fsync that the monitor's renewal pays)."""
    import psycopg
    from psycopg.rows import dict_row

    from services.monitor import RENEW_SLICES
    from shared import db
    q = db.QUERIES
    SLICE = ("renew a slice of the claims, as each renewal step does (a quarter of them: `renew_claims` + "
             "`release_claims_except`)")
    ALL = "... all of them in one statement, as before the slices"
    FULL = ("read every row it may act on (`monitor_read`, all rows changed), as a monitor's first cycle "
            "and every 10 minutes")
    DELTA = "read what changed (`monitor_read` since the previous read's horizon), as every cycle"
    times: dict[str, list[float]] = {FULL: [], "... of which PostgreSQL's execution (EXPLAIN ANALYZE)": [],
                                     DELTA: [],
                                     SLICE: [],
                                     ALL: [],
                                     "mark devices offline (3 queries; every 30 s, not every cycle)": []}
    with psycopg.connect(url, row_factory=dict_row, application_name="sitelink-bench-probe") as conn:
        me = conn.execute("SELECT claim_owner FROM mqtt_connection WHERE claim_owner IS NOT NULL LIMIT 1").fetchone()
        me = me["claim_owner"] if me else ""
        ids = [r["id"] for r in conn.execute("SELECT id FROM mqtt_connection WHERE claim_owner = %s", (me,))]
        conn.commit()
        for _ in range(repeat):
            read = {"incarnation": me, "held": ids, "since": None, "as_of": None}
            for label in (FULL, DELTA):
                with conn.transaction(force_rollback=True):
                    previous = conn.execute(q["monitor_read"], read).fetchone() if label == DELTA else None
                    since = {"since": previous["horizon"], "as_of": previous["as_of"]} if previous else {}
                    t = time.perf_counter()
                    conn.execute(q["monitor_read"], {**read, **since}).fetchall()
                    times[label].append(time.perf_counter() - t)
            steps = [
                (SLICE,
                 [(q["renew_claims"], {"incarnation": me, "lease": 90.0, "ids": ids[:-(-len(ids) // RENEW_SLICES)]}),
                  (q["release_claims_except"], {"incarnation": me, "keep": ids})]),
                (ALL,
                 [(q["renew_claims"], {"incarnation": me, "lease": 90.0, "ids": ids}),
                  (q["release_claims_except"], {"incarnation": me, "keep": ids})]),
                ("mark devices offline (3 queries; every 30 s, not every cycle)",
                 [(q[f"mark_offline_{k}s"], {"after": 600.0}) for k in ("gateway", "datalogger", "sensor")]),
            ]
            for label, statements in steps:
                t = time.perf_counter()
                with conn.transaction(force_rollback=True):
                    for text, params in statements:
                        cur = conn.execute(text, params)
                        if cur.description:
                            cur.fetchall()
                times[label].append(time.perf_counter() - t)
            with conn.transaction(force_rollback=True):
                plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + q["monitor_read"], read).fetchone()
            times["... of which PostgreSQL's execution (EXPLAIN ANALYZE)"].append(
                next(iter(plan.values()))[0]["Execution Time"] / 1000)
    return times


_WAKE = """
import os, select, sys, threading
def ran():
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        return int(f.read().split()[0])
poll = select.poll()
r, w = os.pipe()
poll.register(r, select.POLLIN)
costs = []
for _ in range(int(sys.argv[2])):
    before = ran()
    poll.poll(float(sys.argv[1]) * 1000)
    costs.append((ran() - before) / 1e6)
costs.sort()
print(costs[len(costs) // 2])
"""


def _wake_cost(sleep_s: float, n: int) -> float | None:
    """CPU (ms, schedstat) this machine charges a bare Python process for one
    wake-up after sleeping ``sleep_s`` with nothing to do (median of ``n``): the
    floor under what an idle child pays per timer."""
    try:
        out = subprocess.run([sys.executable, "-c", _WAKE, str(sleep_s), str(n)], capture_output=True,
                             text=True, timeout=sleep_s * n + 30, check=True).stdout
        return float(out.strip())
    except (subprocess.SubprocessError, ValueError):
        return None


def _idle_cpu(stack: Stack, broker: Mosquitto, durable_pg, p: Plan) -> dict:
    """CPU of the whole stack over p.idle_seconds while every site is connected and nobody
    publishes: what keeping the connections alive costs (keepalives, timers, the monitor's
    cycles and renewals, PostgreSQL serving them). The bench only sleeps meanwhile. Also how
    often each child ran (context switches per second, median): its timers."""
    fam = _family(stack)
    groups = {"monitor": lambda: fam["monitor"], "zygote": lambda: fam["zygote"],
              "children": lambda: fam["children"], "logger": lambda: [stack.pid("logger")],
              "mosquitto": lambda: [broker.proc.pid],
              "postgres": lambda: [durable_pg.proc.pid, *descendants(durable_pg.proc.pid)]}
    meter = CpuMeter(groups, precise=True)
    print(f"[thousand] measuring the idle stack's CPU for {p.idle_seconds:g} s", flush=True)
    switches0 = {pid: m[1] if (m := threads_cpu_and_wakeups(pid)) else None for pid in fam["children"]}
    meter.start()
    time.sleep(p.idle_seconds)
    meter.stop()
    switches1 = {pid: m[1] if (m := threads_cpu_and_wakeups(pid)) else None for pid in fam["children"]}
    rates = [(switches1[pid] - n0) / meter.seconds for pid, n0 in switches0.items()
             if n0 is not None and switches1.get(pid) is not None]
    total = sum(meter.used.values())
    wake = {s: _wake_cost(s, n) for s, n in ((1.0, 8), (10.0, 3))}
    return {"seconds": meter.seconds, "pct": 100 * total / meter.seconds if meter.seconds else None,
            "groups": {name: 100 * used / meter.seconds for name, used in meter.used.items()},
            "child_wakeups": median(rates) if rates else None, "wake_ms": wake,
            "describe": meter.describe(), "disturbed": meter.disturbed()}


def _idle_at_defaults(stack: Stack, broker: Mosquitto, durable_pg, p: Plan) -> dict | None:
    """The idle measure with a monitor started again with the services' defaults
    (no SITELINK_MONITOR_INTERVAL): what an installation pays to keep p.n sites
    connected when nothing is published."""
    service_defaults(stack)
    since = stack.sql.value("SELECT now()")
    stack.start("monitor")
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while time.monotonic() < deadline:
        if stack.sql.value("SELECT count(*) FROM mqtt_connection WHERE status = 'connected' "
                           "AND last_connected_at >= %s", since) >= p.n:
            break
        time.sleep(0.25)
    else:
        print(f"[thousand] the restarted monitor did not connect all {p.n} sites", flush=True)
        return None
    wait_until_quiet()
    try:
        return _idle_cpu(stack, broker, durable_pg, p)
    finally:
        kids = _family(stack)["children"]
        stack.stop("monitor")
        for pid in kids:  # ours to stop, by PID, should the monitor have left any
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _publisher(port: int, first: int, count: int, log: Path) -> LineProcess:
    return LineProcess([sys.executable, str(BENCH_DIR / "sites_publisher.py"), "--port", str(port),
                        "--first", str(first), "--count", str(count), "--period", str(PERIOD),
                        "--seconds", str(PUBLISH_SECONDS)], log, stdin=True)


_LEVEL = re.compile(r"\|\s*(WARNING|ERROR|CRITICAL)\s*\|")


def _problems(text: str) -> tuple[Counter, list[str]]:
    """WARNING+ lines of a service's output (by level) and a few samples, plus tracebacks."""
    levels: Counter = Counter()
    samples: list[str] = []
    for line in text.splitlines():
        m = _LEVEL.search(line)
        if m or line.startswith("Traceback"):
            levels[m.group(1) if m else "Traceback"] += 1
            if len(samples) < 6:
                samples.append(line[:300])
    return levels, samples


def _cycles(feed) -> list[dict]:
    return [body for _, body in feed.poll() if body.get("type") == "monitor_cycle"]


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    ms = [v * 1000 for v in values]
    return f"median **{fmt(median(ms), 1)}**, p90 {fmt(percentile(ms, 90), 1)}, max **{fmt(max(ms), 1)}** (n={len(ms)})"


# ------------------------------------------------------------------ the run

def _run(url: str, broker: Mosquitto, durable_pg, tmp: Path, p: Plan) -> dict:
    f: dict = {"marks": {}}
    _seed(url, broker.port, p)
    stack = Stack(url, broker, tmp)
    pubs: list[LineProcess] = []
    steal = f["steal"] = StealSampler().start()  # a slow cycle against what the VM's host took meanwhile
    try:
        service_defaults(stack, SITELINK_MONITOR_INTERVAL=str(INTERVAL))
        stack.start("logger")
        wait_for(lambda: "logger ready" in stack.output("logger"), 30, "the logger to be ready")
        feed = stack.feed("monitor_cycle")

        seen: dict = {}

        def family(part: str) -> Callable[[], list[int]]:
            def pids() -> list[int]:
                if "monitor" not in stack.procs:
                    return []
                if time.monotonic() - seen.get("at", -10.0) > 1.0:  # one /proc scan per meter reading
                    seen.update(at=time.monotonic(), family=_family(stack))
                return seen["family"][part]
            return pids
        groups = {"monitor": family("monitor"), "zygote": family("zygote"), "children": family("children"),
                  "logger": lambda: [stack.pid("logger")],
                  "mosquitto": lambda: [broker.proc.pid],
                  "postgres": lambda: [durable_pg.proc.pid, *descendants(durable_pg.proc.pid)],
                  "publishers": lambda: [pub.pid for pub in pubs]}
        f["busy_before"] = wait_until_quiet()
        time.sleep(0.5)  # the feed subscription reaches the logger before the first cycle
        meter = CpuMeter(groups, precise=True)  # children run ms each: whole ticks miss them
        meter.start()
        t0 = time.time()
        stack.start("monitor")
        deadline = time.monotonic() + CONNECT_TIMEOUT
        connected = 0
        while time.monotonic() < deadline:
            connected = stack.sql.value("SELECT count(*) FROM mqtt_connection WHERE status = 'connected'")
            now = time.time() - t0
            for share in (1, p.n // 2, p.n):
                if connected >= share and share not in f["marks"]:
                    f["marks"][share] = now
            if connected >= p.n or stack.procs["monitor"].poll() is not None:
                break
            time.sleep(0.25)
        meter.stop()
        f["connect_cpu"], f["connect_disturbed"] = meter.describe(), meter.disturbed()
        f["connect_cpu_per_child"] = meter.per_item(p.n, skip=("publishers",))
        f["connected"] = connected
        f["t_all_connected"] = time.time()
        row = stack.sql.one("SELECT extract(epoch FROM max(last_connected_at))::float8 AS last "
                            "FROM mqtt_connection WHERE status = 'connected'")
        f["child_clock_last"] = row["last"] - t0 if row and row["last"] else None
        fam = _family(stack)
        monitor_start = start_time(stack.pid("monitor"))
        starts = [s for p in fam["children"] if (s := start_time(p)) is not None]
        f["spawn_first"] = min(starts) - monitor_start if starts and monitor_start else None
        f["spawn_last"] = max(starts) - monitor_start if starts and monitor_start else None
        starts.sort()
        f["start_pace"] = [starts[min(k + PACE_CHUNK, len(starts)) - 1] - (starts[k - 1] if k else starts[0])
                           for k in range(0, len(starts), PACE_CHUNK)]
        f["children_found"] = len(fam["children"])
        f["broker_connections"] = _established(broker.port)
        f["statuses_connected"] = dict(Counter({r["status"]: r["n"] for r in stack.sql.rows(
            "SELECT status, count(*) AS n FROM mqtt_connection WHERE is_active GROUP BY status")}))
        f["nofile"] = {"mosquitto": _open_files_limit(broker.proc.pid),
                       "logger": _open_files_limit(stack.pid("logger")),
                       "monitor": _open_files_limit(stack.pid("monitor"))}
        print(f"\n[thousand] {connected}/{p.n} connected after {fmt(f['marks'].get(p.n), 2)} s "
              f"(children {len(fam['children'])}, broker connections {f['broker_connections']})", flush=True)
        if connected < p.n:
            print(f"[thousand] statuses: {f['statuses_connected']}", flush=True)

        # -- a few steady cycles with no publishing, then the publishing load
        def steady_cycles() -> list[dict]:
            return [c for c in _cycles(feed) if c["running"] == p.n and c["started"] == 0
                    and _epoch(c["timestamp"]) > f["t_all_connected"]]
        if connected >= p.n:
            try:
                wait_for(lambda: len(steady_cycles()) >= 2, 3 * INTERVAL + 3, "two idle steady cycles",
                         interval=0.2)
            except AssertionError as exc:
                print(f"[thousand] {exc}", flush=True)
        per = -(-p.n // PUBLISHERS)
        for i in range(PUBLISHERS):
            first = 1 + i * per
            count = min(per, p.n - i * per)
            if count > 0:
                pubs.append(_publisher(broker.port, first, count, tmp / f"sites-publisher-{i}.err"))
        for pub in pubs:
            pub.expect("ready", 30)
        meter = CpuMeter(groups, precise=True)  # children run ms each: whole ticks miss them
        meter.start()
        f["go"] = time.time()
        for pub in pubs:
            pub.send("go\n")
        mem_at = time.monotonic() + PUBLISH_SECONDS * 2 / 3
        while time.monotonic() < mem_at:
            time.sleep(0.5)
        t_mem = time.monotonic()
        f["memory"] = _stack_memory(stack, broker, durable_pg)
        f["memory_read_s"] = time.monotonic() - t_mem
        f["summaries"] = [json.loads(pub.expect("{", PUBLISH_SECONDS + 60)) for pub in pubs]
        meter.stop()
        f["publish_cpu"], f["publish_disturbed"] = meter.describe(), meter.disturbed()
        f["publish_end"] = max(s["end"] for s in f["summaries"])
        acked = sum(s["acked"] for s in f["summaries"])

        # -- nothing lost
        t_drain = time.monotonic()
        drain_deadline = t_drain + DRAIN_TIMEOUT
        rows = 0
        while time.monotonic() < drain_deadline:
            rows = stack.sql.value("SELECT count(*) FROM reading")
            if rows >= acked:
                break
            time.sleep(0.25)
        f["drain_s"] = time.monotonic() - t_drain
        time.sleep(1.0)  # anything late (a duplicate would not add a row: the natural key)
        f["rows"] = stack.sql.value("SELECT count(*) FROM reading")
        per_site = {r["name"]: r["n"] for r in stack.sql.rows(
            "SELECT s.name, count(*) AS n FROM reading r JOIN sensor se ON se.id = r.sensor_id "
            "JOIN gateway g ON g.id = se.gateway_id JOIN site s ON s.id = g.site_id GROUP BY s.name")}
        acked_site: dict[str, int] = {}
        for s in f["summaries"]:
            acked_site.update(s["acked_per_site"])
        f["sites_short"] = {n: (a, per_site.get(n, 0)) for n, a in acked_site.items() if per_site.get(n, 0) < a}
        f["sites_extra"] = {n: (a, per_site.get(n, 0)) for n, a in acked_site.items() if per_site.get(n, 0) > a}
        lag = stack.sql.one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - ts)) AS p50, "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - ts)) AS p99, "
            "max(extract(epoch FROM received_at - ts)) AS max FROM reading")
        f["lag"] = {k: (float(v) if v is not None else None) for k, v in lag.items()}

        # -- cycles and the services' own view
        time.sleep(0.2)
        f["cycles"] = _cycles(feed)
        f["statuses_end"] = {r["status"]: r["n"] for r in stack.sql.rows(
            "SELECT status, count(*) AS n FROM mqtt_connection WHERE is_active GROUP BY status")}
        f["conn_log"] = {r["level"]: r["n"] for r in stack.sql.rows(
            "SELECT level, count(*) AS n FROM mqtt_connection_log WHERE level IN ('WARNING', 'ERROR', 'CRITICAL') "
            "GROUP BY level")}
        f["conn_log_samples"] = [r["message"][:200] for r in stack.sql.rows(
            "SELECT DISTINCT ON (message) message FROM mqtt_connection_log "
            "WHERE level IN ('WARNING', 'ERROR', 'CRITICAL') ORDER BY message LIMIT 5")]
        f["parsing_log"] = stack.sql.value("SELECT count(*) FROM mqtt_parsing_log")
        f["probe"] = _probe_cycle_queries(url)
        f["children_before_stop"] = _family(stack)["children"]

        t_stop = time.monotonic()
        stack.stop("monitor")
        f["stop_s"] = time.monotonic() - t_stop
        left = [p for p in f["children_before_stop"] if alive(p)]
        f["left_behind"] = len(left)
        for pid in left:  # descendants of the monitor we started: ours to stop
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        f["idle"] = _idle_at_defaults(stack, broker, durable_pg, p) if connected >= p.n and p.idle_seconds > 0 else None
    finally:
        steal.stop()
        for pub in pubs:
            pub.stop()
        kids = _family(stack)["children"] if "monitor" in stack.procs else []
        stack.close()
        for pid in kids:  # should the monitor not have stopped them: ours to stop, by PID
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for name in ("logger", "monitor"):
        f[f"{name}_problems"] = _problems(stack.output(name))
    f["broker_log"] = [line[:300] for line in broker.log.read_text(errors="replace").splitlines()
                       if re.search(r"error|warning|out of|too many|refus", line, re.I)
                       and "should not be run as root" not in line][:6]
    return f


def _bench(p: Plan, databases, durable_pg, tmp_path) -> None:
    nofile = _raise_nofile()
    base = world_traversable_tmpdir("sitelink-bench-thousand-mqtt-")
    broker = Mosquitto(base)
    try:
        broker.start()
        wait_until_quiet()
        floor = bare_forks(broker.port, p.n, tmp_path, timeout=CONNECT_TIMEOUT)
        print(f"\n[thousand] bare forks: {floor['connected']}/{p.n} connected after "
              f"{fmt(floor['all_connected'], 2)} s", flush=True)
        f = _run(databases.sitelink(), broker, durable_pg, tmp_path, p)
        f["floor"] = floor
        broker_desc = describe_broker(broker)
    finally:
        broker.stop()
        remove_tree(base)
    body = _report(f, nofile, broker_desc, durable_pg, p)
    results.update_section(p.section, body)
    print("\n" + body, flush=True)
    assert f["connected"] > 0


def test_thousand_live_connections(databases, durable_pg, tmp_path):
    _bench(THOUSAND, databases, durable_pg, tmp_path)


@pytest.mark.skipif(LARGE <= 0, reason="SITELINK_BENCH_LARGE_SITES=0")
def test_two_thousand_live_sites(databases, durable_pg, tmp_path):
    """The same with 2000 sites (SITELINK_BENCH_LARGE_SITES): all connected, the whole stack's
    memory and the cycle against the 2000-site targets. About 13 GiB at 6.5 MiB a child: the
    machine needs that much free."""
    _bench(TWO_THOUSAND, databases, durable_pg, tmp_path)


# ------------------------------------------------------------------ the report

def _report(f: dict, nofile: tuple[int, int], broker_desc: str, durable_pg, p: Plan) -> str:
    marks = f["marks"]
    cycles = f["cycles"]
    steady = [c for c in cycles if c["running"] == p.n and c["started"] == 0 and c["stopped"] == 0]
    t_go, t_end = f["go"], f["publish_end"]
    under_load = [c for c in steady if t_go <= _epoch(c["timestamp"]) <= t_end]
    idle = [c for c in steady if c not in under_load]
    startup = [c for c in cycles if c not in steady]
    first = startup[0] if startup else None
    steady_max = max(c["duration"] for c in steady) * 1000 if steady else None

    summaries = f["summaries"]
    published = sum(s["published"] for s in summaries)
    acked = sum(s["acked"] for s in summaries)
    rate = sum(s["rate"] for s in summaries)
    late = max(s["worst_late"] for s in summaries)
    lost = sum(a - r for a, r in f["sites_short"].values())
    short = f"{len(f['sites_short'])} site(s) with fewer rows than PUBACKs ({lost} rows missing)"
    if f["rows"] == acked and not f["sites_short"] and not f["sites_extra"]:
        loss_verdict = "meets the target (equal in all and for every site)"
    elif f["rows"] < acked or f["sites_short"]:
        loss_verdict = f"**misses the target**: {short}"
    else:
        loss_verdict = (f"more rows than PUBACKs ({len(f['sites_extra'])} site(s)): messages stored whose "
                        f"PUBACK the publisher did not get in time")

    t_all = marks.get(p.n)
    floor = f.get("floor", {})
    floor_all = floor.get("all_connected")
    floor_verdict = ""
    if floor_all and t_all:
        multiple = p.connect_s / (ISSUE_FLOOR_PER_CHILD * p.nominal)
        floor_verdict = (f"sitelink {t_all / floor_all:.2f} x the bare forks' time, against {multiple:.2f} x "
                         f"({fmt(multiple * floor_all, 1)} s here): "
                         + results.verdict(t_all, multiple * floor_all, higher_is_better=False))
    steady_median = median([c["duration"] for c in steady]) * 1000 if steady else None
    cycle_target = f"max <= {p.cycle_max_ms:g} ms: " + results.verdict(steady_max, p.cycle_max_ms,
                                                                       higher_is_better=False)
    if p.cycle_median_ms is not None:
        cycle_target = (f"median <= {p.cycle_median_ms:g} ms: "
                        + results.verdict(steady_median, p.cycle_median_ms, higher_is_better=False)
                        + "; " + cycle_target)
    rows = [
        ["monitor started -> first child spawned (s)", fmt(f["spawn_first"], 2), ""],
        ["monitor started -> last child spawned (s)", fmt(f["spawn_last"], 2), ""],
        ["monitor started -> first `connected` committed (s)", fmt(marks.get(1), 2), ""],
        [f"monitor started -> {p.n // 2} `connected` committed (s)", fmt(marks.get(p.n // 2), 2), ""],
        [f"monitor started -> all {p.n} `connected` committed (s)", f"**{fmt(t_all, 2)}**"
         + ("" if f["connected"] >= p.n else f" (only {f['connected']} after {CONNECT_TIMEOUT:g} s)"),
         f"<= {p.connect_s:g} s: " + results.verdict(t_all, p.connect_s, higher_is_better=False)],
        ["monitor started -> last child's own `connected` timestamp (s)", fmt(f["child_clock_last"], 2), ""],
        [f"the floor: {p.n} bare forks (`tests/bench/reference_forks.py`, same broker, just before; the faster "
         f"of {len(floor.get('all_connected_runs', [])) or 1} runs in a row) spawned / all connected (s)",
         f"{fmt(floor.get('last_fork'), 2)} / **{fmt(floor_all, 2)}** (runs: "
         + ", ".join(fmt(x, 2) for x in floor.get("all_connected_runs", [floor_all])) + ")",
         floor_verdict],
        [f"seconds per {PACE_CHUNK} children started, in order: sitelink's spawns / the bare forks",
         ", ".join(fmt(x, 2) for x in f.get("start_pace", [])) + " / "
         + ", ".join(fmt(c["wall_s"], 2) for c in floor.get("forks", [])), ""],
        ["CPU ms per child started, from the monitor's start to all connected (schedstat; the kernel's rest and "
         "the host's steal from /proc/stat) / the bare forks' (their child's own, their parent's, steal)",
         ", ".join(f"{name} {fmt(ms, 1)}" for name, ms in f.get("connect_cpu_per_child", {}).items())
         + f" / child {fmt(floor.get('child_cpu_ms'), 1)}, parent {fmt(floor.get('parent_cpu_ms'), 1)}, "
           f"steal {fmt(floor.get('steal_per_child_ms'), 1)}", ""],
        ["bare forks: one fork's duration per 250 children, median (ms)",
         ", ".join(fmt(c["median_ms"], 2) for c in floor.get("forks", [])), ""],
        [f"first cycle (reads {p.rows:,} rows, claims and spawns the first batch of children) (ms)",
         fmt(first["duration"] * 1000 if first else None, 0) + (f" ({first['started']} started)" if first else ""),
         ""],
        [f"steady cycles ({p.n} running, none started or stopped), all (ms)",
         _ms([c["duration"] for c in steady]), cycle_target],
        ["... of which while the sites publish (ms)", _ms([c["duration"] for c in under_load]), ""],
        ["... of which with no publishing (ms)", _ms([c["duration"] for c in idle]), ""],
        ["readings: published / PUBACKed / rows in `reading`", f"{published:,} / {acked:,} / **{f['rows']:,}**",
         "rows = PUBACKs: " + loss_verdict],
        ["offered load (msg/s, all publishers); publishers' worst lag behind schedule (s)",
         f"{fmt(rate, 0)}; {fmt(late, 2)}", ""],
        ["reading stored after its `ts` (publish time): median / p99 / max (s)",
         " / ".join(fmt(f["lag"].get(k), 3) for k in ("p50", "p99", "max")), ""],
        ["last publish -> all rows committed (s)", fmt(f["drain_s"], 2), ""],
        [f"SIGTERM to the monitor -> monitor exited ({p.n} children with it) (s)", fmt(f["stop_s"], 2)
         + (f" ({f['left_behind']} children left, killed by the bench)" if f["left_behind"] else ""), ""],
    ]
    idle_cpu = f.get("idle")
    if p.idle_seconds > 0:
        pct = idle_cpu["pct"] if idle_cpu else None
        shown = "n/a (not all connected)" if idle_cpu is None else (
            f"**{fmt(pct, 2)} %** over {fmt(idle_cpu['seconds'], 0)} s ("
            + ", ".join(f"{name} {fmt(v, 2)} %" for name, v in idle_cpu["groups"].items())
            + f"; each child ran {fmt(idle_cpu['child_wakeups'], 1)} times a second, median)"
            + (f" **{idle_cpu['disturbed']}**" if idle_cpu["disturbed"] else ""))
        if idle_cpu is not None:
            rows.insert(11, ["... the floor under it: CPU this machine charges a bare Python process for one "
                             "wake-up with nothing to do, after sleeping 1 s / 10 s (ms, schedstat, median)",
                             " / ".join(fmt(idle_cpu["wake_ms"].get(s), 2) for s in (1.0, 10.0)), ""])
        rows.insert(11, [f"{p.n} connected idle sites: CPU of the whole stack (monitor, zygote, children, "
                         f"logger, Mosquitto, PostgreSQL), % of one core, with the services' defaults "
                         f"(the monitor restarted without SITELINK_MONITOR_INTERVAL)", shown,
                         f"<= {p.idle_cpu_pct:g} %: " + results.verdict(pct, p.idle_cpu_pct, higher_is_better=False)])

    mem = f["memory"]
    mem_rows = []
    total_uss = total_pss = 0.0
    for name in ("monitor", "zygote", "children", "logger", "mosquitto", "postgres"):
        ms = mem.get(name, [])
        uss = sum(m["uss"] for m in ms) / MIB
        pss = sum(m["pss"] for m in ms) / MIB
        total_uss += uss
        total_pss += pss
        mem_rows.append([name, len(ms), fmt(uss, 1), fmt(pss, 1)])
    mem_rows.append(["**whole stack**", sum(len(v) for v in mem.values()), f"**{fmt(total_uss, 0)}**",
                     f"**{fmt(total_pss, 0)}**"])
    if p.uss_gib is not None:
        rows.append([f"whole stack USS ({p.n} sites, two thirds into the publishing) (GiB)",
                     f"**{fmt(total_uss / MIB, 2)}**",
                     f"<= {p.uss_gib:g} GiB: " + results.verdict(total_uss / MIB, p.uss_gib, higher_is_better=False)])
    timing = results.table(["measure", "measured", "target"], rows)
    kid_uss = [m["uss"] / MIB for m in mem.get("children", [])]
    kid_pss = [m["pss"] / MIB for m in mem.get("children", [])]
    memory_table = results.table(["processes", "n", "USS sum (MiB)", "PSS sum (MiB)"], mem_rows)

    cpu = results.table(["phase", "CPU (% of one core)"], [
        ["start-up (monitor started -> all connected)", f["connect_cpu"]
         + (f" **{f['connect_disturbed']}**" if f["connect_disturbed"] else "")],
        [f"publishing ({PUBLISH_SECONDS:g} s)", f["publish_cpu"]
         + (f" **{f['publish_disturbed']}**" if f["publish_disturbed"] else "")],
    ])

    probe = results.table(["part of a cycle", "ms (median, max of 5)"], [
        [label, f"{fmt(median(v) * 1000, 1)}, {fmt(max(v) * 1000, 1)}"] for label, v in f["probe"].items()])
    notes = []
    for name in ("monitor", "logger"):
        levels, samples = f[f"{name}_problems"]
        if levels:
            notes.append(f"- {name} output{' (its children write there too)' if name == 'monitor' else ''}: " + ", ".join(f"{n} {lvl}" for lvl, n in levels.items())
                         + "; first: " + "; ".join(f"`{s}`" for s in samples[:3]))
        else:
            notes.append(f"- {name} output{' (its children write there too)' if name == 'monitor' else ''}: "
                         f"no WARNING, ERROR or traceback")
    if f["conn_log"]:
        notes.append("- `mqtt_connection_log` WARNING+: " + ", ".join(f"{n} {lvl}" for lvl, n in f["conn_log"].items())
                     + "; e.g. " + "; ".join(f"`{m}`" for m in f["conn_log_samples"]))
    else:
        notes.append("- `mqtt_connection_log`: no WARNING or ERROR row")
    notes.append(f"- `mqtt_parsing_log`: {f['parsing_log']} row(s)")
    notes.append(f"- active connections by status once all were up: {f['statuses_connected']}; "
                 f"after publishing: {f['statuses_end']}")
    if f["broker_log"]:
        notes.append("- Mosquitto log: " + "; ".join(f"`{line}`" for line in f["broker_log"][:3]))
    if f["sites_short"]:
        notes.append("- sites short of rows (acked, rows): " + ", ".join(
            f"{n} {v}" for n, v in list(f["sites_short"].items())[:10]))
    scale = "" if p.n == p.nominal else (f" **(a run with {p.n} sites, SITELINK_BENCH_"
                                          f"{'SITES' if p.nominal == 1000 else 'LARGE_SITES'}, not the "
                                          f"{p.nominal} of the targets)**")
    first_note = ""
    if first and first["duration"] > INTERVAL:
        first_note = (f" The first cycle started {first['started']} children itself (one zygote request "
                      f"each) and lasted {first['duration']:.1f} s: no other cycle ran meanwhile.")
    cycle_list = ", ".join(f"{c['duration'] * 1000:.0f}" + ("*" if c in startup else "") for c in cycles)
    slowest = max(steady, key=lambda c: c["duration"]) if steady else None
    if slowest is not None and slowest.get("parts"):
        parts = ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in slowest["parts"].items())
        cycle_list += (f". The slowest steady cycle ({slowest['duration'] * 1000:.0f} ms), part by part as the "
                       f"monitor timed it (`parts`, ms): {parts}; the steady cycles' medians: "
                       + ", ".join(f"{name} {median([c['parts'].get(name, 0.0) for c in steady]) * 1000:.1f}"
                                   for name in slowest["parts"]))

        def stolen(c: dict) -> float | None:
            end = _epoch(c["timestamp"])
            return f["steal"].cores(end - c["duration"], end)
        taken = [x for c in steady if (x := stolen(c)) is not None]
        cycle_list += (f". The VM's host took {fmt(stolen(slowest), 2)} cores from this machine during the slowest "
                       f"cycle (steal, /proc/stat every 50 ms, over the samples around it); during the steady "
                       f"cycles, median {fmt(median(taken), 2)}, max {fmt(max(taken, default=None), 2)}")

    return f"""`tests/bench/bench_thousand.py`{scale}: {p.n} active connections (one site each, `stall_after`
NULL) and {p.rows - p.n:,} inactive ones, {p.rows:,} rows in `mqtt_connection`; logger and monitor as
real processes with the services' defaults except SITELINK_MONITOR_INTERVAL={INTERVAL}. Mosquitto
of the bench's own (`supervisor_conf/bin/mosquitto`: {broker_desc}; `max_connections`
left at its default, -1 = unlimited in Mosquitto 2.0), started after the bench raised its
RLIMIT_NOFILE to {nofile[0]}; open-file limits seen in /proc: Mosquitto {f['nofile']['mosquitto']},
logger {f['nofile']['logger']}, monitor {f['nofile']['monitor']}. {describe_pg(durable_pg)}.
Once all were connected: {f['children_found']} children under the monitor, {f['broker_connections']}
established connections on the broker's port. Load: {len(summaries)} publisher process(es)
(`tests/bench/sites_publisher.py`, paho, QoS 1, one client each) publishing one reading per site
every {PERIOD:g} s for {PUBLISH_SECONDS:g} s, started once all were connected.

{timing}

Monitor cycles as the status feed reported them (`duration`, ms; * = start-up cycles, still
starting children): {cycle_list}.{first_note}

For orientation, the SQL of one cycle run by the bench itself on its own connection, while
the monitor ran with all {p.n} children (each in a transaction rolled back, so without the
commit's fsync; the rest of a cycle is the monitor's own Python work over the {p.rows:,} rows,
the commits and the event to the logger):

{probe}

CPU:

{cpu}

Memory two thirds into the publishing (/proc/PID/smaps_rollup; USS = Private_Clean +
Private_Dirty; PSS shares each shared page among its users, so PSS sums add up; PostgreSQL =
the postmaster and all its processes, shared_buffers included in PSS):

{memory_table}

Per child: USS median **{fmt(median(kid_uss), 2)} MiB** (max {fmt(max(kid_uss) if kid_uss else None, 2)}),
PSS median {fmt(median(kid_pss), 2)} MiB. Reading the {sum(len(v) for v in mem.values())} processes'
smaps_rollup took {fmt(f['memory_read_s'], 2)} s.

What the services reported:

{chr(10).join(notes)}

Machine load just before the monitor started: {f['busy_before']:.2f} cores busy.
"""
