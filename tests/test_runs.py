"""Runs that outlive the connection, against a real server (and real Docker for connectors).

Streams cut from the client side and by a dropped proxy resume with ``Last-Event-ID``; background
runs, cancel, abandonment after the grace, SIGKILL and restart, keys and read tokens, retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.fake_azure import FakeAzure, Reply
from tests.harness import (
    ServerProcess,
    body,
    docker,
    eventually,
    owner,
    sandboxes,
    sse_blocks,
)

LINES = 200
#: Prints 1..200, one line at a time, slowly enough to be cut in the middle.
NUMBERED = f"""
    import json, time
    for i in range(1, {LINES + 1}):
        print(i, flush=True)
        time.sleep(0.01)
    print(json.dumps({{"ok": True, "result": {{"lines": {LINES}}}}}))
"""
SLEEPER = """
    import time
    print("started", flush=True)
    time.sleep(60)
"""
EXPECTED = (
    "".join(f"{i}\n" for i in range(1, LINES + 1)) + '{"ok": true, "result": {"lines": 200}}\n'
)


class Frame:
    def __init__(self, event_id: str | None, name: str, data: Any) -> None:
        self.id = event_id
        self.name = name
        self.data = data


async def frames(response: httpx.Response) -> AsyncIterator[Frame]:
    async for fields, _ in sse_blocks(response):
        if "data" in fields:
            yield Frame(
                fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
            )


async def read(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    stop: Callable[[list[Frame]], bool] = lambda got: False,
    **kwargs: Any,
) -> tuple[httpx.Response, list[Frame]]:
    """Frames until ``stop(frames)`` holds (then the connection is closed) or the stream ends."""
    got: list[Frame] = []
    async with client.stream(method, url, **kwargs) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            async for frame in frames(response):
                got.append(frame)
                if stop(got):
                    break
        else:
            await response.aread()
    return response, got


def text_of(got: list[Frame]) -> str:
    return "".join(f.data["text"] for f in got if f.name == "stdout")


def cut_midway(got: list[Frame]) -> bool:
    return text_of(got).count("\n") >= 60


def assert_resumed(first: list[Frame], rest: list[Frame], expected_text: str) -> None:
    """Exactly the rest: ids continue without a gap or a duplicate, ending with ``done``."""
    ids = [int(f.id or 0) for f in first + rest]
    assert ids == list(range(1, len(ids) + 1)), ids
    assert rest[-1].name == "done"
    assert text_of(first) + text_of(rest) == expected_text


class DroppingProxy:
    """A TCP proxy to the server whose connections the test drops at will (a proxy cut)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> DroppingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.drop()
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def drop(self) -> None:
        for writer in self.writers:
            writer.transport.abort()  # both ways at once, like a proxy that went away
        self.writers.clear()


