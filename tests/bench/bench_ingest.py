"""Ingest throughput: committed reading rows per second, sitelink against two references.

Each run: publisher processes (tests/bench/publisher.py, QoS 1, as fast as
they can with at most SITELINK_BENCH_WINDOW messages in flight) send the
documented JSON format, one new reading per message, for
SITELINK_BENCH_SECONDS to a pipeline subscribed on the same broker and
writing to the same durable PostgreSQL:

- sitelink: the real logger + monitor + child (tests/conftest.py Stack, with
  the services' own defaults: the suite's short intervals and DEBUG logging removed);
- bare: tests/bench/reference_bare.py (paho -> json -> one writer thread COPYing batches);
- naive: tests/bench/reference_naive.py (paho -> one INSERT + COMMIT per message);
- sitelink with 4 sites, 4 publishers at once.

sitelink and the bare reference run SITELINK_BENCH_ROUNDS times (default 2),
alternating, so that a slow patch of the machine does not fall on one of
them only; the ratios use the medians.

Rows are timed by their ``received_at`` (``now()`` of the transaction that
wrote them), so nothing polls the database while the load runs. The rate
is rows committed in the window [first publish + SITELINK_BENCH_WARMUP, last
publish] divided by its length: the pipeline's sustained throughput (or the
publishers' rate, if it keeps up). After publishing ends, the benchmark
waits up to SITELINK_BENCH_DRAIN s for the rest. The last test writes the
section of RESULTS.md: figures and ratios measured in this run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.bench import results
from tests.bench.harness import (BENCH_DIR, DRAIN, PUBLISH_RATE, SECONDS, WARMUP, WINDOW, CpuMeter, LineProcess,
                                 default, describe_broker, describe_pg, descendants, env_int, fmt, go, median,
                                 measure_quietly, peak_rss, publishers, service_defaults, summaries,
                                 wait_until_quiet)
from tests.stack import Stack

#: sitelink and the bare reference run this many times each (alternating); the ratio uses their medians.
ROUNDS = env_int("SITELINK_BENCH_ROUNDS", 2)

pytestmark = [pytest.mark.bench, pytest.mark.timeout(int(SECONDS + DRAIN + 240))]

#: Figures of this module's runs, by pipeline, for the report at the end.
FIGURES: dict[str, dict] = {}
NOTES: dict[str, str] = {}


def _count(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _drain(url: str, table: str, expected: int, limit: float) -> tuple[int, bool]:
    """Wait until ``expected`` rows, 3 s without a new row, or ``limit`` s; return (count, still growing)."""
    deadline = time.monotonic() + limit
    last, last_change = _count(url, table), time.monotonic()
    while last < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        now_count = _count(url, table)
        if now_count != last:
            last, last_change = now_count, time.monotonic()
        elif time.monotonic() - last_change >= 3.0:
            return last, False
    return last, last < expected and time.monotonic() - last_change < 3.0


def _timing(url: str, table: str, p0: float, p1: float) -> dict:
    w0 = p0 + WARMUP
    with psycopg.connect(url, autocommit=True) as conn:
        total, commits, in_window, first, last = conn.execute(
            f"SELECT count(*), count(DISTINCT received_at), count(*) FILTER (WHERE received_at >= to_timestamp(%s) "
            f"AND received_at < to_timestamp(%s)), extract(epoch FROM min(received_at))::float8, "
            f"extract(epoch FROM max(received_at))::float8 FROM {table}", (w0, p1)).fetchone()
        per_second = [n for _, n in conn.execute(
            f"SELECT floor(extract(epoch FROM received_at) - %s)::int AS s, count(*) FROM {table} "
            f"WHERE received_at >= to_timestamp(%s) AND received_at < to_timestamp(%s) GROUP BY 1 ORDER BY 1",
            (w0, w0, p1)).fetchall()]
        duplicates = 0
        if table != "reading":
            duplicates = conn.execute(f"SELECT count(*) - count(DISTINCT (sensor, ts)) FROM {table}").fetchone()[0]
    window = max(p1 - w0, 1e-9)
    return {"rows": total, "commits": commits, "in_window": in_window, "window": window, "rate": in_window / window,
            "first_commit": first, "last_commit": last,
            "overall": total / (last - first) if first is not None and last > first else None,
            "per_second": per_second, "duplicates": duplicates}


def _broker_drops(broker, offset: int) -> list[str]:
    """Mosquitto's notices since ``offset`` that it dropped messages queued for a client
    (its queue for that client held max_queued_messages)."""
    with open(broker.log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [line.split("dropped for client", 1)[1].strip(" .") for line in text.splitlines()
            if "Outgoing messages are being dropped for client" in line]


def _run(name: str, specs: list[tuple[int, str, str]], url: str, table: str,
         groups: dict, tmp: Path, broker, drain: float = DRAIN) -> dict:
    log_offset = broker.log.stat().st_size
    with publishers(specs, SECONDS, tmp) as pubs:
        meter = CpuMeter({"publishers": lambda: [p.pid for p in pubs], **groups})
        quiet = wait_until_quiet()
        meter.start()
        go(pubs)
        time.sleep(SECONDS)
        meter.stop()
        sums = summaries(pubs, 60)
    p0, p1 = min(s["start"] for s in sums), max(s["end"] for s in sums)
    published = sum(s["published"] for s in sums)
    acked = sum(s["acked"] for s in sums)
    count, still_draining = _drain(url, table, published, drain)
    peaks = {}
    for group in ("child(ren)", "logger", "reference"):
        if group in groups:
            values = [v for p in groups[group]() if (v := peak_rss(p)) is not None]
            if values:
                peaks[group] = max(values) / 1024
    fig = _timing(url, table, p0, p1)
    pipeline_cpu = sum(used for group, used in meter.used.items() if group in PIPELINE_GROUPS)
    fig.update(published=published, acked=acked, offered=published / (p1 - p0), p0=p0, p1=p1,
               still_draining=still_draining, cpu=meter.describe(), peaks=peaks, busy_before=quiet,
               pipeline_cpu=100 * pipeline_cpu / meter.seconds if meter.seconds else None,
               disturbed=meter.disturbed(), broker_drops=_broker_drops(broker, log_offset),
               drain=(fig["last_commit"] - p1) if fig["last_commit"] else None, sites=len(specs))
    assert fig["rows"] <= published, f"{name}: more rows ({fig['rows']}) than messages published ({published})"
    assert fig["duplicates"] == 0
    assert fig["rows"] > 0, f"{name}: no row committed"
    print(f"\n[ingest] {name}: {fig['rate']:,.0f} rows/s in the window (offered {fig['offered']:,.0f} msg/s), "
          f"{fig['rows']:,}/{published:,} rows committed, drain {fmt(fig['drain'], 1)} s; "
          f"CPU per 1000 rows/s {fmt(_cpu_per_krows(fig), 1)}; CPU: {fig['cpu']}; "
          f"peak RSS: {', '.join(f'{k} {v:.0f} MiB' for k, v in peaks.items())}",
          flush=True)
    return fig


#: The CPU a pipeline costs: its own processes and PostgreSQL (not the publishers, not the broker).
PIPELINE_GROUPS = ("child(ren)", "logger", "monitor", "reference", "postgres")


def _cpu_per_krows(f: dict) -> float | None:
    """% of one core the pipeline and PostgreSQL used per 1000 rows/s stored."""
    if f.get("pipeline_cpu") is None or not f["rate"]:
        return None
    return f["pipeline_cpu"] / (f["rate"] / 1000)


def _stack_groups(stack: Stack, broker, pg) -> dict:
    return {
        "child(ren)": lambda: descendants(stack.pid("monitor")),
        "logger": lambda: [stack.pid("logger")],
        "monitor": lambda: [stack.pid("monitor")],
        "mosquitto": lambda: [broker.proc.pid],
        "postgres": lambda: [pg.proc.pid, *descendants(pg.proc.pid)],
    }


def _sitelink(name: str, sites: int, bench_db: str, broker, durable_pg, tmp_path: Path,
              overrides: dict[str, str] | None = None) -> dict:
    stack = Stack(bench_db, broker, tmp_path)
    try:
        ids = [stack.sql.add_site(f"ingest-{i}", port=broker.port, keepalive=60) for i in range(1, sites + 1)]
        service_defaults(stack, **(overrides or {}))
        stack.start("logger", "monitor")
        for cid in ids:
            stack.sql.wait_status(cid, "connected", timeout=60)
        specs = [(broker.port, f"sites/ingest-{i}/GW-{i:02d}/DL-07", f"GW-{i:02d}") for i in range(1, sites + 1)]
        fig = _run(name, specs, bench_db, "reading", _stack_groups(stack, broker, durable_pg), tmp_path, broker)
        # Not asserted: reported. A connection that dropped under load is a finding.
        fig["trouble"] = stack.sql.rows(
            "SELECT connection_id, timestamp, level, message FROM mqtt_connection_log "
            "WHERE level NOT IN ('DEBUG', 'INFO') ORDER BY id LIMIT 20")
        fig["statuses"] = [stack.sql.status(cid) for cid in ids]
        return fig
    finally:
        stack.close()


def _reference(name: str, kind: str, script: str, scratch_db: str, broker, durable_pg, tmp_path: Path,
               table: str, drain: float = DRAIN) -> dict:
    topic = f"bench/{kind}/#"
    ref = LineProcess([sys.executable, str(BENCH_DIR / script), "--port", str(broker.port), "--topic", topic,
                       "--dsn", scratch_db], tmp_path / f"{kind}.err")
    try:
        ref.expect("ready", 30)
        groups = {"reference": lambda: [ref.pid], "mosquitto": lambda: [broker.proc.pid],
                  "postgres": lambda: [durable_pg.proc.pid, *descendants(durable_pg.proc.pid)]}
        return _run(name, [(broker.port, f"bench/{kind}/GW-01/DL-07", "GW-01")], scratch_db, table, groups,
                    tmp_path, broker, drain)
    finally:
        ref.stop()


#: The runs, in order: sitelink and the bare reference alternate, so that a
#: slow patch of the machine does not fall on one pipeline only.
#: SITELINK_BROKER_ACKS=on-receipt (where the setting exists) runs sitelink with
#: paho's automatic acks, as the references do: the same pipeline without the
#: after-commit guarantee, to measure what the guarantee costs.
ON_RECEIPT = default("SITELINK_BROKER_ACKS") != "?"
PIPELINES = {
    "sitelink": "sitelink, 1 site (logger + monitor + child)",
    "bare": "bare reference (paho -> json -> COPY batches)",
    "naive": "naive reference (INSERT + COMMIT per message)",
    "sitelink-on-receipt": "sitelink, 1 site, SITELINK_BROKER_ACKS=on-receipt",
    "sitelink-4": "sitelink, 4 sites, 4 publishers",
}
RUNS = []
for _round in range(1, ROUNDS + 1):
    RUNS += [("sitelink", _round), ("bare", _round)]
    if _round == 1:
        RUNS.append(("naive", _round))
        if ON_RECEIPT:
            RUNS.append(("sitelink-on-receipt", _round))
RUNS.append(("sitelink-4", 1))


@pytest.mark.parametrize("pipeline,round_", RUNS, ids=[f"{i + 1}-{p}" for i, (p, _) in enumerate(RUNS)])
def test_ingest(pipeline, round_, databases, broker, durable_pg, tmp_path):
    NOTES.setdefault("pg", describe_pg(durable_pg))
    NOTES.setdefault("broker", describe_broker(broker))
    name = f"{pipeline} #{round_}"
    attempts = iter(range(1, 100))

    def measure() -> dict:
        tmp = tmp_path / f"attempt-{next(attempts)}"
        tmp.mkdir()
        if pipeline == "sitelink":
            return _sitelink(name, 1, databases.sitelink(), broker, durable_pg, tmp)
        if pipeline == "sitelink-4":
            return _sitelink(name, 4, databases.sitelink(), broker, durable_pg, tmp)
        if pipeline == "sitelink-on-receipt":
            return _sitelink(name, 1, databases.sitelink(), broker, durable_pg, tmp,
                             {"SITELINK_BROKER_ACKS": "on-receipt"})
        if pipeline == "bare":
            return _reference(name, "bare", "reference_bare.py", databases.scratch(), broker, durable_pg, tmp,
                              "bare_reading")
        # It cannot catch up in any reasonable time: a short look at its drain is enough.
        return _reference(name, "naive", "reference_naive.py", databases.scratch(), broker, durable_pg, tmp,
                          "naive_reading", drain=min(DRAIN, 5.0))
    FIGURES[name] = measure_quietly(name, measure)


# ------------------------------------------------------------------ report

def _rates(pipeline: str) -> list[float]:
    return [f["rate"] for name, f in FIGURES.items() if name.rsplit(" #", 1)[0] == pipeline]


def _ratio(a: str, b: str) -> float | None:
    ra, rb = _rates(a), _rates(b)
    if ra and rb and median(rb) > 0:
        return median(ra) / median(rb)
    return None


def test_report():
    assert FIGURES, "no ingest run finished"
    rows = []
    for name, f in FIGURES.items():
        pipeline, round_ = name.rsplit(" #", 1)
        label = PIPELINES[pipeline] + (f", run {round_}" if len(_rates(pipeline)) > 1 else "")
        steady = f["per_second"][1:-1] or f["per_second"]
        spread = (f"{min(steady):,}-{max(steady):,} (median {median(steady):,.0f})" if steady else "n/a")
        drained = f"{f['rows']:,} / {f['published']:,}"
        if f["still_draining"]:
            drained += " (still draining at the cut-off)"
        if f["broker_drops"]:
            drained += " (the broker dropped messages for the subscriber)"
        rate = f"**{fmt(f['rate'])}**" + (" (disturbed)" if f["disturbed"] else "")
        rows.append([label, rate, spread, fmt(f["overall"]), fmt(f["offered"]), drained,
                     fmt(f["rows"] / max(f["commits"], 1)), fmt(f["drain"], 1), fmt(_cpu_per_krows(f), 1),
                     f["cpu"],
                     ", ".join(f"{k} {v:,.0f}" for k, v in f["peaks"].items())])
    missing = [PIPELINES[p] + f", run {r}" for p, r in RUNS if f"{p} #{r}" not in FIGURES]
    rows += [[label, "not run (failed)", "", "", "", "", "", "", "", "", ""] for label in missing]
    table = results.table(
        ["pipeline", "rows/s (window)", "rows per 1-s bucket", "rows/s first to last commit", "offered msg/s",
         "rows / published", "rows per commit", "last commit after publishing ended (s)",
         "CPU per 1000 rows/s (pipeline + PostgreSQL, % of one core)", "CPU over the window (% of one core)", "peak RSS (MiB)"], rows)
    bare, naive = _ratio("sitelink", "bare"), _ratio("sitelink", "naive")
    four = _ratio("sitelink-4", "sitelink")
    guarantee = _ratio("sitelink", "sitelink-on-receipt")
    on_receipt_bare = _ratio("sitelink-on-receipt", "bare")
    per_round = [f"{FIGURES[f'sitelink #{r}']['rate'] / FIGURES[f'bare #{r}']['rate']:.2f}"
                 for r in range(1, ROUNDS + 1) if f"sitelink #{r}" in FIGURES and f"bare #{r}" in FIGURES]
    costs = [c for name, f in FIGURES.items() if name.rsplit(" #", 1)[0] == "sitelink"
             and (c := _cpu_per_krows(f)) is not None]
    cost = median(costs) if costs else None
    ratios = results.table(["ratio (same run; medians of the runs)", "measured", "target", ""], [
        ["sitelink / bare", fmt(bare, 2) + (f" (per run: {', '.join(per_round)})" if len(per_round) > 1 else ""),
         ">= 1.15", results.verdict(bare, 1.15)],
        ["sitelink / naive", fmt(naive, 1), ">= 5", results.verdict(naive, 5)],
        ["sitelink 4 sites / sitelink 1 site", fmt(four, 2), ">= 1.0 (the logger is not the bound)",
         results.verdict(four, 1.0)],
        ["sitelink, 1 site: CPU per 1000 rows/s stored (sitelink's processes + PostgreSQL, % of one core)",
         fmt(cost, 1), "<= 3.6", results.verdict(cost, 3.6, higher_is_better=False)],
    ] + ([
        ["sitelink after-commit acks / sitelink on-receipt acks (what the guarantee costs)", fmt(guarantee, 2),
         "(none)", ""],
        ["sitelink on-receipt acks / bare (same ack policy as the reference)", fmt(on_receipt_bare, 2), "(none)",
         ""],
    ] if ON_RECEIPT else []))
    settings = ", ".join(f"{v} {default(v)}" for v in (
        "SITELINK_BATCH_MAX", "SITELINK_BATCH_WAIT", "SITELINK_MAX_UNACKED", "SITELINK_BROKER_ACKS",
        "SITELINK_RESEND_AFTER", "SITELINK_LOG_LEVEL") if default(v) != "?")
    body = f"""`tests/bench/bench_ingest.py`: committed `reading` rows per second.

