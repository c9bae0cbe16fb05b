"""What the benchmarks share: settings, a durable PostgreSQL, processes, CPU and memory figures."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import psycopg

from tests.bench import results
from tests.support import ROOT, PostgresServer, stop_process

BENCH_DIR = Path(__file__).resolve().parent
T = TypeVar("T")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ settings

def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


#: How long each publisher sends (s), and the other knobs of every benchmark.
SECONDS = env_float("SITELINK_BENCH_SECONDS", 20.0)
WARMUP = env_float("SITELINK_BENCH_WARMUP", 2.0)
DRAIN = env_float("SITELINK_BENCH_DRAIN", 15.0)
WINDOW = env_int("SITELINK_BENCH_WINDOW", 1000)
PUBLISH_RATE = env_float("SITELINK_BENCH_PUBLISH_RATE", 0.0)  # msg/s per publisher, 0 = as fast as possible
QUIET_WAIT = env_float("SITELINK_BENCH_QUIET_WAIT", 120.0)  # s to wait for other load to end before a run
#: Cores used outside the benchmark's processes during a measurement above which it is flagged.
DISTURBED = 0.3
#: How many times a disturbed measurement is repeated.
RETRIES = env_int("SITELINK_BENCH_RETRIES", 1)

#: What a benchmark's Stack keeps of the test suite's environment: where
#: things are. Every other SITELINK_ setting (the suite shortens intervals and
#: logs at DEBUG) is removed, so the services run with their own defaults,
#: whatever those are at the commit measured.
WHERE = ("SITELINK_HOME", "SITELINK_DATABASE_URL", "SITELINK_EVENTS_ENDPOINT", "SITELINK_STATUS_FEED",
         "SITELINK_SNAPSHOT_ENDPOINT", "SITELINK_RUNTIME_DIR",
         "SITELINK_LOG_DIR")


def service_defaults(stack, **overrides: str) -> None:
    """Reset ``stack``'s environment to the services' defaults, plus the run's
    SITELINK_BENCH_SERVICE_ENV (``results.SERVICE_ENV``), plus ``overrides``
    (what the benchmark itself sets wins)."""
    for key in [k for k in stack.env if k.startswith("SITELINK_") and k not in WHERE]:
        del stack.env[key]
    stack.env.update(results.SERVICE_ENV)
    stack.env.update(overrides)


def default(variable: str) -> str:
    """The services' default for ``variable`` (e.g. SITELINK_BATCH_WAIT), as documented by shared.config."""
    from shared import config
    for name, value, _ in config.documentation():
        if name == variable:
            return value
    return "?"


# ------------------------------------------------------------ durable PostgreSQL

class DurablePostgresServer(PostgresServer):
    """The suite's PostgresServer, but durable: no SITELINK_PG_FAST (fsync and
    synchronous_commit on, as in production)."""

    def __init__(self, base: Path):
        super().__init__(base, fast=False)

    def start(self, timeout: float = 120.0) -> None:
        super().start(timeout)

    def settings(self) -> dict[str, str]:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            rows = conn.execute("SELECT name, setting FROM pg_settings WHERE name IN "
                                "('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers', "
                                "'wal_level', 'server_version')").fetchall()
        return dict(rows)


def describe_pg(server: DurablePostgresServer) -> str:
    s = server.settings()
    buffers = int(s.get("shared_buffers", "0")) * 8 // 1024
    return (f"PostgreSQL {s.get('server_version')} started by the bench without SITELINK_PG_FAST, "
            f"i.e. durable: fsync={s.get('fsync')}, synchronous_commit={s.get('synchronous_commit')}, "
            f"full_page_writes={s.get('full_page_writes')}, shared_buffers={buffers} MiB, "
            f"on {_filesystem(server.datadir)}")


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=5).stdout
        fields = out.splitlines()[1].split()
        return f"{fields[1]} ({fields[0]})"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "an unknown filesystem"


