"""Azure OpenAI behaviours, end to end: real server process, real SDK, fake upstream.

The session server runs with a 3 s first-token timeout, a 2 s idle timeout and
a 3 s total retry wait (see ``harness.server_env``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.fake_azure import (
    FakeAzure,
    Reply,
    content_filter_error,
    rate_limited,
    server_error,
    unauthorized,
)
from tests.harness import AZURE_KEY, ServerProcess, free_port, read_sse

USER = [{"role": "user", "content": "Hello"}]
STREAM = {"messages": USER, "stream": True}
PLAIN = {"messages": USER}


def _filters() -> dict[str, Any]:
    return {c: {"filtered": False, "severity": "safe"} for c in ("hate", "sexual", "violence")}


def _azure_stream_by_hand() -> list[dict[str, Any]]:
    """Azure's odd chunks, spelled out: each must be tolerated."""
    base = {"id": "chatcmpl-abc", "created": 1, "model": "gpt-4o-2024-11-20"}
    base |= {"object": "chat.completion.chunk"}
    choice = {"index": 0, "finish_reason": None, "logprobs": None}
    return [
        # prompt filter results, no choices, empty id and model
        {"choices": [], "created": 0, "id": "", "model": "", "object": "",
         "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _filters()}]},
        {**base, "choices": [{**choice, "delta": {"role": "assistant", "content": ""}}]},
        {**base, "choices": [{**choice, "delta": {"content": "Hi"}}]},
        # an annotation: a choice with no delta at all
        {**base, "choices": [{"index": 0, "finish_reason": None,
                              "content_filter_results": _filters(),
                              "content_filter_offsets": {"check_offset": 0, "start_offset": 0,
                                                         "end_offset": 2}}]},
        {**base, "choices": [{**choice, "delta": {"content": " there"}}]},
        {**base, "choices": [{**choice, "delta": None}]},
        {**base, "choices": [{**choice, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [{"index": 0, "finish_reason": None,
                              "content_filter_results": _filters()}]},
        # usage: empty choices, just before [DONE]
        {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                          "total_tokens": 7}},
    ]  # fmt: skip


async def test_azure_chunk_shapes_do_not_break_the_stream(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(raw_chunks=_azure_stream_by_hand()), Reply(raw_chunks=_azure_stream_by_hand()))
    response = await read_sse(client, server.url + "/chat", STREAM)
    assert [e.event for e in response.events] == ["delta", "delta", "done"]
    assert [e.data["content"] for e in response.named("delta")] == ["Hi", " there"]
    expected = {
        "id": "chatcmpl-abc",
        "model": "gpt-4o-2024-11-20",
        "content": "Hi there",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    assert response.last.data == expected | {"run_id": response.headers["x-run-id"]}
    plain = await client.post(server.url + "/chat", json=PLAIN)
    assert plain.json() == expected | {"run_id": plain.headers["x-run-id"]}


async def test_the_fakes_default_azure_stream_has_those_shapes_too(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["a", "b"]))
    response = await read_sse(client, server.url + "/chat", STREAM)
    assert [e.event for e in response.events] == ["delta", "delta", "done"]
    assert response.last.data["usage"]["total_tokens"] == 3


async def test_content_filter_mid_stream_ends_cleanly(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["Some", " text"], finish_reason="content_filter"))
    azure.push(Reply(text_chunks=["Some", " text"], finish_reason="content_filter"))
    response = await read_sse(client, server.url + "/chat", STREAM)
    assert response.status == 200
    assert [e.event for e in response.events] == ["delta", "delta", "done"]
    assert response.last.data["finish_reason"] == "content_filter"
    assert response.last.data["content"] == "Some text"
    plain = await client.post(server.url + "/chat", json=PLAIN)
    assert plain.status_code == 200
    assert plain.json()["finish_reason"] == "content_filter"


@pytest.mark.parametrize("mode", ["stream", "json"])
async def test_prompt_blocked_by_content_filter_is_400_with_the_categories(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient, mode: str
) -> None:
    azure.push(content_filter_error())
    response = await read_sse(
        client, server.url + "/chat", {"messages": USER, "stream": mode == "stream"}
    )
    assert response.status == 400  # a real status: the stream never started
    assert response.events == []
    error = response.body["error"]
    assert error["code"] == "content_filter"
    categories = error["details"]["content_filter_result"]
    assert categories["hate"] == {"filtered": True, "severity": "high"}
    assert categories["violence"] == {"filtered": False, "severity": "safe"}
    assert categories["jailbreak"] == {"filtered": False, "detected": False}
    assert len(azure.requests) == 1  # not retried


async def test_429_is_retried_honouring_retry_after_ms_first(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    # retry-after says 5 s; retry-after-ms says 0.3 s and wins.
    azure.push(rate_limited(retry_after_ms=300, retry_after=5))
    azure.push(rate_limited(retry_after_ms=300, retry_after=5))
    started = time.monotonic()
    response = await read_sse(client, server.url + "/chat", STREAM)
    elapsed = time.monotonic() - started
    assert response.status == 200
    assert response.last.data["content"] == "echo: Hello"
    assert len(azure.requests) == 3
    assert 0.6 <= elapsed < 2.5


async def test_429_is_retried_honouring_retry_after_seconds(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(rate_limited(retry_after_ms=None, retry_after=1))
    started = time.monotonic()
    response = await client.post(server.url + "/chat", json=PLAIN)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert len(azure.requests) == 2
    assert 1.0 <= elapsed < 2.8


@pytest.mark.parametrize("mode", ["stream", "json"])
async def test_429_past_the_retry_budget_is_our_429_with_retry_after(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient, mode: str
) -> None:
    # Budget 3 s: one wait of 2 s fits, a second one would not.
    azure.push(*[rate_limited(retry_after_ms=None, retry_after=2)] * 5)
    started = time.monotonic()
    response = await read_sse(
        client, server.url + "/chat", {"messages": USER, "stream": mode == "stream"}
    )
    elapsed = time.monotonic() - started
    assert response.status == 429
    assert response.body["error"]["code"] == "upstream_rate_limited"
    assert response.headers["retry-after"] == "2"
    assert len(azure.requests) == 2
    assert 2.0 <= elapsed < 3.5


async def test_429_without_retry_headers_backs_off_and_still_says_retry_after(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(*[rate_limited(retry_after_ms=None, retry_after=None)] * 6)
    started = time.monotonic()
    response = await client.post(server.url + "/chat", json=PLAIN)
    elapsed = time.monotonic() - started
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    # Backoff 0.5 s then 1 s (1.5 s in all); the next 2 s would pass the 3 s budget.
    assert len(azure.requests) == 3
    assert 1.5 <= elapsed < 3.5


async def test_5xx_is_retried(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(server_error(500), server_error(503))
    response = await read_sse(client, server.url + "/chat", STREAM)
    assert response.status == 200
    assert response.last.event == "done"
    assert len(azure.requests) == 3


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("mode", ["stream", "json"])
async def test_upstream_auth_failure_is_502_upstream_auth(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient, status: int, mode: str
) -> None:
    reply = unauthorized()
    reply.status = status
    azure.push(reply)
    response = await client.post(
        server.url + "/chat", json={"messages": USER, "stream": mode == "stream"}
    )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_auth"
    assert AZURE_KEY not in response.text
    assert len(azure.requests) == 1  # not retried
    assert azure.requests[0].headers["api-key"] == AZURE_KEY
    assert AZURE_KEY not in server.log()


async def test_a_rejected_key_never_reaches_an_answer_or_the_debug_log(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    secret = "wrong-azure-key-5ecret-5ecret"
    server = start_server(AZURE_OPENAI_API_KEY=secret, STREAMSVC_LOG_LEVEL="debug")
    answers = [
        await client.post(server.url + "/chat", json=PLAIN),
        await client.post(server.url + "/chat", json=STREAM),
        await client.get(server.url + "/health"),
    ]
    assert [a.status_code for a in answers] == [502, 502, 200]
    assert azure.requests[0].headers["api-key"] == secret  # the fake refused it
    for answer in answers:
        assert secret not in answer.text
    log = server.log()
    assert "DEBUG" in log  # the log really is verbose
    assert secret not in log


@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
@pytest.mark.parametrize("mode", ["stream", "json"])
async def test_an_unreachable_upstream_is_502(
    start_server: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
    mode: str,
    http_client: str,
) -> None:
    server = start_server(
        AZURE_OPENAI_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        STREAMSVC_CHAT_HTTP_CLIENT=http_client,
    )
    response = await client.post(
        server.url + "/chat", json={"messages": USER, "stream": mode == "stream"}
    )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


@pytest.mark.parametrize(
    "reply",
    [Reply(first_byte_delay=10), Reply(text_chunks=["late"], chunk_delay=10)],
    ids=["no-headers", "headers-but-no-token"],
)
@pytest.mark.parametrize("mode", ["stream", "json"])
async def test_no_first_token_in_time_is_504_before_headers(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient, reply: Reply, mode: str
) -> None:
    azure.push(reply)
    started = time.monotonic()
    response = await read_sse(
        client, server.url + "/chat", {"messages": USER, "stream": mode == "stream"}
    )
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert response.body["error"]["code"] == "upstream_timeout"
    assert 2.9 <= elapsed < 6
    assert await azure.await_disconnect(within=2)  # and we hung up on the upstream


async def test_silence_mid_stream_past_the_idle_timeout_ends_with_an_error_event(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["one", "two", "three"], hang_after=1))
    response = await read_sse(client, server.url + "/chat", STREAM)
    assert response.status == 200
    assert [e.event for e in response.events] == ["delta", "error"]
    error = response.last
    assert error.data["error"]["code"] == "upstream_timeout"
    assert 1.8 <= error.at - response.events[0].at < 5
    assert await azure.await_disconnect(within=2)


async def test_an_upstream_drop_ends_that_stream_with_an_error_and_spares_the_others(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=[f"w{i} " for i in range(8)], chunk_delay=0.2))
    healthy = asyncio.create_task(read_sse(client, server.url + "/chat", STREAM))
    for _ in range(500):  # until the healthy stream took its reply
        if azure.requests:
            break
        await asyncio.sleep(0.02)
    azure.push(Reply(text_chunks=["a", "b", "c"], drop_after=2))
    dropped = await read_sse(client, server.url + "/chat", STREAM)
    assert dropped.status == 200
    assert [e.event for e in dropped.events] == ["delta", "delta", "error"]
    assert dropped.last.data["error"]["code"] == "upstream_error"
    assert not healthy.done()  # it was still streaming while the other one broke
    intact = await healthy
    assert [e.event for e in intact.events] == ["delta"] * 8 + ["done"]
    assert intact.last.data["content"] == "".join(f"w{i} " for i in range(8))


async def test_the_httpx_client_streams_and_reports_a_drop_like_aiohttp(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_CHAT_HTTP_CLIENT="httpx")
    azure.push(Reply(text_chunks=["one ", "two"]))
    whole = await read_sse(client, server.url + "/chat", STREAM)
    assert [e.event for e in whole.events] == ["delta", "delta", "done"]
    assert whole.last.data["content"] == "one two"
    azure.push(Reply(text_chunks=["a", "b", "c"], drop_after=2))
    dropped = await read_sse(client, server.url + "/chat", STREAM)
    assert [e.event for e in dropped.events] == ["delta", "delta", "error"]
    assert dropped.last.data["error"]["code"] == "upstream_error"
