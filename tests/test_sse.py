"""SSE plumbing: wire format and headers in-process; keep-alives and disconnects on a socket.

The framing needs no socket (a tiny app, and the whole app, over ASGI); the timing of keep-alives
and a client hanging up are checked against a real server process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from streamsvc.errors import UpstreamTimeout
from streamsvc.web.sse import Event, StreamRegistry, event_response
from tests.fake_azure import FakeAzure, Reply
from tests.harness import ServerProcess, asgi_client, read_sse, server_env

STREAM = {"messages": [{"role": "user", "content": "Hello"}], "stream": True}


def tiny_app(events: list[Event], failure: Exception | None = None, end: bytes = b"") -> Starlette:
    """One route streaming ``events`` through ``event_response``, then ``failure`` if given."""

    async def source() -> AsyncIterator[Event]:
        for event in events:
            yield event
        if failure is not None:
            raise failure

    async def stream(request: Request) -> Response:
        registry = StreamRegistry()
        return event_response(None, source(), registry, 15.0, send_timeout=5.0, end=end)

    return Starlette(routes=[Route("/", stream)])


async def get(app: Starlette) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/")


async def test_a_stream_that_fails_ends_with_one_error_event_and_nothing_after() -> None:
    app = tiny_app([Event("delta", {"content": "a"})], UpstreamTimeout("the upstream was late"))
    response = await get(app)
    assert response.status_code == 200  # the headers went out with the first frame
    blocks = [b for b in response.text.split("\n\n") if b]
    assert blocks == [
        'id: 1\nevent: delta\ndata: {"content":"a"}',
        'id: 2\nevent: error\ndata: {"error":{"code":"upstream_timeout",'
        '"message":"the upstream was late"}}',
    ]


async def test_an_unexpected_failure_ends_the_stream_with_internal_error() -> None:
    response = await get(tiny_app([], RuntimeError("a bug")))
    blocks = [b for b in response.text.split("\n\n") if b]
    assert blocks == [
        'id: 1\nevent: error\ndata: {"error":{"code":"internal_error","message":"internal error"}}'
    ]  # the bug's text is logged, not sent


async def test_a_stream_that_ends_writes_its_end_once() -> None:
    app = tiny_app([Event("delta", {"n": 1}), Event("delta", {"n": 2})], end=b"data: [DONE]\n\n")
    response = await get(app)
    blocks = [b for b in response.text.split("\n\n") if b]
    assert [b.splitlines()[0] for b in blocks[:2]] == ["id: 1", "id: 2"]
    assert blocks[2:] == ["data: [DONE]"]


async def test_events_are_framed_with_increasing_ids_and_one_json_data_line(
    azure: FakeAzure,
) -> None:
    azure.push(Reply(text_chunks=["a\nb", "c"]))
    async with asgi_client(server_env(azure)) as app:
        response = await app.post("/chat", json=STREAM)
    raw = response.text
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    blocks = [b for b in raw.split("\n\n") if b and not b.startswith(":")]
    assert blocks[0] == 'id: 1\nevent: delta\ndata: {"content":"a\\nb"}'
    assert blocks[1] == 'id: 2\nevent: delta\ndata: {"content":"c"}'
    assert blocks[2].startswith('id: 3\nevent: done\ndata: {"id":"chatcmpl-')
    assert len(blocks) == 3


async def test_keepalive_comments_flow_while_the_upstream_is_silent(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    # Keep-alive every 0.5 s; 1.5 s of upstream silence between the two chunks.
    azure.push(Reply(text_chunks=["slow", " reply"], chunk_delay=1.5))
    response = await read_sse(client, server.url + "/chat", STREAM)
    assert [e.event for e in response.events] == ["delta", "delta", "done"]
    assert response.events[1].at - response.events[0].at > 1.2
    assert len(response.comments) >= 2
    assert all(c.startswith("ping") for c in response.comments)


async def test_a_client_leaving_mid_stream_closes_the_upstream_request_after_the_grace(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    """The run outlives its connection for the grace period (a reader may come back with
    Last-Event-ID), then is cancelled as abandoned and its upstream request closed."""
    server = start_server(STREAMSVC_RUN_GRACE_CHAT_SECONDS="1")
    # 20 chunks 0.3 s apart: the upstream never goes idle, so only the abandonment ends it.
    azure.push(Reply(text_chunks=["tick "] * 20, chunk_delay=0.3))
    response = await read_sse(client, server.url + "/chat", STREAM, stop_after=2)
    left = time.monotonic()
    assert [e.event for e in response.events] == ["delta", "delta"]
    assert not await azure.await_disconnect(within=0.6)  # within the grace: still running
    assert await azure.await_disconnect(within=3)
    assert 0.9 < time.monotonic() - left < 3.5
    assert azure.open_streams == 0


async def test_cancel_closes_the_upstream_request_promptly(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["tick "] * 20, chunk_delay=0.3))
    response = await read_sse(client, server.url + "/chat", STREAM, stop_after=2)
    started = time.monotonic()
    cancel = await client.post(f"{server.url}/runs/{response.headers['x-run-id']}/cancel")
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
    assert await azure.await_disconnect(within=2)
    assert time.monotonic() - started < 2
    assert azure.open_streams == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_a_client_leaving_before_the_first_token_closes_the_upstream_request(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient, stream: bool
) -> None:
    azure.push(Reply(text_chunks=["late"] * 5, chunk_delay=2.5))
    body = {**STREAM, "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        await client.post(server.url + "/chat", json=body, timeout=0.5)
    left = time.monotonic()
    # Well before the server's own 3 s first-token timeout would have closed it.
    assert await azure.await_disconnect(within=2)
    assert time.monotonic() - left < 2
