"""Polls one server's ``/health`` from its own process while the server runs (scripts/attack).

``python -m tests.health_watch URL OUT`` writes to OUT one line per answer slower than
``LIMIT`` (``wall-clock-time seconds``) after ``started TIME`` and, when stopped (SIGTERM),
``probes N``. The conftest maps the slow answers to the tests running then (issue 12).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType

import httpx

LIMIT = 0.1
EVERY = 0.05


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(url: str, out: Path) -> None:
    signal.signal(signal.SIGTERM, _stop)
    probes = 0
    with out.open("a", buffering=1) as report, httpx.Client(timeout=5) as http:
        report.write(f"started {time.time():.3f}\n")
        try:
            while True:
                started = time.perf_counter()
                try:
                    ok = http.get(url + "/health").status_code == 200
                except httpx.HTTPError:  # not up, restarting or gone: nothing to measure
                    ok = False
                elapsed = time.perf_counter() - started
                if ok:
                    probes += 1
                    if elapsed > LIMIT:
                        report.write(f"{time.time() - elapsed:.3f} {elapsed:.3f}\n")
                time.sleep(EVERY)
        finally:
            report.write(f"probes {probes}\n")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
