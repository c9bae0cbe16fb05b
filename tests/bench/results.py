"""RESULTS.md: one section per benchmark, rewritten by that benchmark, the others kept.

``update_section("Ingest throughput", body)`` replaces the section headed
``## Ingest throughput`` (or appends it) and rewrites the file's header with
this machine's core count, the date and the git commit of the run.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
ROOT = RESULTS.parent.parent.parent
#: Sections in this order first; any other after them, in the order found.
ORDER = ["Ingest throughput", "Child cost", "Status feed latency"]
_HEADING = re.compile(r"^## (.+?)\s*$", re.MULTILINE)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    """Short commit, plus the files changed outside tests/bench when the tree is dirty."""
    sha = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
    # Porcelain lines are "XY path": two status letters, a space, the path.
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", ".", ":(exclude)tests/bench").splitlines()
             if len(line) > 3]
    if dirty:
        shown = ", ".join(dirty[:8]) + (f", +{len(dirty) - 8} more" if len(dirty) > 8 else "")
        return f"{sha} + uncommitted changes ({shown})"
    return sha


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def service_env(raw: str) -> dict[str, str]:
    """The services' settings a run changes (SITELINK_BENCH_SERVICE_ENV:
    ``NAME=value`` words, each a setting of ``shared.config``), for an A/B of
    a setting without editing its default. ValueError says what is wrong."""
    from shared import config

    known = {name for name, _, _ in config.documentation()}
    settings = {}
    for word in raw.split():
        name, equals, value = word.partition("=")
        if not equals or name not in known:
            raise ValueError(f"SITELINK_BENCH_SERVICE_ENV: {word!r} is not NAME=value with NAME one of "
                             f"shared.config's settings (see the README's settings table)")
        settings[name] = value
    return settings


#: The services' settings this run changes, said in every section it measures.
SERVICE_ENV = service_env(os.environ.get("SITELINK_BENCH_SERVICE_ENV", ""))


def run_line() -> str:
    """When, at which commit, on what: the machines the benchmarks run on change
    (and with them every absolute figure), so each section names its CPU; and
    the services' settings the run changed, if any."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    changed = "".join(f", services with {name}={value}" for name, value in SERVICE_ENV.items())
    return f"{now}, commit {commit()}, {os.cpu_count()} cores ({cpu_model()}){changed}"


def machine() -> str:
    cpu = cpu_model()
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        mem = f", {kib / 1024 / 1024:.1f} GiB RAM"
    except (OSError, IndexError, ValueError):
        pass
    return (f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def header() -> str:
    return "\n".join([
        "# sitelink benchmarks",
        "",
        "Written by `make bench` (`tests/bench/`, not part of `make test`). Each benchmark",
        "rewrites its own section and keeps the others; the line under each heading says",
        "when, at which commit and on how many cores it was measured. Ratios compare",
        "figures measured in the same run. Targets are goals, never assertions: a figure",
        "that misses its target is shown as it is, next to the target.",
        "",
        f"Last run: {run_line()}.",
        f"Machine: {machine()}.",
        "",
    ])


def _sections(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    matches = list(_HEADING.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        found[m.group(1)] = text[m.end():end].strip("\n")
    return found


def update_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or add) the section ``## name`` of ``path``; keep every other section."""
    sections = _sections(path.read_text()) if path.exists() else {}
    sections[name] = f"_Measured {run_line()}._\n\n{body.strip()}"
    names = [n for n in ORDER if n in sections] + [n for n in sections if n not in ORDER]
    parts = [header()]
    for n in names:
        parts.append(f"## {n}\n\n{sections[n]}\n")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "meets the target" if ok else "**misses the target**"
