"""Containers never outlive their runs (issue 4, item 5; issue 3, item 4).

Removed on success, error and timeout (the other modules check that after
each run), on a client that hangs up (within 2 s), on SIGTERM (before the
process exits), and at start-up when a dead earlier process left some behind.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import anyio
import httpx
import pytest

from tests.harness import (
    IMAGE,
    RUN_GRACE,
    ServerProcess,
    assert_no_sandboxes,
    body,
    docker,
    eventually,
    execute,
    sandboxes,
    sse_events,
    wait_until,
)

pytestmark = pytest.mark.docker

SLEEPER = """
    import time
    print("started", flush=True)
    time.sleep(60)
"""


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def labelled_container(owner: str) -> str:
    return docker(
        "create",
        "--label",
        "streamsvc.managed=true",
        "--label",
        f"streamsvc.owner={owner}",
        "--label",
        "streamsvc.role=run",
        "--network",
        "none",
        IMAGE,
        "true",
    ).strip()


def exists(container: str) -> bool:
    return bool(docker("ps", "-aq", "--filter", f"id={container}").strip())


async def test_failed_runs_leave_nothing(server: ServerProcess, client: httpx.AsyncClient) -> None:
    answer = await execute(client, server, body("raise SystemExit('failing on purpose')"))
    assert answer["exit_code"] == 1 and answer["error"]["code"] == "nonzero_exit"
    assert answer["stderr"] == "failing on purpose\n"
    assert_no_sandboxes(server)


async def test_start_up_removes_leftovers_of_dead_processes_only(start_server: Any) -> None:
    host = socket.gethostname()
    orphan = labelled_container(f"{host}:{dead_pid()}")
    alive = labelled_container(f"{host}:1")  # pid 1 is alive: a peer's, not ours to touch
    try:
        started = start_server()
        assert not exists(orphan), "the dead process's sandbox is still there"
        assert exists(alive), "a live process's sandbox was removed"
        assert re.search(r"removed \d+ leftover sandbox", started.log())
    finally:
        docker("rm", "-f", orphan, alive, check=False)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "unstreamed"])
async def test_a_client_that_hangs_up_has_its_container_removed_soon(
    streamed: bool, server: ServerProcess
) -> None:
    """Within 2 s, after the run's grace when the stream had started (a reader may come back
    with Last-Event-ID); a JSON client never learnt the run's id, so its run stops at once."""
    async with httpx.AsyncClient(timeout=60) as client:
        if streamed:
            async with contextlib.aclosing(sse_events(client, server, body(SLEEPER))) as events:
                async for name, data in events:
                    if name == "stdout" and data["text"] == "started\n":
                        break
        else:

            async def start_run() -> None:
                await client.post(server.url + "/execute-connector", json=body(SLEEPER))

            async with anyio.create_task_group() as tg:
                tg.start_soon(start_run)
                # The run has a container (then the program is soon asleep): hang up.
                await eventually(lambda: bool(sandboxes(server)), limit=20)
                await anyio.sleep(0.5)
                tg.cancel_scope.cancel()
    hung_up = time.monotonic()
    wait_until(lambda: not sandboxes(server), timeout=10)
    grace = float(RUN_GRACE) if streamed else 0.0
    assert grace <= time.monotonic() - hung_up < grace + 2.0


async def test_sigterm_kills_and_removes_running_sandboxes_before_exit(
    start_server: Any,
) -> None:
    dedicated: ServerProcess = start_server()
    seen: dict[str, Any] = {}

    async def streamed(client: httpx.AsyncClient) -> None:
        async with contextlib.aclosing(sse_events(client, dedicated, body(SLEEPER))) as events:
            async for name, data in events:
                seen.setdefault("events", []).append(name)
                if name == "error":
                    seen["error"] = data["error"]["code"]

    async def unstreamed(client: httpx.AsyncClient) -> None:
        with contextlib.suppress(httpx.HTTPError):
            response = await client.post(dedicated.url + "/execute-connector", json=body(SLEEPER))
            seen["unstreamed"] = response.status_code
            seen["unstreamed_code"] = response.json()["error"]["code"]

    async with httpx.AsyncClient(timeout=60) as client, anyio.create_task_group() as tg:
        tg.start_soon(streamed, client)
        tg.start_soon(unstreamed, client)
        await eventually(lambda: len(sandboxes(dedicated)) == 2, limit=30)
        await anyio.sleep(0.5)  # both programs are running
        dedicated.signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(dedicated.process.wait, 30)
    assert code == 0, dedicated.log()
    assert sandboxes(dedicated) == []  # gone by the time the process exited
    assert seen.get("error") == "shutting_down", seen
    # The JSON request gets a real answer too, not a dropped connection.
    assert (seen.get("unstreamed"), seen.get("unstreamed_code")) == (503, "shutting_down"), seen
