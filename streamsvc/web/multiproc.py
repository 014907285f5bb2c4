"""/metrics across worker processes: prometheus_client's multiprocess files, one dir per server.

The parent (``serving.workers``) makes the directory, names it to each worker in ``MULTIPROC_ENV``
before prometheus_client is imported there, and removes it at exit; any worker's scrape sums all
workers' files. The rule: a dead worker's counters stay in the totals, its gauges do not.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Metric, ProcessCollector
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

__all__ = ["MULTIPROC_ENV", "WorkerProcesses", "collect_workers", "dead", "make_dir", "remove_dir"]

#: What prometheus_client reads, at import, to write its values to files in that directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LIVE_FILE = re.compile(r"gauge_livesum_(\d+)\.db")


def make_dir() -> str:
    """A fresh directory for one server's metric files."""
    return tempfile.mkdtemp(prefix="streamsvc-metrics-")


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def dead(path: str, pid: int) -> None:
    """Forget a dead worker's gauges (its counters and histograms stay in the totals)."""
    mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def collect_workers(registry: CollectorRegistry, path: str) -> None:
    """Make ``registry`` answer with every worker's metrics: summed series, and ``process_*``
    per live worker (labelled ``pid``)."""
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(WorkerProcesses(path))


class WorkerProcesses(Collector):
    """``process_*`` of each live worker, read from /proc, with a ``pid`` label."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def pids(self) -> list[int]:
        found = []
        for entry in self.path.iterdir():
            match = _LIVE_FILE.fullmatch(entry.name)
            if match and _alive(int(match.group(1))):
                found.append(int(match.group(1)))
        return sorted(found)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self.pids():
            reader = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in reader.collect():
                target = merged.get(family.name)
                if target is None:
                    target = Metric(family.name, family.documentation, family.type)
                    merged[family.name] = target
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from merged.values()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
