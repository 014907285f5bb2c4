"""What the benchmarks share: percentiles, the machine's facts and the markdown they write.

Pure helpers (``percentile``, ``markdown_table``, ``replace_section``) are unit-tested in
tests/test_benchmarks.py; the rest reads the machine (facts, CPU seconds) or the docs file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
#: Raw figures and the benchmarks' own tools (LiteLLM's virtualenv) live here.
BENCH = ROOT / ".bench"
DOCS = ROOT / "docs/benchmarks.md"


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value at 0-based rank ``floor(fraction * n)`` of the sorted values (the max at 1.0).

    The "higher" convention: p50 of an even count is the upper middle value, and p95 of 20
    values is the largest. Raises ``ValueError`` on no values.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is not within [0, 1]")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def load_average(decimals: int = 1) -> str:
    """The 1, 5 and 15 minute load averages, space-separated."""
    return " ".join(f"{x:.{decimals}f}" for x in os.getloadavg())


def _output(command: list[str]) -> str:
    """A command's stripped stdout, or "" when it cannot run or fails."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0:
            return done.stdout.strip()
    return ""


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, str]:
    """CPUs, CPU model, memory, Docker, kernel, OS, Python, commit and load average.

    A fact that cannot be read (no Docker CLI, not a git checkout) is ``"unknown"``.
    """
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    docker = ["docker", "version", "--format", "{{.Server.Version}}"]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "memory": memory,
        "docker": _output(docker) or "unknown",
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "commit": _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown",
        "load": load_average(),
    }


def markdown_table(headers: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines; ``align`` has one letter per column, ``l`` or ``r``."""
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} does not fit {len(headers)} columns of l or r")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row of {len(row)} cells under {len(headers)} headers: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def replace_section(doc: str, title: str, body: str) -> str:
    """``doc`` with its ``## title`` section (up to the next ``## `` or the end) set to ``body``.

    A missing section is appended; other sections are kept as they are. The result ends
    with one newline, and a blank line separates the section from the next.
    """
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: section, doc, count=1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + section
    return doc.rstrip("\n") + "\n"


def write_docs_section(title: str, body: str, path: Path = DOCS) -> Path:
    """Set the ``## title`` section of docs/benchmarks.md (other sections untouched)."""
    path.parent.mkdir(exist_ok=True)
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(replace_section(doc, title, body))
    return path


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all CPUs), from /proc/stat."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def process_cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU seconds of ``pids`` and their living descendants (with what
    they waited for): a snapshot to subtract from a later one."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                if process.pid in seen:
                    continue
                seen.add(process.pid)
                with contextlib.suppress(psutil.Error):
                    t = process.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
    return total


def pids_named(*names: str) -> list[int]:
    """Processes whose name starts with one of ``names`` (e.g. ``dockerd``, ``containerd``)."""
    found = []
    for process in psutil.process_iter(["name"]):
        name = process.info["name"] or ""
        if name.startswith(names):
            found.append(process.pid)
    return found


def publish(title: str, text: str, raw: Mapping[str, Any], *, docs: bool) -> None:
    """Keep ``raw`` in .bench/<title>-last-run.json, print ``text``, and (``docs``) set it as
    the ``## title`` section of docs/benchmarks.md."""
    BENCH.mkdir(exist_ok=True)
    (BENCH / f"{title.lower()}-last-run.json").write_text(json.dumps(raw, indent=1))
    if docs:
        print(write_docs_section(title, text), file=sys.stderr)
    print(text)
