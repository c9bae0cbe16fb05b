"""A fleet of three monitors: the split, rebalancing, failover, never two clients, nothing lost.

N active connections (SITELINK_BENCH_FLEET_SITES, default 600), one site each,
``stall_after`` NULL, point at a Mosquitto of this benchmark's own. Three
"hosts" share one database (the bench's durable PostgreSQL): each has its own
SITELINK_HOME, its own logger (its own event and feed endpoints) and its own
monitor (instance ids ``host-a``, ``host-b``, ``host-c``), each monitor in a
process group of its own. The services run with their defaults except
SITELINK_CLAIM_LEASE (SITELINK_BENCH_FLEET_LEASE, default 15) and
SITELINK_MONITOR_INTERVAL (SITELINK_BENCH_FLEET_INTERVAL, default 5).

Once all N are connected, SITELINK_BENCH_THOUSAND_PUBLISHERS publisher
processes (tests/bench/sites_publisher.py, QoS 1) publish one reading per site
every SITELINK_BENCH_PERIOD s (default 3) throughout the phases:

1. start: the three monitors start together; measured: monitors started ->
   all N connected, and the split (connections per monitor, by PostgreSQL);
2. clean stop of host-c (SIGTERM) -> all N connected again, held by a, b;
3. host-c joins again -> the split is even again (each within its share
   plus the slack): the time to rebalance when a monitor joins;
4. SIGKILL of host-a's process group (monitor, zygote, children) -> all N
   connected, none held by host-a: the failover time;
5. host-a joins again -> even again;
6. SIGSTOP of host-b's monitor -> all N connected, none held by host-b (its
   children stop themselves at its fence); then SIGCONT -> even again.

Throughout, a thread samples every 0.2 s the connection children of the three
monitors and keeps, per site, the most alive at once; afterwards the broker's
log is read for "Client <id> already connected, closing old connection"
(a second client with a site's client id while the first was connected).
Both must say 1 client per site at most. After the publishers stop,
``count(reading)`` must equal the PUBACKs they got (per site too): nothing
lost. The monitors' cycle durations come from each host's status feed.
Timings are reported, never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from services.fleet import SLACK, share
from tests.bench import results
from tests.bench.harness import (BENCH_DIR, LineProcess, describe_broker, describe_pg, env_float, env_int, fmt,
                                 median, percentile, service_defaults, wait_until_quiet)
from tests.stack import SQL, Stack
from tests.support import (FeedSubscriber, Mosquitto, client_id_takeovers, named_connection_children,
                           python_service, remove_tree, stop_process, world_traversable_tmpdir)

N = env_int("SITELINK_BENCH_FLEET_SITES", 600)
LEASE = env_float("SITELINK_BENCH_FLEET_LEASE", 15.0)
INTERVAL = env_float("SITELINK_BENCH_FLEET_INTERVAL", 5.0)
PERIOD = env_float("SITELINK_BENCH_PERIOD", 3.0)
PUBLISHERS = max(1, env_int("SITELINK_BENCH_THOUSAND_PUBLISHERS", 2))
PHASE_TIMEOUT = env_float("SITELINK_BENCH_FLEET_TIMEOUT", 120.0)
DRAIN_TIMEOUT = env_float("SITELINK_BENCH_DRAIN", 15.0)
HOSTS = ("host-a", "host-b", "host-c")
SECTION = "Fleet of three monitors"

pytestmark = [pytest.mark.bench, pytest.mark.timeout(int(8 * PHASE_TIMEOUT + DRAIN_TIMEOUT) + 300)]


class Host:
    """One host of the fleet: its own home, logger and monitor."""

    def __init__(self, name: str, url: str, broker: Mosquitto, tmp: Path):
        self.name = name
        self.stack = Stack(url, broker, tmp / name)
        (tmp / name).mkdir(parents=True, exist_ok=True)
        service_defaults(self.stack, SITELINK_CLAIM_LEASE=str(LEASE), SITELINK_MONITOR_INTERVAL=str(INTERVAL),
                         SITELINK_INSTANCE_ID=name)
        self.monitor: subprocess.Popen | None = None
        self.feed: FeedSubscriber | None = None

    def start_logger(self) -> None:
        self.stack.start("logger")
        self.feed = self.stack.feed("monitor_cycle")

    def start_monitor(self) -> None:
        self.monitor = python_service("monitor", self.stack.env, self.stack.tmp / "monitor.out", new_session=True)

    def named_children(self) -> list[tuple[int, str]]:
        return named_connection_children(self.monitor.pid) if self.monitor is not None else []

    def close(self) -> None:
        if self.monitor is not None and self.monitor.poll() is None:
            self.monitor.send_signal(signal.SIGCONT)
            stop_process(self.monitor)
        self.stack.close()


class Sampler(threading.Thread):
    """The most connection children alive at once for any one site, across the fleet."""

    def __init__(self, hosts: list[Host]):
        super().__init__(daemon=True)
        self.hosts = hosts
        self.most = 0
        self.site_at_most = None
        self.samples = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            seen: Counter = Counter()
            for host in self.hosts:
                # Each name read once (SIGKILL and stop phases end hundreds of
                # children between a listing and a second read of each name).
                for _, name in host.named_children():
                    seen[name] += 1
            self.samples += 1
            if seen:
                name, n = seen.most_common(1)[0]
                if n > self.most:
                    self.most, self.site_at_most = n, name


def _seed(url: str, port: int) -> None:
    sql = SQL(url)
    try:
        sql.rows("INSERT INTO site (name) SELECT 'site-' || g FROM generate_series(1, %s) g", N)
        sql.rows("INSERT INTO mqtt_connection (site_id, broker_host, broker_port, topics, stall_after) "
                 "SELECT id, '127.0.0.1', %s, ARRAY['sites/' || name || '/#'], NULL FROM site ORDER BY id", port)
        sql.rows("ANALYZE")
    finally:
        sql.close()


def _split(sql: SQL) -> dict[str, int]:
    return {r["claimed_by"]: r["n"] for r in sql.rows(
        "SELECT claimed_by, count(*) AS n FROM mqtt_connection WHERE is_active AND claim_expires_at > now() "
        "AND status = 'connected' GROUP BY claimed_by ORDER BY claimed_by")}


def _wait(sql: SQL, done, timeout: float) -> float | None:
    """Seconds until ``done(split)`` holds (polled every 0.25 s), None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if done(_split(sql)):
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def _even(monitors: list[str]):
    target = share(N, [None] * len(monitors), None)

    def done(split: dict[str, int]) -> bool:
        return (sorted(split) == sorted(monitors) and sum(split.values()) == N
                and all(n <= target + SLACK for n in split.values()))
    return done


