"""The server process: /health, --host/--port, missing Azure settings, graceful shutdown,
and several worker processes on one port (STREAMSVC_WORKERS)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Callable

import httpx
import psutil
import pytest

from tests.fake_azure import FakeAzure, Reply
from tests.harness import ServerProcess, SSEResponse, free_port, read_sse, server_env

STREAM = {"messages": [{"role": "user", "content": "Hello"}], "stream": True}


async def test_health_names_each_component_and_its_state(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    response = await client.get(server.url + "/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    health = response.json()
    assert health["components"]["chat"] == {"state": "configured", "deployment": "gpt-4o"}
    assert health["status"] in {"ok", "degraded"}  # "degraded" only by the sandbox here
    assert set(health["components"]) >= {"chat"}


async def test_missing_azure_settings_leave_the_server_up_but_chat_unconfigured(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(AZURE_OPENAI_API_KEY="", AZURE_OPENAI_ENDPOINT="")
    health = (await client.get(server.url + "/health")).json()
    assert health["status"] == "degraded"
    assert health["components"]["chat"]["state"] == "not_configured"
    for body in ({"messages": STREAM["messages"]}, STREAM):
        response = await client.post(server.url + "/chat", json=body)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "chat_not_configured"
    assert azure.requests == []


def test_host_and_port_options_override_the_settings(fake_azure: FakeAzure) -> None:
    port = free_port()
    env = server_env(fake_azure, STREAMSVC_HOST="192.0.2.1", STREAMSVC_PORT=str(free_port()))
    # 192.0.2.1 (TEST-NET) is not ours: serving at all proves --host won.
    process = ServerProcess(env, ["serve", "--host", "127.0.0.1", "--port", str(port)], port=port)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert f"127.0.0.1:{port}" in process.log()
    finally:
        process.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_stops_start_up_with_a_message(fake_azure: FakeAzure, workers: str) -> None:
    env = server_env(fake_azure, STREAMSVC_WORKERS=workers)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="server exited 2") as failed:
            ServerProcess(env, ["--port", str(port)], port=port)
    assert f"streamsvc: cannot listen on 127.0.0.1:{port}" in str(failed.value)
    assert "Traceback" not in str(failed.value)


async def _stream_then_signal(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient, signum: int
) -> tuple[list[str], float, SSEResponse]:
    """Open a stream, signal the server once the upstream sent its first chunk."""
    reading = asyncio.create_task(read_sse(client, server.url + "/chat", STREAM))
    for _ in range(500):
        if azure.requests:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # the first delta is on its way
    server.signal(signum)
    signalled = time.monotonic()
    response = await reading
    assert response.status == 200
    return [e.event for e in response.events], signalled, response


async def _exit_code(server: ServerProcess, within: float = 10) -> int:
    code: int = await asyncio.to_thread(server.process.wait, within)
    print(f"exited {code} after the signal:\n{server.log()}")  # shown on failure
    return code


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_shutdown_lets_a_stream_finish_within_the_drain_window(
    start_server: Callable[..., ServerProcess],
    azure: FakeAzure,
    client: httpx.AsyncClient,
    signum: int,
) -> None:
    # Grace 6 s: streams get 3 s to finish; this one needs about 1.2 s more.
    server = start_server(STREAMSVC_SHUTDOWN_GRACE_SECONDS="6")
    azure.push(Reply(text_chunks=["a", "b", "c", "d"], chunk_delay=0.4))
    events, signalled, _ = await _stream_then_signal(server, azure, client, signum)
    assert events == ["delta"] * 4 + ["done"]
    assert await _exit_code(server) == 0
    assert time.monotonic() - signalled < 6 + 1


async def test_shutdown_ends_a_stream_that_outlives_the_drain_window_with_an_error_event(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    # Grace 4 s; the upstream goes silent after one chunk (and the idle timeout is long).
    server = start_server(STREAMSVC_IDLE_TIMEOUT_SECONDS="60")
    azure.push(Reply(text_chunks=["a", "b"], hang_after=1))
    events, signalled, response = await _stream_then_signal(server, azure, client, signal.SIGTERM)
    ended = time.monotonic()
    assert events == ["delta", "error"]
    assert response.last.data["error"]["code"] == "shutting_down"
    assert 1.5 <= ended - signalled < 4
    assert await _exit_code(server) == 0
    assert time.monotonic() - signalled < 4 + 1
    assert await azure.await_disconnect(within=2)  # the upstream request was closed too


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_shutdown_answers_a_request_still_waiting_for_its_first_token_with_503(
    start_server: Callable[..., ServerProcess],
    azure: FakeAzure,
    client: httpx.AsyncClient,
    stream: bool,
) -> None:
    # The upstream's first chunk is 30 s away and the first-token timeout is longer still.
    server = start_server(STREAMSVC_FIRST_TOKEN_TIMEOUT_SECONDS="60")
    azure.push(Reply(text_chunks=["late"], chunk_delay=30))
    body = {**STREAM, "stream": stream}
    reading = asyncio.create_task(client.post(server.url + "/chat", json=body))
    for _ in range(500):
        if azure.requests:
            break
        await asyncio.sleep(0.02)
    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    response = await reading
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    assert 1.5 <= time.monotonic() - signalled < 4  # after the drain window, within grace
    assert await _exit_code(server) == 0
    assert await azure.await_disconnect(within=2)


def test_a_stopped_server_leaves_no_process_behind(fake_azure: FakeAzure) -> None:
    process = ServerProcess(server_env(fake_azure))
    pid, url = process.process.pid, process.url
    process.close()
    assert process.process.returncode == 0, process.log_path.name
    assert not psutil.pid_exists(pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def _workers(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children()


def _serving(workers: list[psutil.Process], port: int) -> set[int]:
    """The workers holding an accepted connection on ``port``."""
    return {
        worker.pid
        for worker in workers
        for conn in worker.net_connections("tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    }


def _wait_gone(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Wait for processes that need not be our children; those still running after ``within``."""

    def running(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + within
    while any(running(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in processes if running(p)]


async def test_workers_share_the_port_and_all_drain_on_sigterm(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    # Grace 4 s; every upstream goes silent after one chunk (and the idle timeout is long).
    server = start_server(STREAMSVC_WORKERS="2", STREAMSVC_IDLE_TIMEOUT_SECONDS="60")
    workers = _workers(server)
    assert len(workers) == 2
    azure.push(*[Reply(text_chunks=["a", "b"], hang_after=1) for _ in range(4)])
    readings: list[asyncio.Task[SSEResponse]] = []
    # An idle worker tends to win every accept, so pause each worker in turn: the
    # other must then accept from the shared socket and serve two streams.
    for paused in reversed(workers):
        paused.suspend()
        try:
            for _ in range(2):
                readings.append(asyncio.create_task(read_sse(client, server.url + "/chat", STREAM)))
            for _ in range(500):  # until the upstream has them: accepted and being served
                if len(azure.requests) == len(readings):
                    break
                await asyncio.sleep(0.02)
        finally:
            paused.resume()
    assert len(azure.requests) == 4
    assert _serving(workers, server.port) == {w.pid for w in workers}
    await asyncio.sleep(0.5)  # the first deltas are on their way
    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    responses = await asyncio.gather(*readings)
    for response in responses:
        assert [e.event for e in response.events] == ["delta", "error"]
        assert response.last.data["error"]["code"] == "shutting_down"
    assert time.monotonic() - signalled < 4
    assert await _exit_code(server) == 0
    assert not _wait_gone(workers, within=0)
    assert await azure.await_disconnect(len(responses), within=2)


def test_a_worker_that_dies_is_replaced(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(STREAMSVC_WORKERS="2")
    first = _workers(server)
    first[0].kill()
    replaced = f"worker {first[0].pid} was killed by SIGKILL; started"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the parent logs just after it started the new one
        now = _workers(server)
        if len(now) == 2 and first[0] not in now and replaced in server.log():
            break
        time.sleep(0.1)
    assert len(now) == 2 and first[1] in now and first[0] not in now
    assert replaced in server.log()
    for _ in range(4):
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.stop() == 0
    assert not _wait_gone(now, within=0)


def test_workers_that_keep_dying_stop_the_server(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(STREAMSVC_WORKERS="2")
    deadline = time.monotonic() + 30
    while server.process.poll() is None and time.monotonic() < deadline:
        for worker in _workers(server):
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        time.sleep(0.2)
    assert server.process.wait(10) == 1
    assert "too many restarts, stopping" in server.log()


def test_killing_the_parent_leaves_no_worker(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(STREAMSVC_WORKERS="2")
    workers = _workers(server)
    assert len(workers) == 2
    server.signal(signal.SIGKILL)
    server.process.wait(10)
    assert not _wait_gone(workers, within=15)
