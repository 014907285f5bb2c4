"""Several server processes on one port (``STREAMSVC_WORKERS`` > 1).

The parent opens the socket once and starts whole servers on it; it restarts a dead one
(within ``RESTART_LIMIT``), stops all on a signal, and leaves no orphans (``PR_SET_PDEATHSIG``).
Design notes: docs/architecture.md ("Module notes").
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from streamsvc.serving.server import check_exposure, listen_socket
from streamsvc.settings import ServerSettings
from streamsvc.web import multiproc

log = logging.getLogger("streamsvc")

RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
STOP_MARGIN = 5.0
POLL_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1

Worker = subprocess.Popen[bytes]


def supervise(settings: ServerSettings) -> int:
    """Run ``STREAMSVC_WORKERS`` workers until a signal; the process's exit code."""
    check_exposure(settings)
    listener = listen_socket(settings)
    metrics_dir = multiproc.make_dir()
    try:
        return _supervise(settings, listener, metrics_dir)
    finally:
        multiproc.remove_dir(metrics_dir)


def _supervise(settings: ServerSettings, listener: socket.socket, metrics_dir: str) -> int:
    signals: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: signals.append(signum))
    command = [
        *(sys.executable, "-m", "streamsvc", "serve"),
        *("--host", settings.host, "--port", str(settings.port)),
        *("--listen-fd", str(listener.fileno()), "--metrics-dir", metrics_dir),
    ]
    # The workers' metrics go to files there, which every worker's /metrics sums; it must be
    # in their environment before prometheus_client is imported.
    env = {**os.environ, multiproc.MULTIPROC_ENV: metrics_dir}

    def start() -> Worker:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            env=env,
            pass_fds=(listener.fileno(),),
            process_group=0,
            preexec_fn=_die_with_parent(),
        )

    workers = [start() for _ in range(settings.workers)]
    log.info(
        "streamsvc listening on http://%s:%d (%d workers: %s)",
        settings.host,
        settings.port,
        len(workers),
        " ".join(str(worker.pid) for worker in workers),
    )
    restarts: collections.deque[float] = collections.deque(maxlen=RESTART_LIMIT)
    code = 0
    while not signals and code == 0:
        time.sleep(POLL_SECONDS)
        for index, worker in enumerate(workers):
            if worker.poll() is None:
                continue
            now = time.monotonic()
            if len(restarts) == RESTART_LIMIT and now - restarts[0] < RESTART_WINDOW:
                log.error("worker %d %s; too many restarts, stopping", worker.pid, _ended(worker))
                code = 1
                break
            multiproc.dead(metrics_dir, worker.pid)
            restarts.append(now)
            workers[index] = start()
            log.warning("worker %d %s; started %d", worker.pid, _ended(worker), workers[index].pid)
    if signals:
        log.info("received %s; stopping the workers", signal.Signals(signals[0]).name)
    listener.close()  # once the workers close theirs, new connections are refused
    _stop(workers, settings.shutdown_grace_seconds + STOP_MARGIN, signals)
    return code


def _stop(workers: list[Worker], within: float, signals: list[int]) -> None:
    """SIGTERM each worker and wait ``within`` seconds (or until another signal); then kill."""
    seen = len(signals)
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + within
    while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
        if len(signals) > seen:
            log.warning("received another signal; killing the workers")
            break
        time.sleep(POLL_SECONDS / 2)
    for worker in workers:
        if worker.poll() is None:
            log.warning("worker %d did not stop in time; killing it", worker.pid)
            worker.kill()
        worker.wait()


def _ended(worker: Worker) -> str:
    code = worker.returncode
    if code >= 0:
        return f"exited with {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn``: SIGTERM this child when the parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # died before the call: nobody would signal us
            os._exit(1)

    return preexec