def _all_connected_without(gone: str):
    return lambda split: gone not in split and sum(split.values()) == N


def _publisher(port: int, first: int, count: int, log: Path) -> LineProcess:
    return LineProcess([sys.executable, str(BENCH_DIR / "sites_publisher.py"), "--port", str(port),
                        "--first", str(first), "--count", str(count), "--period", str(PERIOD),
                        "--seconds", str(24 * 3600)], log, stdin=True)


def _run(url: str, broker: Mosquitto, tmp: Path) -> dict:
    f: dict = {"phases": [], "splits": {}}
    _seed(url, broker.port)
    sql = SQL(url)
    hosts = [Host(name, url, broker, tmp) for name in HOSTS]
    by_name = {h.name: h for h in hosts}
    pubs: list[LineProcess] = []
    sampler = Sampler(hosts)
    try:
        for host in hosts:
            host.start_logger()
        f["busy_before"] = wait_until_quiet()
        time.sleep(0.5)  # the feed subscriptions reach the loggers before the first cycles

        def phase(label: str, action, done) -> None:
            t0 = time.monotonic()
            action()
            waited = _wait(sql, done, PHASE_TIMEOUT)
            total = None if waited is None else time.monotonic() - t0
            f["phases"].append((label, total))
            f["splits"][label] = _split(sql)
            print(f"\n[fleet] {label}: {fmt(total, 2)} s, split {f['splits'][label]}", flush=True)

        phase("the three monitors start together -> all connected and split evenly",
              lambda: [h.start_monitor() for h in hosts], _even(list(HOSTS)))
        f["split_after_start"] = f["splits"][f["phases"][-1][0]]
        sampler.start()
        per = -(-N // PUBLISHERS)
        for i in range(PUBLISHERS):
            count = min(per, N - i * per)
            if count > 0:
                pubs.append(_publisher(broker.port, 1 + i * per, count, tmp / f"sites-publisher-{i}.err"))
        for p in pubs:
            p.expect("ready", 30)
        for p in pubs:
            p.send("go\n")

        c = by_name["host-c"]
        phase("clean stop of host-c (SIGTERM) -> all connected on a and b",
              lambda: stop_process(c.monitor), _all_connected_without("host-c"))
        phase("host-c joins -> split evenly again (rebalance)", c.start_monitor, _even(list(HOSTS)))
        a = by_name["host-a"]

        def kill_a() -> None:
            os.killpg(a.monitor.pid, signal.SIGKILL)
            a.monitor.wait(10)
        phase("SIGKILL of host-a's process group -> all connected on b and c (failover)",
              kill_a, _all_connected_without("host-a"))
        phase("host-a joins -> split evenly again (rebalance)", a.start_monitor, _even(list(HOSTS)))
        b = by_name["host-b"]
        phase("SIGSTOP of host-b's monitor -> all connected on a and c (failover)",
              lambda: b.monitor.send_signal(signal.SIGSTOP), _all_connected_without("host-b"))
        phase("SIGCONT of host-b -> split evenly again, no fight (rebalance)",
              lambda: b.monitor.send_signal(signal.SIGCONT), _even(list(HOSTS)))

        for p in pubs:
            p.proc.send_signal(signal.SIGTERM)
        f["summaries"] = [json.loads(p.expect("{", 90)) for p in pubs]
        acked = sum(s["acked"] for s in f["summaries"])
        t_drain = time.monotonic()
        while time.monotonic() - t_drain < DRAIN_TIMEOUT:
            if sql.value("SELECT count(*) FROM reading") >= acked:
                break
            time.sleep(0.25)
        time.sleep(1.0)  # anything late (a duplicate would add no row: the natural key)
        f["rows"] = sql.value("SELECT count(*) FROM reading")
        per_site = {r["name"]: r["n"] for r in sql.rows(
            "SELECT s.name, count(*) AS n FROM reading r JOIN sensor se ON se.id = r.sensor_id "
            "JOIN gateway g ON g.id = se.gateway_id JOIN site s ON s.id = g.site_id GROUP BY s.name")}
        acked_site: dict[str, int] = {}
        for s in f["summaries"]:
            acked_site.update(s["acked_per_site"])
        f["lost"] = sum(max(0, a_ - per_site.get(n, 0)) for n, a_ in acked_site.items())
        f["acked"], f["published"] = acked, sum(s["published"] for s in f["summaries"])
        f["cycles"] = {h.name: [b_ for _, b_ in h.feed.poll() if b_.get("type") == "monitor_cycle"]
                       for h in hosts}
    finally:
        sampler.stopping.set()
        for p in pubs:
            p.stop()
        client_ids = [r["client_id"] or f"sitelink-{r['id']}" for r in sql.rows(
            "SELECT id, client_id FROM mqtt_connection")]
        sql.close()
        for host in hosts:
            host.close()
    f["most_children"], f["most_children_site"], f["samples"] = sampler.most, sampler.site_at_most, sampler.samples
    f["takeovers"] = client_id_takeovers(broker, client_ids)
    return f


def test_fleet_of_three_monitors(databases, durable_pg, tmp_path):
    base = world_traversable_tmpdir("sitelink-bench-fleet-mqtt-")
    broker = Mosquitto(base)
    try:
        broker.start()
        f = _run(databases.sitelink(), broker, tmp_path)
        broker_desc = describe_broker(broker)
    finally:
        broker.stop()
        remove_tree(base)
    body = _report(f, broker_desc, durable_pg)
    results.update_section(SECTION, body)
    print("\n" + body, flush=True)
    assert f["split_after_start"]


def _cycle_ms(cycles: list[dict]) -> str:
    steady = [c["duration"] * 1000 for c in cycles if c["started"] == 0 and c["stopped"] == 0]
    if not steady:
        return "n/a"
    return (f"median **{fmt(median(steady), 1)}**, p90 {fmt(percentile(steady, 90), 1)}, "
            f"max {fmt(max(steady), 1)} (n={len(steady)}); all cycles max "
            f"{fmt(max(c['duration'] for c in cycles) * 1000, 0)}")


def _report(f: dict, broker_desc: str, durable_pg) -> str:
    scale = "" if N == 600 else f" **(a run with {N} sites, SITELINK_BENCH_FLEET_SITES, not the 600 of the target)**"
    target = share(N, [None] * 3, None)
    rows = [[label, f"**{fmt(seconds, 2)}**" if seconds is not None else f"not within {PHASE_TIMEOUT:g} s",
             ", ".join(f"{k} {v}" for k, v in f["splits"][label].items())] for label, seconds in f["phases"]]
    phases = results.table(["phase", "until done (s)", "split afterwards (connected, by claim)"], rows)
    # A take-over in the broker's log is a second client while the first was connected.
    most = max(f["most_children"], 2 if f["takeovers"] else 0)
    at_site = f", `{f['most_children_site']}`" if f["most_children"] > 1 else ""
    lost = f.get("lost")
    figures = results.table(["measure", "measured", "target"], [
        ["split after start (connections per monitor)",
         ", ".join(f"{k} {v}" for k, v in f["split_after_start"].items()),
         f"each <= {target} + {SLACK}"],
        ["most clients for one site at once: live children sampled every 0.2 s across the fleet, "
         "and client-id take-overs in the broker's log",
         f"**{most}** (children: at most {f['most_children']}{at_site} in {f['samples']} samples; "
         f"take-overs: {len(f['takeovers'])})",
         "1: " + ("meets the target" if most == 1 else "**misses the target**")],
        ["readings: published / PUBACKed / rows in `reading`",
         f"{fmt(f.get('published'))} / {fmt(f.get('acked'))} / {fmt(f.get('rows'))}", ""],
        ["readings lost (PUBACKed, not stored)", f"**{fmt(lost)}**",
         "0: " + ("meets the target" if lost == 0 else "**misses the target**")],
    ])
    cycles = results.table(["monitor", "cycle duration, steady cycles (ms)"],
                           [[name, _cycle_ms(f["cycles"].get(name, []))] for name in HOSTS])
    takeovers = "".join(f"\n- `{line[:200]}`" for line in f["takeovers"][:5])
    return f"""`tests/bench/bench_fleet.py`{scale}: {N} active connections (one site each, `stall_after`
NULL) on one database ({describe_pg(durable_pg)}) and a Mosquitto of the bench's own ({broker_desc}).
Three hosts, each with its own home, logger and monitor (instance ids {', '.join(HOSTS)}), the
services' defaults except SITELINK_CLAIM_LEASE={LEASE:g} and SITELINK_MONITOR_INTERVAL={INTERVAL:g}
(so a failover is bounded by one lease plus one interval, {LEASE + INTERVAL:g} s). From the first
phase's end to the last, {PUBLISHERS} publisher process(es) (`tests/bench/sites_publisher.py`, QoS 1)
publish one reading per site every {PERIOD:g} s. Each phase is timed from its action to the state
it waits for, polled every 0.25 s in PostgreSQL (connections `connected` under a valid claim, by
claim holder).

{phases}

{figures}

Monitor cycles as each host's status feed reported them (steady: none started or stopped):

{cycles}
{takeovers}
Machine load just before the monitors started: {f['busy_before']:.2f} cores busy.
"""
