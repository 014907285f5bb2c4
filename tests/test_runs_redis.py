"""Real servers sharing one Redis run store (issue 16): any node serves any run.

Two server processes on ``STREAMSVC_RUN_STORE=redis://...?prefix=<this test's>``: a chat
stream started on node A and cut is resumed on node B with ``Last-Event-ID`` (no gap, no
duplicate; B's reader keeps A from abandoning it), and B reports the run A executed. A wrong
Redis stops start-up naming the setting.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import anyio
import httpx
import pytest
import redis

from tests.fake_azure import FakeAzure, Reply
from tests.harness import ServerProcess, read_sse, run_events, server_env

pytestmark = pytest.mark.redis

CHAT = {"messages": [{"role": "user", "content": "count"}], "stream": True}


@pytest.fixture
def shared_store(redis_url: str) -> Iterator[str]:
    """``STREAMSVC_RUN_STORE`` for this test: the tests' Redis, keys under a prefix of its own."""
    prefix = f"streamsvc-test:{uuid.uuid4().hex[:12]}:"
    yield f"{redis_url}?prefix={prefix}"
    with redis.Redis.from_url(redis_url) as r:
        keys = list(r.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            r.delete(*keys)


async def test_a_stream_started_on_one_node_resumes_on_another(
    azure: FakeAzure,
    start_server: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
    shared_store: str,
) -> None:
    # Three times the test servers' 1 s grace: node A keeps the run while B's reader follows.
    words = [f"w{i} " for i in range(30)]
    azure.push(Reply(text_chunks=words, chunk_delay=0.1))
    node_a = start_server(STREAMSVC_RUN_STORE=shared_store)
    node_b = start_server(STREAMSVC_RUN_STORE=shared_store)

    cut = await read_sse(client, node_a.url + "/chat", CHAT, stop_after=4)  # then hangs up
    assert cut.status == 200, cut.body
    run_id = cut.headers["x-run-id"]
    assert [e.id for e in cut.events] == ["1", "2", "3", "4"]

    rest = await run_events(client, f"{node_b.url}/runs/{run_id}/events", cut.events[-1].id)
    ids = [int(e.id or 0) for e in cut.events + rest]
    assert ids == list(range(1, len(ids) + 1)), ids
    assert [e.event for e in rest][-1] == "done" and len(ids) == len(words) + 1, rest[-1].data
    streamed = "".join(e.data["content"] for e in cut.events + rest if e.event == "delta")
    assert streamed == "".join(words) == rest[-1].data["content"]

    health = (await client.get(f"{node_b.url}/health")).json()
    assert health["components"]["runs"]["state"] == "ready", health
    assert health["components"]["runs"]["store"] == "redis"
    # Chat needs no executor; connector runs would wait for one: only the queue says so.
    assert health["components"]["queue"]["reason"].startswith("no executor seen"), health
    record = (await client.get(f"{node_b.url}/runs/{run_id}")).json()
    assert record["status"] == "completed" and record["last_event_id"] == len(ids), record
    assert record["result"]["content"] == "".join(words)
    whole = await run_events(client, f"{node_a.url}/runs/{run_id}/events", None)
    assert [(e.id, e.event, e.data) for e in whole] == [
        (e.id, e.event, e.data) for e in cut.events + rest
    ]


def test_an_unreachable_redis_stops_start_up_naming_the_setting(fake_azure: FakeAzure) -> None:
    env = server_env(fake_azure, STREAMSVC_RUN_STORE="redis://:s3cret-pass@127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match="server exited") as failed:
        ServerProcess(env)
    message = str(failed.value)
    assert "STREAMSVC_RUN_STORE=redis://:***@127.0.0.1:1/0" in message, message
    assert "s3cret-pass" not in message and "Traceback" not in message, message


async def test_a_cancel_through_another_node_stops_the_run_within_a_second(
    azure: FakeAzure,
    start_server: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
    shared_store: str,
) -> None:
    azure.push(Reply(text_chunks=[f"w{i} " for i in range(100)], chunk_delay=0.1))
    node_a = start_server(STREAMSVC_RUN_STORE=shared_store)
    node_b = start_server(STREAMSVC_RUN_STORE=shared_store)
    started = await client.post(node_a.url + "/chat", json=CHAT | {"background": True})
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    for _ in range(100):  # until it streams
        if (await client.get(f"{node_b.url}/runs/{run_id}")).json()["last_event_id"] >= 2:
            break
        await anyio.sleep(0.05)

    sent = time.monotonic()
    cancelled = await client.post(f"{node_b.url}/runs/{run_id}/cancel")
    took = time.monotonic() - sent
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and took < 1.0, (cancelled.json(), took)
    assert await azure.await_disconnect(within=5)  # node A closed its upstream call
    events = await run_events(client, f"{node_b.url}/runs/{run_id}/events", None)
    assert events[-1].event == "error" and events[-1].data["error"]["code"] == "cancelled"