Setup: {NOTES.get('pg', 'PostgreSQL (durable)')}; the suite's Mosquitto
(`supervisor_conf/bin/mosquitto`: {NOTES.get('broker', '?')}), all on this machine. Each publisher is a
separate process (paho-mqtt, QoS 1, publish() without waiting, at most
{WINDOW} messages in flight, {'as fast as it can' if not PUBLISH_RATE else f'at most {PUBLISH_RATE:g} msg/s'}) sending
the documented JSON format with a unique `ts` per message (one new row each)
for {SECONDS:g} s. sitelink runs with the services' own defaults ({settings}). The rate counts
rows by `received_at` (the writing transaction's `now()`) between
{WARMUP:g} s after the first publish and the last publish. Publishers, broker,
pipeline and PostgreSQL share the {os.cpu_count()} cores. sitelink and the bare
reference run {ROUNDS} time(s) each, alternating; the ratios use the medians.

{table}

{ratios}

Reading the figures: when the pipeline is slower than the publisher, the
backlog waits in the broker (up to max_queued_messages per client; beyond
that Mosquitto drops QoS 1 messages for that client and says so in its log,
noted in "rows / published") or in the pipeline's own memory (peak RSS);
the rate is then the pipeline's own ceiling on this machine. Rows missing
without a broker drop and without "still draining" were lost by the
pipeline. The CPU column shows where the cores went: with {os.cpu_count()} cores
shared by the publishers, the broker, the pipeline and PostgreSQL, a
pipeline that needs less CPU per row leaves more to everything else.
"""
    busy = {k: f["busy_before"] for k, f in FIGURES.items()}
    body += ("\nMachine load just before each run (cores busy over 1 s, the bench waits up to "
             "SITELINK_BENCH_QUIET_WAIT s for it to fall under 0.25): "
             + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()) + ".\n")
    for key, f in FIGURES.items():
        if f["disturbed"]:
            body += f"\n**{key}: {f['disturbed']}**; its figures are less reliable.\n"
    for key, f in FIGURES.items():
        if f.get("trouble") or any(st != "connected" for st in f.get("statuses", ["connected"])):
            body += (f"\n**{key}: not every connection stayed connected** (statuses at the end: "
                     f"{', '.join(f['statuses'])}); warnings and errors logged:\n\n" + "\n".join(
                         f"- connection {r['connection_id']} {r['timestamp']:%H:%M:%S.%f} {r['level']}: "
                         f"{r['message']}" for r in f["trouble"]) + "\n")
    results.update_section("Ingest throughput", body)
    print("\n" + body, flush=True)
