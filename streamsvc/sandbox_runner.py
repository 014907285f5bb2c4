"""The program that starts a connector inside its container (stdlib only).

It is copied into every sandbox next to the connector's files and runs as
``python3 /bundle/.streamsvc/runner.py`` under tini (PID 1), so when it ends
the container ends, and every process the connector left behind dies with it.

1. It copies the read-only bundle into the writable working directory
   ``/work`` (the files, plus ``.streamsvc/context.json``).
2. It forks. The child, in its own process group, runs the entry point as
   ``__main__`` in ``/work`` with stdout and stderr line-buffered. The context
   (``{"connector": {...}}``, overrides merged, placeholders substituted) is
   the JSON file named by ``$STREAMSVC_CONTEXT_FILE``. When the entry point
   defines ``run(context)``, the child calls it (awaiting the result when it
   is awaitable) and prints the return value as the last stdout line:
   ``{"ok": true, "result": <value>}``, or the value itself when it is
   already an object with an ``ok`` key.
3. The parent supervises: it waits for the child, exits with the child's
   status (``128 + N`` for a signal), and meanwhile watches the cgroup
   counter ``pids.events`` (``max N``: forks or thread creations the pids
   limit refused). The first time it is non-zero the parent writes
   ``PIDS_MARKER`` to stderr, and the server flags the run ``pids_limited``.
   The counter is the kernel's, so this does not depend on how the program
   reports a failed fork. The program cannot see the supervisor among its
   own children; it could forge the line or kill its parent, which only
   changes its own report.
"""

import asyncio
import inspect
import json
import os
import runpy
import select
import shutil
import sys
import time
from collections.abc import Callable

BUNDLE = "/bundle"
WORK = "/work"
PIDS_MARKER = "streamsvc: the process limit was reached (a fork or thread creation failed)\n"
_PIDS_EVENTS = ("/sys/fs/cgroup/pids/pids.events", "/sys/fs/cgroup/pids.events")
_POLL_SECONDS = 0.05


def main() -> int:
    shutil.copytree(BUNDLE, WORK, dirs_exist_ok=True, copy_function=shutil.copyfile)
    os.chdir(WORK)
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)  # a program that stops or kills its group misses the supervisor
        _run_connector()
        return 0
    return _supervise(child)


# -- the connector (the child) ----------------------------------------------------


def _run_connector() -> None:
    with open(os.environ["STREAMSVC_CONTEXT_FILE"], encoding="utf-8") as handle:
        context = json.load(handle)
    for stream in (sys.stdout, sys.stderr):  # one write per line, even under PYTHONUNBUFFERED
        stream.reconfigure(line_buffering=True, write_through=False)  # type: ignore[union-attr]
    entry = os.path.join(WORK, os.environ["STREAMSVC_ENTRY_POINT"])
    sys.argv = [entry]
    sys.path[0] = os.path.dirname(entry)  # instead of the runner's own directory
    connector_pid = os.getpid()
    namespace = runpy.run_path(entry, run_name="__main__")
    run = namespace.get("run")
    if os.getpid() != connector_pid or not callable(run):
        return  # no run(), or a forked child that fell off the end of the script
    value = run(context)
    if inspect.isawaitable(value):
        value = asyncio.run(_wait(value))
    if not (isinstance(value, dict) and "ok" in value):
        value = {"ok": True, "result": value}
    print(json.dumps(value, default=str), flush=True)


async def _wait(value: object) -> object:
    return await value  # type: ignore[misc]


# -- the supervisor (the parent) ---------------------------------------------------


def _supervise(child: int) -> int:
    """Wait for ``child`` while watching the process limit; its exit code."""
    counter = next((p for p in _PIDS_EVENTS if os.path.exists(p)), None)
    exited = _exit_watch(child)
    reported = False
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if not reported and counter and _limit_hits(counter):
            os.write(2, PIDS_MARKER.encode())
            reported = True
        if pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
        exited(_POLL_SECONDS)


def _exit_watch(child: int) -> Callable[[float], object]:
    """A function that sleeps up to N seconds, waking early when ``child`` exits."""
    try:
        pidfd = os.pidfd_open(child)
    except (AttributeError, OSError):
        return time.sleep
    return lambda seconds: select.select([pidfd], [], [], seconds)


def _limit_hits(path: str) -> int:
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                key, _, count = line.partition(" ")
                if key == "max":
                    return int(count)
    except (OSError, ValueError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
