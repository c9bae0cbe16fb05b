"""Child cost: how long K children take to start and connect, and what each costs in memory.

K (SITELINK_BENCH_CHILDREN, default 200) connections point at the suite's
Mosquitto, not active. With the logger and the monitor (interval 1 s)
running, one UPDATE makes all K active (issue 11's "200 new active rows"),
and the benchmark polls PostgreSQL until all K are ``connected`` (the status
the logger commits once each child's broker acknowledged its subscription).
The children are then found as the monitor's descendants that hold a TCP
connection to the broker, whatever way the monitor starts them (a fresh
``python -m services.connection`` per child, or forks of a preloaded
zygote), and their private memory (USS = Private_Clean +
Private_Dirty of /proc/PID/smaps_rollup) is read. Then, connected and
receiving nothing, the children are watched for SITELINK_BENCH_IDLE_SECONDS
(default 10): their CPU and their wake-ups (context switches of all their
threads). The CPU each process spent until all were connected is read too:
the children's own (schedstat, to the ns), the zygote's and the monitor's.
The floor under it is measured in the same run, just before:
``tests/bench/reference_forks.py``, bare forks that connect and say so (the
faster of two runs in a row, harness.FLOOR_RUNS).

Where the services have a cap on connection attempts per second
(SITELINK_CONNECT_RATE), the same is measured a second time with the cap
lifted, on a fresh database, to show what the machine does without it.

As baselines, fresh interpreters are measured the same way: a bare
``python``, ``python -c 'import paho.mqtt.client, zmq, msgpack'`` and
``python -c 'import services.connection'`` (every module a child loads,
without connecting).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import pytest

from tests.bench import results
from tests.bench.harness import (CpuMeter, LineProcess, bare_forks, broker_connection_holders, cpu_seconds, default,
                                 descendants, env_float, env_int, fmt, measure_quietly, median, memory, parent_pid,
                                 run_seconds, service_defaults, started_since_boot, threads_cpu_and_wakeups,
                                 wait_until_quiet)
from tests.stack import SQL, Stack
from tests.support import alive, cmdline, wait_for

K = env_int("SITELINK_BENCH_CHILDREN", 200)
#: Connection attempts per second in the second run, where the setting exists.
UNCAPPED_RATE = 10000.0
TIMEOUT = env_float("SITELINK_BENCH_CHILDREN_TIMEOUT", 150.0)
#: How long the connected, idle children are watched for their own CPU and wake-ups.
IDLE_SECONDS = env_float("SITELINK_BENCH_IDLE_SECONDS", 10.0)
MIB = 1024.0

#: Issue 11's targets: USS per connected child (median, MiB); seconds to all
#: connected with the defaults and with the connect-rate cap lifted.
USS_TARGET = 5.0
CONNECT_TARGET = 1.5
CONNECT_TARGET_UNCAPPED = 1.2
#: The floor the issue measured those targets against: 200 bare forks spawned
#: and connected (tests/bench/reference_forks.py) in 0.8 s on its machine. On
#: another machine each target is also shown as that multiple of the floor
#: measured in the same run.
ISSUE_FLOOR = 0.8

pytestmark = [pytest.mark.bench, pytest.mark.timeout(int(TIMEOUT) + 240)]

BASELINES = {
    "bare interpreter (`python -c pass`-like)": "import sys",
    "`import paho.mqtt.client, zmq, msgpack`": "import paho.mqtt.client, zmq, msgpack",
    "`import services.connection` (all a child imports, not connected)": "import services.connection",
}


def _baseline(code: str, tmp: Path, n: int = 3) -> list[dict]:
    procs = [LineProcess([sys.executable, "-c", f"{code}; import sys; print('ready', flush=True); sys.stdin.read()"],
                         tmp / f"baseline-{i}.err", stdin=True) for i in range(n)]
    try:
        for p in procs:
            p.expect("ready", 30)
        return [m for p in procs if (m := memory(p.pid)) is not None]
    finally:
        for p in procs:
            p.stop()


def _idle(children: list[int], seconds: float) -> tuple[float, float] | None:
    """The children's CPU (% of one core, all of them) and wake-ups (per child
    per second) over ``seconds`` while they are connected and receive nothing."""
    before = {p: m for p in children if (m := threads_cpu_and_wakeups(p)) is not None}
    time.sleep(seconds)
    after = {p: m for p in before if (m := threads_cpu_and_wakeups(p)) is not None}
    if not after:
        return None
    cpu = sum(after[p][0] - before[p][0] for p in after)
    wakeups = sum(after[p][1] - before[p][1] for p in after)
    return 100 * cpu / seconds, wakeups / seconds / len(after)


def _mem_row(label: str, mems: list[dict]) -> list[str]:
    uss = [m["uss"] / MIB for m in mems]
    pss = [m["pss"] / MIB for m in mems]
    rss = [m["rss"] / MIB for m in mems]
    return [label, str(len(mems)), f"**{fmt(median(uss), 1)}**", fmt(max(uss) if uss else None, 1),
            fmt(median(pss), 1), fmt(median(rss), 1)]


def _measure(bench_db: str, broker, durable_pg, tmp_path: Path, overrides: dict[str, str]) -> dict:
    """Start the monitor over K active connections; time them to connected; read the children's memory."""
    sql_setup = SQL(bench_db)
    sql_setup.rows("INSERT INTO site (name) SELECT 'kid-' || g FROM generate_series(1, %s) g", K)
    sql_setup.rows("INSERT INTO mqtt_connection (site_id, broker_host, broker_port, topics, keepalive, is_active) "
                   "SELECT id, '127.0.0.1', %s, ARRAY['sites/' || name || '/#'], 60, false FROM site", broker.port)
    sql_setup.close()

    tmp_path.mkdir(parents=True, exist_ok=True)
    stack = Stack(bench_db, broker, tmp_path)
    figures: dict = {}
    try:
        service_defaults(stack, SITELINK_MONITOR_INTERVAL="1", **overrides)
        stack.start("logger")
        wait_for(lambda: "logger ready" in stack.output("logger"), 30, "the logger to be ready")

        def monitor_family() -> list[int]:
            proc = stack.procs.get("monitor")
            return [proc.pid, *descendants(proc.pid)] if proc is not None else []
        # Precise: each child runs some 9 ms, which whole clock ticks mostly miss
        # (the children's share then read as the kernel's); none is reaped meanwhile.
        meter = CpuMeter({"monitor + children": monitor_family, "logger": lambda: [stack.pid("logger")],
                          "mosquitto": lambda: [broker.proc.pid],
                          "postgres": lambda: [durable_pg.proc.pid, *descendants(durable_pg.proc.pid)]},
                         precise=True)
        t_monitor = time.monotonic()
        stack.start("monitor")
        wait_for(lambda: " cycle: " in stack.output("monitor"), 60, "the monitor's first cycle")
        figures["monitor_ready"] = time.monotonic() - t_monitor
        figures["busy_before"] = wait_until_quiet()
        monitor_pid = stack.pid("monitor")
        zygote_pids = [p for p in descendants(monitor_pid) if "zygote" in cmdline(p)]
        cpu_before = {p: cpu_seconds(p) or 0.0 for p in [monitor_pid, *zygote_pids]}
        meter.start()
        t0 = time.time()
        t0_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        stack.sql.rows("UPDATE mqtt_connection SET is_active = true")
        marks: dict[int, float] = {}
        connected = 0
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            connected = stack.sql.value("SELECT count(*) FROM mqtt_connection WHERE status = 'connected'")
            now = time.time()
            for share in (1, K // 2, K):
                if connected >= share and share not in marks:
                    marks[share] = now - t0
            if connected >= K:
                break
            time.sleep(0.05)
        meter.stop()
        figures["cpu"], figures["disturbed"] = meter.describe(), meter.disturbed()
        figures["per_child"] = meter.per_item(K)
        figures["connected"] = connected
        figures["marks"] = marks
        row = stack.sql.one("SELECT extract(epoch FROM max(last_connected_at))::float8 AS last "
                            "FROM mqtt_connection WHERE status = 'connected'")
        figures["child_clock_last"] = row["last"] - t0 if row and row["last"] else None

        family = descendants(monitor_pid)
        children = broker_connection_holders(family, broker.port)
        others = [p for p in family if p not in children]
        # Since boot, to 10 ms, unlike a wall clock rebuilt from the whole-second btime.
        starts = [s for p in children if (s := started_since_boot(p)) is not None]
        figures["spawn_first"] = min(starts) - t0_boot if starts else None
        figures["spawn_last"] = max(starts) - t0_boot if starts else None
        figures["children"] = [m for p in children if (m := memory(p)) is not None]
        figures["others"] = [(p, cmdline(p)[:80], memory(p)) for p in others]
        # CPU seconds each process spent from the rows' activation to here (the
        # zygote's include the intermediates it reaped, if it forks through one).
        figures["child_cpu"] = [c for p in children if (c := run_seconds(p)) is not None]
        zygotes = [p for p in others if "zygote" in cmdline(p)]
        figures["zygote_cpu"] = ((cpu_seconds(zygotes[0]) or 0.0) - cpu_before.get(zygotes[0], 0.0)
                                 if zygotes else None)
        figures["monitor_cpu"] = (cpu_seconds(monitor_pid) or 0.0) - cpu_before[monitor_pid]
        sample = children[0] if children else None
        figures["how"] = cmdline(sample).strip() if sample else "?"
        parent = parent_pid(sample) if sample else None
        figures["parent"] = cmdline(parent).strip()[:100] if parent else "?"
        monitor_mem = memory(monitor_pid)
        figures["monitor_uss"] = monitor_mem["uss"] / MIB if monitor_mem else None
        figures["idle"] = _idle(children, IDLE_SECONDS) if IDLE_SECONDS > 0 else None

        t_stop = time.monotonic()
        stack.stop("monitor")
        figures["stop_all"] = time.monotonic() - t_stop
        figures["left_behind"] = [p for p in children if alive(p)]
    finally:
        stack.close()
    uss = [m["uss"] / MIB for m in figures["children"]]
    print(f"\n[children] {' '.join(f'{k}={v}' for k, v in overrides.items()) or 'defaults'}: "
          f"{figures['connected']}/{K} connected; all after {fmt(marks.get(K), 2)} s; "
          f"USS per child median {fmt(median(uss), 1)} MiB, max {fmt(max(uss) if uss else None, 1)} MiB",
          flush=True)
    return figures


def _connect_target(run: str) -> float:
    return CONNECT_TARGET if run == "defaults" else CONNECT_TARGET_UNCAPPED


def _connect_rate_setting() -> str | None:
    """The setting that caps connection attempts per second, if this version has one."""
    from shared import config
    for f in dataclasses.fields(config.Settings):
        if f.name == "connect_rate":
            return config.PREFIX + f.metadata["env"]
    return None


def test_children_start_connect_and_memory(databases, broker, durable_pg, tmp_path):
    variants = {"defaults": {}}
    rate_setting = _connect_rate_setting()
    if rate_setting:
        variants[f"{rate_setting}={UNCAPPED_RATE:g}"] = {rate_setting: f"{UNCAPPED_RATE:g}"}
    attempts = iter(range(1, 100))
    wait_until_quiet()
    floor = bare_forks(broker.port, K, tmp_path)
    print(f"\n[children] bare forks: {floor['connected']}/{K} connected after {fmt(floor['all_connected'], 2)} s",
          flush=True)
    runs: dict[str, dict] = {}
    for name, overrides in variants.items():
        runs[name] = measure_quietly(f"children, {name}", lambda o=overrides: _measure(
            databases.sitelink(), broker, durable_pg, tmp_path / f"attempt-{next(attempts)}", o))
    figures = runs["defaults"]
    baselines = {label: _baseline(code, tmp_path) for label, code in BASELINES.items()}

    kids = figures["children"]
    uss = [m["uss"] / MIB for m in kids]

    how = figures["how"]
    if "services.connection" in how:
        mode = ("a fresh interpreter per child (`python -m services.connection --settings-stdin`, "
                "settings on stdin)")
    elif "zygote" in how:
        mode = f"forks of a preloaded zygote (their command line: `{how}`)"
    else:
        mode = f"processes with the command line `{how}`"
    mem_rows = [_mem_row(f"{len(kids)} children as the monitor starts them", kids)]
    mem_rows.append(_mem_row(f"bare forks (`tests/bench/reference_forks.py`), connected", floor["mems"]))
    mem_rows += [_mem_row(f"fresh interpreter: {label}", mems) for label, mems in baselines.items()]
    extra = ""
    if figures["others"]:
        extra = "\n\nOther descendants of the monitor (no broker connection): " + "; ".join(
            f"pid {p} `{c}` USS {fmt(m['uss'] / MIB if m else None, 1)} MiB" for p, c, m in figures["others"])
    disturbed = "".join(f"\n\n**{name}: {f['disturbed']}**; its timings are less reliable."
                        for name, f in runs.items() if f["disturbed"])
    total_pss = sum(m["pss"] for m in kids) / MIB
    names = list(runs)

    def stop_label(f: dict) -> str:
        return fmt(f["stop_all"], 2) + (f" ({len(f['left_behind'])} children still alive then)"
                                        if f["left_behind"] else "")
    floor_all = floor["all_connected"]

    def against_floor(n: str) -> str:
        value, target = runs[n]["marks"].get(K), _connect_target(n)
        scaled = target / ISSUE_FLOOR * floor_all if floor_all else None
        if value is None or scaled is None:
            return f"{n} <= {target:g} s: {results.verdict(value, target, higher_is_better=False)}"
        return (f"{n} <= {target:g} s: {results.verdict(value, target, higher_is_better=False)}; "
                f"{value / floor_all:.2f} x the bare forks' time, against {target / ISSUE_FLOOR:.2f} x "
                f"({fmt(scaled, 2)} s here): {results.verdict(value, scaled, higher_is_better=False)}")
    timing_rows = [
        ["monitor started -> its first cycle done (before the rows are activated)"]
        + [fmt(runs[n]["monitor_ready"], 2) for n in names] + ["", ""],
        ["rows activated -> first child spawned"] + [fmt(runs[n]["spawn_first"], 2) for n in names] + ["", ""],
        ["rows activated -> last child spawned"] + [fmt(runs[n]["spawn_last"], 2) for n in names]
        + [fmt(floor["last_fork"], 2), ""],
        ["rows activated -> first `connected` committed"] + [fmt(runs[n]["marks"].get(1), 2) for n in names]
        + ["", ""],
        [f"rows activated -> {K // 2} `connected` committed"]
        + [fmt(runs[n]["marks"].get(K // 2), 2) for n in names] + ["", ""],
        [f"rows activated -> all {K} `connected` committed"]
        + [f"**{fmt(runs[n]['marks'].get(K), 2)}**" for n in names] + [f"**{fmt(floor_all, 2)}**"]
        + ["; ".join(against_floor(n) for n in names)],
        ["rows activated -> last child's own `connected` timestamp"]
        + [fmt(runs[n]["child_clock_last"], 2) for n in names] + ["", ""],
        ["SIGTERM to the monitor -> monitor exited (children with it)"] + [stop_label(runs[n]) for n in names]
        + ["", ""],
        ["CPU meanwhile (% of one core)"] + [runs[n]["cpu"] for n in names] + ["", ""],
        [f"connected and idle for {IDLE_SECONDS:g} s: CPU of all {K} children (% of one core)"]
        + [fmt(runs[n]["idle"][0], 2) if runs[n]["idle"] else "" for n in names]
        + ["", f"the whole stack with 1000 idle sites <= 3 %: these {K} children's share <= {3 * K / 1000:g} %"],
        ["connected and idle: wake-ups per child per second (context switches, all its threads)"]
        + [fmt(runs[n]["idle"][1], 2) if runs[n]["idle"] else "" for n in names] + ["", ""],
        ["CPU ms per child until connected: the child's own (mean)"]
        + [fmt(1000 * sum(runs[n]["child_cpu"]) / max(1, len(runs[n]["child_cpu"])), 1) for n in names]
        + [fmt(floor["child_cpu_ms"], 1), ""],
        ["CPU ms per child until connected: the zygote's (total / children; bare forks: their parent's)"]
        + [fmt(1000 * runs[n]["zygote_cpu"] / max(1, len(runs[n]["child_cpu"])), 1)
           if runs[n]["zygote_cpu"] is not None else "" for n in names] + [fmt(floor["parent_cpu_ms"], 1), ""],
        ["CPU ms per child until connected: the monitor's (total / children)"]
        + [fmt(1000 * runs[n]["monitor_cpu"] / max(1, len(runs[n]["child_cpu"])), 1)
           if runs[n]["monitor_cpu"] is not None else "" for n in names] + ["", ""],
        ["CPU ms per child until connected: the logger's, PostgreSQL's (total / children)"]
        + [f"{fmt(runs[n]['per_child'].get('logger'), 1)}, {fmt(runs[n]['per_child'].get('postgres'), 1)}"
           for n in names] + ["", ""],
        ["CPU ms per child until connected: the kernel's rest; the VM's host (steal)"]
        + [f"{fmt(runs[n]['per_child'].get('kernel and this bench'), 1)}; "
           f"{fmt(runs[n]['per_child'].get('steal'), 1)}" for n in names]
        + [f"; {fmt(floor.get('steal_per_child_ms'), 1)}", ""],
    ]
    timing = results.table(["measure (seconds)"] + names + ["bare forks (the floor)", "target"], timing_rows)
    rate_note = ""
    if len(runs) > 1:
        variable = names[1].split("=")[0]
        rate = float(default(variable))
        rate_note = (f"\n\nThe second column lifts the monitor's cap on connection attempts per second "
                     f"({variable}, default {rate:g}), to show what the machine does without it: with "
                     f"the default, {K} connections cannot all be attempted in under {K / rate:g} s by design.")
    memory_table = results.table(["processes", "n", "USS median (MiB)", "USS max (MiB)", "PSS median (MiB)",
                                  "RSS median (MiB)"], mem_rows)
    shortfall = ("" if figures["connected"] >= K else
                 f" **Only {figures['connected']} of {K} were connected after the {TIMEOUT:g} s time-out.**")
    body = f"""`tests/bench/bench_children.py`: {K} connections to the local Mosquitto, not active;
the logger and the monitor (interval 1 s) run; once the monitor has done its
first cycle, one UPDATE makes all {K} active and PostgreSQL is polled every 50 ms
until all {K} are `connected`. Children found: {len(kids)} (descendants of the
monitor holding a broker connection), started as {mode}; their parent is
`{figures['parent']}`.{shortfall}

{timing}{rate_note}

The column "bare forks" is `tests/bench/reference_forks.py`, run just before, on
the same broker, the faster of {len(floor['all_connected_runs'])} runs in a row (all connected after
{", ".join(fmt(x, 2) for x in floor['all_connected_runs'])} s; the first to touch that much
of a VM's memory can pay for it on the host too): a parent that imported paho, pyzmq and msgpack forks {K}
children as fast as it can; each opens a ZeroMQ socket, connects, subscribes and
says so; no settings, database, status or log. It is the floor issue 11 measured
at {ISSUE_FLOOR:g} s on its machine; its targets are shown as that multiple of the
floor too, for a machine slower or faster than that one.

Memory of the children started with the defaults, once all are connected (USS =
Private_Clean + Private_Dirty from /proc/PID/smaps_rollup; baselines: 3 fresh
interpreters each, idle):

{memory_table}

Target (issue 11): USS <= {USS_TARGET:g} MiB per child (median): median {fmt(median(uss), 1)} MiB,
max {fmt(max(uss) if uss else None, 1)} MiB, {results.verdict(median(uss) if uss else None, USS_TARGET, higher_is_better=False)}.
All {len(kids)} children together: {fmt(total_pss, 0)} MiB PSS. The monitor itself: USS
{fmt(figures['monitor_uss'], 1)} MiB. Machine load just before the rows were activated:
{', '.join(f"{n} {runs[n]['busy_before']:.2f}" for n in names)} cores busy.{disturbed}{extra}
"""
    results.update_section("Child cost", body)
    print("\n" + body, flush=True)
    assert all(f["connected"] > 0 for f in runs.values())