async def poll(check: Callable[[], Awaitable[bool]], limit: float) -> None:
    """Until ``check()`` holds (every 0.1 s); fails after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, f"not true after {limit} s"
        await anyio.sleep(0.1)


async def resume(
    client: httpx.AsyncClient, server: ServerProcess, run_id: str, last: str
) -> list[Frame]:
    response, rest = await read(
        client, "GET", f"{server.url}/runs/{run_id}/events", headers={"last-event-id": last}
    )
    assert response.status_code == 200
    return rest


# ---- connectors ---------------------------------------------------------------------------


@pytest.mark.docker
async def test_a_connector_stream_cut_by_the_client_resumes_exactly(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    url = server.url + "/execute-connector"
    response, first = await read(
        client, "POST", url, json=body(NUMBERED) | {"stream": True}, stop=cut_midway
    )
    run_id = response.headers["x-run-id"]
    rest = await resume(client, server, run_id, first[-1].id or "")
    assert_resumed(first, rest, EXPECTED)
    assert rest[-1].data["run_id"] == run_id
    record = (await client.get(f"{server.url}/runs/{run_id}")).json()
    assert record["status"] == "completed" and record["kind"] == "connector"
    assert record["result"] == rest[-1].data and record["error"] is None
    assert record["last_event_id"] == int(rest[-1].id or 0)
    # A second reader of the finished run gets the whole log, the same sequence.
    _, again = await read(client, "GET", f"{server.url}/runs/{run_id}/events?after=0")
    assert [(f.id, f.name, f.data) for f in again] == [(f.id, f.name, f.data) for f in first + rest]


@pytest.mark.docker
async def test_a_connector_stream_dropped_by_a_proxy_resumes_exactly(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    async with DroppingProxy(server.port) as proxy:
        first: list[Frame] = []
        run_id = ""
        with pytest.raises(httpx.HTTPError):
            async with client.stream(
                "POST",
                f"http://127.0.0.1:{proxy.port}/execute-connector",
                json=body(NUMBERED) | {"stream": True},
            ) as response:
                run_id = response.headers["x-run-id"]
                async for frame in frames(response):
                    first.append(frame)
                    if cut_midway(first):
                        proxy.drop()
    rest = await resume(client, server, run_id, first[-1].id or "")
    assert_resumed(first, rest, EXPECTED)
    assert (await client.get(f"{server.url}/runs/{run_id}")).json()["status"] == "completed"


@pytest.mark.docker
async def test_a_background_run_is_polled_to_completion(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    answer = await client.post(
        server.url + "/execute-connector", json=body(NUMBERED) | {"background": True}
    )
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert set(accepted) == {"id", "status", "url", "events_url"}
    assert answer.headers["location"] == accepted["url"] == f"/runs/{accepted['id']}"
    assert answer.headers["x-run-id"] == accepted["id"]
    deadline = time.monotonic() + 60
    while True:
        record = (await client.get(server.url + accepted["url"])).json()
        if record["status"] in {"completed", "failed"} or time.monotonic() > deadline:
            break
        await anyio.sleep(0.2)
    assert record["status"] == "completed", record
    assert record["result"]["result"] == {"lines": LINES} and record["result"]["run_id"]
    _, events = await read(client, "GET", server.url + accepted["events_url"])
    assert text_of(events) == EXPECTED and events[-1].name == "done"


@pytest.mark.docker
async def test_cancel_removes_the_container_at_once_and_is_idempotent(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    accepted = (
        await client.post(
            server.url + "/execute-connector", json=body(SLEEPER) | {"background": True}
        )
    ).json()
    url = server.url + accepted["url"]

    async def printed() -> bool:
        return int((await client.get(url)).json()["last_event_id"]) >= 3

    await poll(printed, 30)
    assert sandboxes(server)
    started = time.monotonic()
    cancelled = await client.post(url + "/cancel")
    took = time.monotonic() - started
    assert cancelled.status_code == 200
    record = cancelled.json()
    assert record["status"] == "cancelled" and record["error"]["code"] == "cancelled"
    assert took < 10
    await eventually(lambda: not sandboxes(server), 5)
    again = await client.post(url + "/cancel")
    assert again.status_code == 200 and again.json()["finished_at"] == record["finished_at"]
    _, events = await read(client, "GET", url + "/events")
    assert events[-1].name == "error" and events[-1].data["error"]["code"] == "cancelled"
    assert (await client.delete(url)).status_code == 204
    assert (await client.get(url)).status_code == 404


@pytest.mark.docker
async def test_cancel_reaches_a_run_of_another_worker_process(
    start_server: Callable[..., ServerProcess],
) -> None:
    # Two workers on one SQLite store. Each request comes on a new connection, so the
    # kernel spreads them over both workers: the cancels of six runs all land on the
    # worker not running the run with odds of 63 in 64 (then the store carries them).
    own = start_server(STREAMSVC_WORKERS="2")
    for _ in range(6):
        async with httpx.AsyncClient(timeout=60) as fresh:
            payload = body(SLEEPER) | {"background": True}
            url = (
                own.url
                + (await fresh.post(own.url + "/execute-connector", json=payload)).json()["url"]
            )
        async with httpx.AsyncClient(timeout=60) as fresh:

            async def printed(fresh: httpx.AsyncClient = fresh, url: str = url) -> bool:
                return int((await fresh.get(url)).json()["last_event_id"]) >= 3

            await poll(printed, 30)
        async with httpx.AsyncClient(timeout=60) as fresh:
            started = time.monotonic()
            cancelled = await fresh.post(url + "/cancel")
            took = time.monotonic() - started
        assert cancelled.status_code == 200, cancelled.text
        record = cancelled.json()
        assert record["status"] == "cancelled", record
        assert took < 5
    await eventually(lambda: not sandboxes(own), 10)


@pytest.mark.docker
async def test_an_abandoned_stream_is_cancelled_after_the_grace(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_RUN_GRACE_CONNECTOR_SECONDS="1.5")
    response, _ = await read(
        client,
        "POST",
        server.url + "/execute-connector",
        json=body(SLEEPER) | {"stream": True},
        stop=lambda got: "started" in text_of(got),
    )
    run_id = response.headers["x-run-id"]
    left = time.monotonic()
    await anyio.sleep(0.7)  # within the grace: still running, container there
    record = (await client.get(f"{server.url}/runs/{run_id}")).json()
    assert record["status"] == "running" and sandboxes(server)
    await eventually(lambda: not sandboxes(server), 10)
    assert time.monotonic() - left >= 1.4
    record = (await client.get(f"{server.url}/runs/{run_id}")).json()
    assert record["status"] == "cancelled" and "abandoned" in record["error"]["message"]


@pytest.mark.docker
async def test_a_reader_coming_back_within_the_grace_keeps_the_run(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_RUN_GRACE_CONNECTOR_SECONDS="2")
    url = server.url + "/execute-connector"
    response, first = await read(
        client, "POST", url, json=body(NUMBERED) | {"stream": True}, stop=cut_midway
    )
    await anyio.sleep(0.5)
    rest = await resume(client, server, response.headers["x-run-id"], first[-1].id or "")
    assert_resumed(first, rest, EXPECTED)


@pytest.mark.docker
async def test_sigkill_mid_run_then_restart_interrupts_it(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient, tmp_path: Path
) -> None:
    store = {"STREAMSVC_RUN_STORE": f"sqlite:///{tmp_path}/runs.db"}
    server = start_server(**store)
    response, _ = await read(
        client,
        "POST",
        server.url + "/execute-connector",
        json=body(SLEEPER) | {"stream": True, "background": True},
    )
    run_id = response.json()["id"]
    url = f"/runs/{run_id}"

    async def printed() -> bool:
        return int((await client.get(server.url + url)).json()["last_event_id"]) >= 3

    await poll(printed, 30)

    def committed() -> bool:  # the file itself holds the line (the writer commits behind)
        with contextlib.closing(sqlite3.connect(tmp_path / "runs.db")) as db:
            query = "SELECT COUNT(*) FROM chunks WHERE run_id = ? AND instr(events, ?) > 0"
            (found,) = db.execute(query, (run_id, b"started")).fetchone()
        return bool(found)

    await eventually(committed, 10)
    dead = owner(server)
    assert sandboxes(server)
    server.signal(signal.SIGKILL)
    server.process.wait(10)
    again = start_server(**store)
    record = (await client.get(again.url + url)).json()
    assert record["status"] == "interrupted", record
    assert record["error"]["code"] == "interrupted"
    _, events = await read(client, "GET", again.url + url + "/events")
    assert "started\n" in text_of(events)
    assert events[-1].name == "error" and events[-1].data["error"]["code"] == "interrupted"
    assert [int(f.id or 0) for f in events] == list(range(1, len(events) + 1))
    # The new server's start-up sweep removed the dead one's container.
    label = f"label=streamsvc.owner={dead}"
    await eventually(lambda: not docker("ps", "-aq", "--filter", label).split(), 15)


@pytest.mark.docker
async def test_twenty_concurrent_runs_store_every_event_once_in_order(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    """4 at once and 16 queued (the default limits): every run's log complete and ordered."""
    code = """
        for i in range(1, 51):
            print(f"{RUN}-{i}", flush=True)
        print('{"ok": true}')
    """

    async def start(index: int) -> str:
        payload = body(code.replace("{RUN}", str(index))) | {"background": True}
        answer = await client.post(server.url + "/execute-connector", json=payload)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    ids: dict[int, str] = {}

    async def one(index: int) -> None:
        ids[index] = await start(index)

    async with anyio.create_task_group() as tasks:
        for index in range(20):
            tasks.start_soon(one, index)

    async def all_finished() -> bool:
        records = [(await client.get(f"{server.url}/runs/{i}")).json() for i in ids.values()]
        return all(r["status"] in {"completed", "failed"} for r in records)

    await poll(all_finished, 120)
    for index, run_id in ids.items():
        record = (await client.get(f"{server.url}/runs/{run_id}")).json()
        assert record["status"] == "completed", record
        _, events = await read(client, "GET", f"{server.url}/runs/{run_id}/events")
        assert [int(f.id or 0) for f in events] == list(range(1, len(events) + 1))
        lines = "".join(f"{index}-{i}\n" for i in range(1, 51)) + '{"ok": true}\n'
        assert text_of(events) == lines


