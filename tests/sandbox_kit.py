"""Helpers for the Docker sandbox tests: request bodies, the engine's view, waiting.

The engine is asked through the ``docker`` CLI (the tests' own view, independent
of the code under test). Containers are found by the owner label a server
puts on everything it creates (``host:pid`` of the server process), so tests
running at the same time against other servers never see each other's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx

from tests.harness import ServerProcess, SSEResponse, parse_sse_lines, read_sse

IMAGE = os.environ.get("STREAMSVC_SANDBOX_IMAGE", "streamsvc-sandbox:latest")


#: Forks children that sleep until a fork is refused, then reports how many it made and why.
FORK_UNTIL_REFUSED = """
        import json, os, time
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError as exc:
            failure = type(exc).__name__
        print(json.dumps({"ok": True, "result": {"children": children, "failure": failure}}))
"""


def connector(
    code: str,
    *,
    timeout_ms: int = 20_000,
    memory_mb: int = 128,
    dependencies: Any = None,
    configuration: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    runtime: dict[str, Any] = {
        "language": "python",
        "entryPoint": "main.py",
        "timeoutMs": timeout_ms,
        "memoryMb": memory_mb,
    }
    if dependencies is not None:
        runtime["dependencies"] = dependencies
    return {
        "runtime": runtime,
        "configuration": configuration or {},
        "files": {"main.py": textwrap.dedent(code), **(files or {})},
    }


def body(code: str, *, network: str = "none", env: dict[str, str] | None = None, **kw: Any) -> Any:
    return {"connector": connector(code, **kw), "env": env or {}, "network_mode": network}


async def execute(client: httpx.AsyncClient, server: ServerProcess, payload: Any) -> Any:
    """The unstreamed answer (asserting a 200)."""
    response = await client.post(server.url + "/execute-connector", json=payload)
    assert response.status_code == 200, response.text
    return response.json()


async def stream(client: httpx.AsyncClient, server: ServerProcess, payload: Any) -> SSEResponse:
    """The streamed answer, every event; it must end with ``done``."""
    answer = await read_sse(client, server.url + "/execute-connector", payload)
    assert answer.status == 200, answer.body
    assert answer.events[-1].event == "done", [e.event for e in answer.events]
    return answer


async def sse_events(
    client: httpx.AsyncClient, server: ServerProcess, payload: Any
) -> AsyncIterator[tuple[str, Any]]:
    """``(event, data)`` pairs as they arrive; closing the generator hangs up."""
    headers = {"accept": "text/event-stream"}
    url = server.url + "/execute-connector"
    async with client.stream("POST", url, json=payload, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        block: list[str] = []
        async for line in response.aiter_lines():
            if line:
                block.append(line)
                continue
            fields, _ = parse_sse_lines(block)
            block = []
            if "event" in fields:
                yield fields["event"], json.loads(fields.get("data") or "null")


def owner(server: ServerProcess) -> str:
    return f"{socket.gethostname()}:{server.process.pid}"


def docker(*args: str, host: str | None = None, check: bool = True) -> str:
    env = dict(os.environ)
    if host:
        env["DOCKER_HOST"] = host
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr}")
    return result.stdout


def sandboxes(server: ServerProcess, host: str | None = None) -> list[str]:
    """Ids of every container (any state) the server labelled as its own."""
    out = docker(
        "ps", "-aq", "--no-trunc", "--filter", f"label=streamsvc.owner={owner(server)}", host=host
    )
    return out.split()


def inspect(container: str, host: str | None = None) -> Any:
    return json.loads(docker("inspect", container, host=host))[0]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout} s: {predicate}")
        time.sleep(interval)
    return time.monotonic() - started


async def eventually(predicate: Callable[[], bool], limit: float) -> float:
    """``wait_until`` for async tests: the predicate runs in a thread, the loop keeps going."""
    started = time.monotonic()
    while not await anyio.to_thread.run_sync(predicate):
        if time.monotonic() - started > limit:
            raise AssertionError(f"not true after {limit} s: {predicate}")
        await anyio.sleep(0.05)
    return time.monotonic() - started


def assert_no_sandboxes(server: ServerProcess, timeout: float = 10.0) -> None:
    """Every container of this server is gone (removal follows the answer closely)."""
    wait_until(lambda: not sandboxes(server), timeout)


def assert_healthy(server: ServerProcess) -> None:
    assert server.process.poll() is None, server.log()
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["components"]["sandbox"]["state"] == "ready", health


def result_line(answer: Any) -> Any:
    """The program's own result object (runs print ``{"ok": true, "result": ...}``)."""
    assert answer["ok"] is True, answer
    return answer["result"]