def describe_broker(broker) -> str:
    """The Mosquitto settings that matter to throughput, from the config it was started with."""
    defaults = {"max_inflight_messages": "20", "max_queued_messages": "1000", "max_queued_bytes": "0",
                "persistence": "false"}
    found: dict[str, str] = {}
    try:
        for line in (Path(broker.base) / "mosquitto.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in defaults:
                found[parts[0]] = parts[1]
    except OSError:
        pass
    return ", ".join(f"{k} {found.get(k, defaults[k] + ' (default)')}" for k in defaults)


# ------------------------------------------------------------------ /proc

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of ``pid``, plus those of its children it has reaped
    (so a child that starts and ends within a measurement counts for its parent)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return sum(int(x) for x in fields[11:15]) / CLK_TCK



def run_seconds(pid: int) -> float | None:
    """CPU seconds ``pid`` has run, to the nanosecond (/proc/PID/schedstat): the
    clock ticks of /proc/PID/stat miss most of a child that runs a few ms."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None

def threads_cpu_and_wakeups(pid: int) -> tuple[float, int] | None:
    """CPU seconds all of ``pid``'s threads have run, to the nanosecond
    (/proc/PID/task/*/schedstat), and how often they were switched in (context
    switches: each a wake-up). /proc/PID/stat counts whole clock ticks of a
    process's total, which says 0 for a child that ran a few ms and, over a
    short window, 0 or 10 ms for one that woke a few times."""
    try:
        cpu, switches = 0.0, 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                cpu += int(f.read().split()[0]) / 1e9
            with open(f"/proc/{pid}/task/{task}/status") as f:
                switches += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        return cpu, switches
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int) -> float | None:
    """Wall-clock time ``pid`` started (resolution 1/CLK_TCK s)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + int(fields[19]) / CLK_TCK


def started_since_boot(pid: int) -> float | None:
    """When ``pid`` started, in seconds since boot (resolution 1/CLK_TCK s):
    comparable with ``time.clock_gettime(time.CLOCK_BOOTTIME)``."""
    fields = _stat_fields(pid)
    return int(fields[19]) / CLK_TCK if fields is not None else None


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def descendants(pid: int) -> list[int]:
    """Every live (non-zombie) descendant of ``pid``."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] != "Z":
                parent_of[int(entry)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found += kids
        frontier += kids
    return found


def memory(pid: int) -> dict[str, int] | None:
    """Rss, Pss and USS (Private_Clean + Private_Dirty) of ``pid``, in KiB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            values[parts[0][:-1]] = int(parts[1])
    return {"rss": values.get("Rss", 0), "pss": values.get("Pss", 0),
            "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)}


def peak_rss(pid: int) -> int | None:
    """Peak resident set (VmHWM) of ``pid`` in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def broker_connection_holders(pids: Iterable[int], broker_port: int) -> list[int]:
    """Those of ``pids`` holding an established TCP connection to 127.0.0.1:broker_port."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == broker_port:
                inodes.add(f[9])
    holders = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                holders.append(pid)
                break
    return holders


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores, /proc/stat),
    the time the host took from this VM (steal) included."""
    return sum(system_busy_and_steal())


def system_busy_and_steal() -> tuple[float, float]:
    """CPU seconds since boot (all cores, /proc/stat): this machine busy itself, and
    the time a VM's host ran something else while this machine had work (steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


class StealSampler:
    """Samples the VM's steal (/proc/stat) every ``every`` s in a thread, so that
    a slow moment can be matched with what the host took from this machine then."""

    def __init__(self, every: float = 0.05):
        self.every = every
        self.samples: list[tuple[float, float]] = []  # (time.time(), steal seconds since boot)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StealSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), system_busy_and_steal()[1]))
            if self._stop.wait(self.every):
                return

    def cores(self, start: float, end: float) -> float | None:
        """Cores the host took on average from ``start`` to ``end`` (time.time()), from
        the samples around them (so over a little more than that), if sampled."""
        before = [x for x in self.samples if x[0] <= start]
        after = [x for x in self.samples if x[0] >= end]
        if not before or not after:
            return None
        (t0, s0), (t1, s1) = before[-1], after[0]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None


def busy_cores(interval: float = 1.0) -> float:
    """How many cores the machine kept busy over the next ``interval`` s."""
    before = system_busy_seconds()
    time.sleep(interval)
    return (system_busy_seconds() - before) / interval


#: Seconds this whole benchmark session may still spend waiting for quiet.
_wait_budget = [env_float("SITELINK_BENCH_WAIT_BUDGET", 300.0)]


def wait_until_quiet(threshold: float = 0.25) -> float:
    """Wait until other processes leave the machine nearly idle, so that a run is
    not measured against someone else's load; return the last busy figure
    (cores). At most QUIET_WAIT s each time, SITELINK_BENCH_WAIT_BUDGET s in the
    whole session. Nothing is stopped: it only waits, then goes ahead."""
    started = time.monotonic()
    deadline = started + min(QUIET_WAIT, max(_wait_budget[0], 0.0))
    try:
        while True:
            busy = busy_cores(1.0)
            if busy <= threshold or time.monotonic() >= deadline:
                if busy > threshold:
                    print(f"\n[bench] the machine is still busy ({busy:.2f} cores) after waiting "
                          f"{time.monotonic() - started:.0f} s; measuring anyway", flush=True)
                return busy
    finally:
        _wait_budget[0] -= max(0.0, time.monotonic() - started - 1.0)


def measure_quietly(what: str, measure: Callable[[], T]) -> T:
    """``measure()``, again (up to SITELINK_BENCH_RETRIES times) while its result says it was
    disturbed (a ``disturbed`` key, or attribute, holding a non-empty reason)."""
    for attempt in range(RETRIES + 1):
        result = measure()
        reason = result.get("disturbed") if isinstance(result, dict) else getattr(result, "disturbed", "")
        if not reason or attempt == RETRIES or _wait_budget[0] <= 0:
            return result
        print(f"\n[bench] {what}: {reason}; measuring again", flush=True)
    return result


def _all_processes() -> dict[int, int]:
    """Every process in /proc: pid -> parent pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                found[int(entry)] = int(fields[1])
    return found


class CpuMeter:
    """CPU seconds used per group of processes between ``start()`` and ``stop()``.

    A group is a callable returning its PIDs at that moment. Processes that
    start in between count from zero; those that end in between count through
    their parent (a process's figure includes the children it reaped), so a
    group should hold the parents of short-lived processes (the monitor, the
    postmaster).

    Besides the groups it measures the same way every other process that is
    not this benchmark's (not this process or a descendant): someone else's
    load, which makes a measurement ``disturbed()``. What remains of the
    machine's busy time (/proc/stat) is the kernel's own, charged to no
    process; it is shown but is no disturbance (creating 200 processes costs
    the kernel much of it). On a VM, the time its host ran something else while
    this machine had work (steal) is shown apart: the machine was slower then.
    """

    FOREIGN = "other processes"

    def __init__(self, groups: dict[str, Callable[[], list[int]]], precise: bool = False):
        self.groups = groups
        #: The groups' CPU from schedstat (to the ns, all threads) instead of clock
        #: ticks: for processes that run little, and which nobody reaps meanwhile
        #: (a reaped process's time is then lost, not given to its parent).
        self.precise = precise
        self._start: dict[str, dict[int, float]] = {}
        self.used: dict[str, float] = {}
        self.foreign = 0.0
        self.seconds = 0.0
        self._t0 = 0.0
        self._busy0 = 0.0
        self.system = 0.0  # CPU seconds of the whole machine over the window
        #: Of which the host took (steal): a VM slowed by its neighbours, not by us.
        self.steal = 0.0
        self._steal0 = 0.0

    def _sample(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            out[name] = {}
            for pid in pids():
                if self.precise:
                    measured = threads_cpu_and_wakeups(pid)
                    cpu = measured[0] if measured is not None else None
                else:
                    cpu = cpu_seconds(pid)
                if cpu is not None:
                    out[name][pid] = cpu
        processes = _all_processes()
        mine, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            kids = [p for p, pp in processes.items() if pp == parent]
            mine.update(kids)
            frontier += kids
        out[self.FOREIGN] = {}
        for pid in processes:
            if pid not in mine and (cpu := cpu_seconds(pid)) is not None:
                out[self.FOREIGN][pid] = cpu
        return out

    def start(self) -> None:
        # Reading thousands of processes takes a while (precise: up to a second
        # for 2000 children): the window runs from the middle of one reading to
        # the middle of the other.
        self._busy0, self._steal0 = system_busy_and_steal()
        reading_from = time.monotonic()
        self._start = self._sample()
        self._t0 = (reading_from + time.monotonic()) / 2

    def stop(self) -> dict[str, float]:
        reading_from = time.monotonic()
        end = self._sample()
        self.seconds = (reading_from + time.monotonic()) / 2 - self._t0
        busy, steal = system_busy_and_steal()
        self.steal = steal - self._steal0
        self.system = busy - self._busy0 + self.steal
        for name, pids in end.items():
            before = self._start.get(name, {})
            # A process gone by now was reaped by its parent, whose figure now holds
            # its whole life: take off what it had used before the start.
            gone = sum(cpu for pid, cpu in before.items() if pid not in pids)
            used = sum(cpu - before.get(pid, 0.0) for pid, cpu in pids.items()) - gone
            if name == self.FOREIGN:
                self.foreign = max(used, 0.0)
            else:
                self.used[name] = used
        return self.used

    def per_item(self, n: int, skip: tuple[str, ...] = ()) -> dict[str, float]:
        """CPU ms per item over the window (e.g. per child started) by group, with the
        kernel's rest and, on a VM, what its host took (steal)."""
        out = {name: 1000 * used / n for name, used in self.used.items() if name not in skip}
        out["kernel and this bench"] = 1000 * self.kernel / n
        out["steal"] = 1000 * self.steal / n
        return out

    @property
    def kernel(self) -> float:
        """CPU seconds of the machine's own busy time charged to no process we read:
        the kernel's, and this bench's own."""
        return self.system - self.steal - sum(self.used.values()) - self.foreign

    @property
    def other(self) -> float:
        """Cores used by other processes than the benchmark's."""
        return self.foreign / self.seconds if self.seconds else 0.0

    def disturbed(self, threshold: float = DISTURBED) -> str:
        """A warning when other processes than the benchmark's used more than ``threshold`` cores."""
        if self.other > threshold:
            return (f"disturbed: other processes than the benchmark's used {self.other:.2f} cores "
                    f"during the measurement")
        return ""

    def describe(self) -> str:
        if not self.seconds:
            return ""
        parts = [f"{name} {100 * used / self.seconds:.0f}%" for name, used in self.used.items()]
        parts.append(f"other processes {100 * self.foreign / self.seconds:.0f}%")
        parts.append(f"kernel and this bench {100 * self.kernel / self.seconds:.0f}%")
        if self.steal >= 0.005 * self.seconds:
            parts.append(f"taken by the VM's host (steal) {100 * self.steal / self.seconds:.0f}%")
        parts.append(f"machine {100 * self.system / self.seconds:.0f}% of {os.cpu_count() * 100}%")
        return ", ".join(parts)


# ------------------------------------------------------------ child processes

class LineProcess:
    """A subprocess whose stdout lines are collected by a thread (stderr to a file)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None,
                 stdin: bool = False):
        self.log_path = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=self._log, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with ``prefix`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"pid {self.pid}: no line starting {prefix!r} within {timeout:g} s; "
                                     f"stderr: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise AssertionError(f"pid {self.pid} exited ({self.proc.returncode}) before {prefix!r}; "
                                         f"stderr: {self.log_path.read_text(errors='replace')[-2000:]}")
                continue
            if line.startswith(prefix):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        code = stop_process(self.proc, sig, timeout)
        self._thread.join(5)
        self._log.close()
        return code


def publisher(port: int, topic: str, seconds: float, log: Path, *, gateway: str = "GW-01",
              ts_base: float | None = None, rate: float | None = None) -> LineProcess:
    """A publisher process (tests/bench/publisher.py); it prints ``ready`` and waits for ``go``.
    ``rate``: msg/s at most (default PUBLISH_RATE; 0: as fast as it can)."""
    args = [sys.executable, str(BENCH_DIR / "publisher.py"), "--port", str(port), "--topic", topic,
            "--seconds", str(seconds), "--window", str(WINDOW), "--gateway", gateway]
    rate = PUBLISH_RATE if rate is None else rate
    if rate > 0:
        args += ["--rate", str(rate)]
    if ts_base is not None:
        args += ["--ts-base", repr(ts_base)]
    return LineProcess(args, log, stdin=True)


@contextmanager
def publishers(specs: list[tuple[int, str, str]], seconds: float, tmp: Path, rate: float | None = None):
    """Start one publisher per (port, topic, gateway), wait until each is connected."""
    procs: list[LineProcess] = []
    try:
        for i, (port, topic, gateway) in enumerate(specs):
            procs.append(publisher(port, topic, seconds, tmp / f"publisher-{i}-{time.monotonic_ns()}.err",
                                   gateway=gateway, rate=rate))
        for p in procs:
            p.expect("ready", 30)
        yield procs
    finally:
        for p in procs:
            p.stop()


def go(procs: list[LineProcess]) -> float:
    """Tell every publisher to start now; return the wall-clock start."""
    t0 = time.time()
    for p in procs:
        p.send("go\n")
    return t0


def summaries(procs: list[LineProcess], timeout: float) -> list[dict]:
    return [json.loads(p.expect("{", timeout)) for p in procs]


# ------------------------------------------------------------------ figures

def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), nearest-rank on sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


# ------------------------------------------------------------------ the floor under starting children

#: The floor is the faster of this many runs of ``reference_forks.py`` in a
#: row: the first of them may be the first to touch that much of the guest's
#: memory (on a VM a first touch costs a fault on the host too), and whatever
#: runs next, sitelink included, would start on memory already touched.
FLOOR_RUNS = 2


def bare_forks(broker_port: int, n: int, tmp: Path, timeout: float = 120.0, runs: int = FLOOR_RUNS) -> dict:
    """The floor for starting ``n`` children: ``bare_fork_run`` ``runs`` times
    in a row, the figures of the fastest, with ``all_connected_runs`` (each
    run's time to all connected, in order)."""
    done = [bare_fork_run(broker_port, n, tmp, timeout, k) for k in range(1, runs + 1)]
    best = min(done, key=lambda f: f["all_connected"] if f.get("all_connected") is not None else math.inf)
    best["all_connected_runs"] = [f.get("all_connected") for f in done]
    return best


def bare_fork_run(broker_port: int, n: int, tmp: Path, timeout: float = 120.0, k: int = 1) -> dict:
    """Run ``tests/bench/reference_forks.py`` (bare forks of a parent that imported
    paho, pyzmq and msgpack, each connecting, subscribing and saying so over
    ZeroMQ) for ``n`` children: its timings, and, while they are connected, the
    children's CPU (schedstat) and memory and the parent's CPU."""
    _, steal_before = system_busy_and_steal()
    proc = LineProcess([sys.executable, str(BENCH_DIR / "reference_forks.py"), "--port", str(broker_port),
                        "--children", str(n), "--timeout", str(timeout)], tmp / f"reference-forks-{n}-{k}.err",
                       stdin=True)
    try:
        figures = json.loads(proc.expect("{", timeout + 60))
        # From the run's start to all connected, and a little of its start-up (under 0.1 s)
        figures["steal_per_child_ms"] = 1000 * (system_busy_and_steal()[1] - steal_before) / max(1, n)
        pids = figures.pop("pids")
        cpu = [c for p in pids if (c := run_seconds(p)) is not None]
        mems = [m for p in pids if (m := memory(p)) is not None]
        figures["child_cpu_ms"] = 1000 * statistics.mean(cpu) if cpu else None
        parent = threads_cpu_and_wakeups(proc.pid)
        figures["parent_cpu_ms"] = 1000 * parent[0] / max(1, n) if parent else None
        figures["uss_mib"] = median([m["uss"] / 1024 for m in mems]) if mems else None
        figures["uss_max_mib"] = max(m["uss"] / 1024 for m in mems) if mems else None
        figures["mems"] = mems
        proc.send("stop\n")
        proc.proc.wait(60)
        return figures
    finally:
        proc.stop()