# ---- chat ---------------------------------------------------------------------------------


async def test_a_chat_stream_cut_mid_way_resumes_exactly(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    words = [f" w{i}" for i in range(60)]
    azure.push(Reply(text_chunks=words, chunk_delay=0.02))
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    response, first = await read(
        client, "POST", server.url + "/chat", json=chat, stop=lambda got: len(got) >= 20
    )
    run_id = response.headers["x-run-id"]
    rest = await resume(client, server, run_id, first[-1].id or "")
    ids = [int(f.id or 0) for f in first + rest]
    assert ids == list(range(1, len(ids) + 1))
    content = "".join(f.data["content"] for f in first + rest if f.name == "delta")
    assert content == "".join(words) == rest[-1].data["content"]
    assert rest[-1].data["run_id"] == run_id
    record = (await client.get(f"{server.url}/runs/{run_id}")).json()
    assert record["status"] == "completed" and record["result"] == rest[-1].data


async def test_json_answers_and_early_failures_carry_the_run_id(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    chat = {"messages": [{"role": "user", "content": "hello there"}]}
    answer = await client.post(server.url + "/chat", json=chat)
    assert answer.status_code == 200
    assert answer.json()["run_id"] == answer.headers["x-run-id"]
    azure.push(Reply(status=401, error={"error": {"code": "401", "message": "bad key"}}))
    refused = await client.post(server.url + "/chat", json=chat)
    assert refused.status_code == 502 and refused.json()["error"]["code"] == "upstream_auth"
    record = (await client.get(f"{server.url}/runs/{refused.headers['x-run-id']}")).json()
    assert record["status"] == "failed" and record["error"]["code"] == "upstream_auth"
    invalid = await client.post(server.url + "/chat", json={"messages": []})
    assert invalid.status_code == 422 and "x-run-id" not in invalid.headers  # no run at all


async def test_concurrent_chats_store_every_event_once_in_order(
    server: ServerProcess, azure: FakeAzure
) -> None:
    count = 200
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        ids: list[str] = []

        async def one(index: int) -> None:
            chat = {"messages": [{"role": "user", "content": f"n{index} a b c"}], "stream": True}
            response, got = await read(client, "POST", server.url + "/chat", json=chat)
            assert got[-1].name == "done", [f.name for f in got]
            ids.append(response.headers["x-run-id"])

        async with anyio.create_task_group() as tasks:
            for index in range(count):
                tasks.start_soon(one, index)
        assert len(set(ids)) == count
        for run_id in ids:
            _, stored = await read(client, "GET", f"{server.url}/runs/{run_id}/events")
            assert [int(f.id or 0) for f in stored] == list(range(1, len(stored) + 1))
            content = "".join(f.data["content"] for f in stored if f.name == "delta")
            assert content == stored[-1].data["content"] and content.startswith("echo: n")


# ---- keys, tokens, retention --------------------------------------------------------------


async def test_keys_see_only_their_runs_and_a_token_opens_one_run(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_API_KEYS="key-alice-0123456789,key-bob-0123456789")
    alice = {"authorization": "Bearer key-alice-0123456789"}
    bob = {"x-api-key": "key-bob-0123456789"}
    chat = {"messages": [{"role": "user", "content": "hi"}], "background": True}
    mine = (await client.post(server.url + "/chat", json=chat, headers=alice)).json()
    other = (await client.post(server.url + "/chat", json=chat, headers=bob)).json()
    assert len(mine["id"]) >= 20  # unguessable
    await anyio.sleep(0.5)
    url = server.url + mine["url"]
    assert (await client.get(url, headers=alice)).status_code == 200
    assert (await client.get(url, headers=bob)).status_code == 404
    assert (await client.get(url)).status_code == 401
    assert (await client.post(url + "/cancel", headers=bob)).status_code == 404
    assert (await client.delete(url, headers=bob)).status_code == 404
    assert (await client.get(url + "/events", headers=bob)).status_code == 404
    listed = (await client.get(server.url + "/runs", headers=alice)).json()["runs"]
    assert [r["id"] for r in listed] == [mine["id"]]
    # The read token: this run's events without a key, nothing else.
    response, events = await read(client, "GET", server.url + mine["events_url"])
    assert response.status_code == 200 and events[-1].name == "done"
    token = mine["events_url"].partition("?token=")[2]
    assert (await client.get(f"{server.url}{other['url']}/events?token={token}")).status_code == 404
    assert (await client.get(f"{url}?token={token}")).status_code == 401
    assert (await client.post(f"{url}/cancel?token={token}")).status_code == 401


async def test_retention_expires_events_then_records(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_RUN_RETENTION_SECONDS="1")
    answer = await client.post(
        server.url + "/chat", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    url = f"{server.url}/runs/{answer.headers['x-run-id']}"
    assert (await client.get(url + "/events")).status_code == 200

    async def expired() -> bool:
        return (await client.get(url + "/events")).status_code != 200

    await poll(expired, 10)
    gone = await client.get(url + "/events")
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "events_expired"
    assert (await client.get(url)).json()["status"] == "completed"  # the record is still there

    async def dropped() -> bool:
        return (await client.get(url)).status_code == 404

    await poll(dropped, 10)


async def test_listing_pages_and_refusals(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server()
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    made = [
        (await client.post(server.url + "/chat", json=chat)).headers["x-run-id"] for _ in range(5)
    ]
    first = (await client.get(server.url + "/runs?limit=2&kind=chat")).json()
    assert [r["id"] for r in first["runs"]] == made[::-1][:2]
    assert "result" not in first["runs"][0] and first["runs"][0]["status"] == "completed"
    second = (await client.get(server.url + first["next"])).json()
    assert [r["id"] for r in second["runs"]] == made[::-1][2:4]
    assert (await client.get(server.url + "/runs?kind=connector")).json()["runs"] == []
    for query in ("limit=0", "limit=201", "kind=shell", "status=done", "surprise=1"):
        refused = await client.get(f"{server.url}/runs?{query}")
        assert refused.status_code == 422, query
        assert refused.json()["error"]["code"] == "validation_error"
    assert (await client.get(server.url + "/runs/nope")).status_code == 404
    assert (await client.get(server.url + "/runs/nope/events")).status_code == 404
    bad = await client.get(f"{server.url}/runs/{made[0]}/events", headers={"last-event-id": "x"})
    assert bad.status_code == 422
    azure.push(Reply(text_chunks=["slow"] * 20, chunk_delay=0.2))
    running = await client.post(server.url + "/chat", json=chat | {"background": True})
    url = server.url + running.json()["url"]
    deleting = await client.delete(url)
    assert deleting.status_code == 409 and deleting.json()["error"]["code"] == "run_not_finished"
    assert (await client.post(url + "/cancel")).json()["status"] == "cancelled"
    assert (await client.delete(url)).status_code == 204


async def test_a_graceful_stop_interrupts_running_runs_and_keeps_them(
    start_server: Callable[..., ServerProcess],
    azure: FakeAzure,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    store = {"STREAMSVC_RUN_STORE": f"sqlite:///{tmp_path}/runs.db"}
    server = start_server(**store)
    azure.push(Reply(text_chunks=["tick"] * 100, chunk_delay=0.1))
    chat = {"messages": [{"role": "user", "content": "hi"}], "background": True}
    url = (await client.post(server.url + "/chat", json=chat)).json()["url"]

    async def ticking() -> bool:
        return int((await client.get(server.url + url)).json()["last_event_id"]) >= 3

    await poll(ticking, 10)
    assert server.stop() == 0
    again = start_server(**store)
    record = (await client.get(again.url + url)).json()
    assert record["status"] == "interrupted" and record["error"]["code"] == "interrupted"
    _, events = await read(client, "GET", again.url + url + "/events")
    assert [int(f.id or 0) for f in events] == list(range(1, len(events) + 1))
    assert events[0].data == {"content": "tick"} and events[-1].name == "error"
    assert record["last_event_id"] == len(events)


def stored_bytes(state: Path) -> bytes:
    """Every byte of the SQLite store's files (the database, its WAL)."""
    return b"".join(p.read_bytes() for p in state.iterdir() if p.name.startswith("runs.db"))


@pytest.mark.docker
async def test_secrets_are_never_stored(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient, tmp_path: Path
) -> None:
    secret = "s3cr3t-token-0123456789"
    server = start_server(STREAMSVC_RUN_STORE=f"sqlite:///{tmp_path}/runs.db")
    code = """
        import os
        print("token:", os.environ["API_TOKEN"], flush=True)
        print('{"ok": true}')
    """
    payload = body(code, env={"API_TOKEN": secret}) | {"stream": False}
    answer = await client.post(server.url + "/execute-connector", json=payload)
    assert answer.status_code == 200 and secret not in answer.text
    run_id = answer.headers["x-run-id"]
    _, events = await read(client, "GET", f"{server.url}/runs/{run_id}/events")
    assert "token: " in text_of(events) and secret not in text_of(events)
    server.stop()  # the store flushed and closed: every byte it wrote is in these files
    stored = stored_bytes(tmp_path)
    assert run_id.encode() in stored and b"API_TOKEN" in stored  # the env's name is kept
    assert secret.encode() not in stored


@pytest.mark.docker
async def test_a_reader_in_another_worker_keeps_the_run_past_the_grace(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    grace = 1.5
    server = start_server(
        STREAMSVC_WORKERS="2",
        STREAMSVC_RUN_STORE=f"sqlite:///{tmp_path}/runs.db",
        STREAMSVC_RUN_GRACE_CONNECTOR_SECONDS=str(grace),
    )
    async with httpx.AsyncClient(timeout=60) as first:
        response, got = await read(
            first,
            "POST",
            server.url + "/execute-connector",
            json=body(SLEEPER) | {"stream": True},
            stop=lambda got: "started" in text_of(got),
        )
    run_id, last = response.headers["x-run-id"], got[-1].id or ""
    # One connection (keep-alive: one worker) whose worker runs no sandbox: the other one.
    for _ in range(40):
        other = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=1))
        health = (await other.get(server.url + "/health")).json()
        if health["components"]["sandbox"]["running"] == 0:
            break
        await other.aclose()
    else:
        raise AssertionError("no connection reached the worker not running the run")
    following: list[Frame] = []

    def keep(got: list[Frame]) -> bool:
        following[:] = got
        return False  # read on until cut

    try:
        with anyio.move_on_after(grace * 2 + 1):  # past the grace, then once more
            await read(
                other,
                "GET",
                f"{server.url}/runs/{run_id}/events",
                headers={"Last-Event-ID": last},
                stop=keep,
            )
        assert not [f for f in following if f.name == "error"], [f.data for f in following]
        record = (await other.get(f"{server.url}/runs/{run_id}")).json()
        assert record["status"] == "running", record
        cancelled = await other.post(f"{server.url}/runs/{run_id}/cancel")
        assert cancelled.json()["status"] == "cancelled", cancelled.text
    finally:
        await other.aclose()
