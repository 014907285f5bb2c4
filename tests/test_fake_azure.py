"""Proves tests/fake_azure.py against the real ``openai`` SDK (nothing patched)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncAzureOpenAI, AzureOpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.fake_azure import (
    FakeAzure,
    Reply,
    content_filter_error,
    rate_limited,
    server_error,
    unauthorized,
)

KEY = "test-key"
API_VERSION = "2024-10-21"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there world"}]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake() -> Iterator[FakeAzure]:
    with FakeAzure(api_key=KEY) as server:
        yield server


def make_client(fake: FakeAzure, **kwargs: Any) -> AsyncAzureOpenAI:
    options: dict[str, Any] = {"api_key": KEY, "api_version": API_VERSION, "max_retries": 0}
    return AsyncAzureOpenAI(azure_endpoint=fake.url, **(options | kwargs))


@pytest.fixture
async def client(fake: FakeAzure) -> AsyncIterator[AsyncAzureOpenAI]:
    async with make_client(fake) as sdk:
        yield sdk


async def collect(client: AsyncAzureOpenAI, **kwargs: Any) -> list[ChatCompletionChunk]:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=USER, stream=True, **kwargs
    )
    async with stream:
        return [chunk async for chunk in stream]


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    # Azure's annotation chunk has a choice without "delta": the SDK gives delta=None.
    return "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta
    )


# ---- streaming ---------------------------------------------------------------------------------


async def test_stream_has_azure_shape_and_usage_last(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    chunks = await collect(client, stream_options={"include_usage": True})

    assert text_of(chunks) == "echo: hello there world"
    first, role, last = chunks[0], chunks[1], chunks[-1]
    assert first.choices == [] and first.id == ""
    assert first.model_extra is not None
    assert first.model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    assert role.choices[0].delta.role == "assistant"
    assert role.object == "chat.completion.chunk" and role.model.startswith("gpt-4o-")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes.count("stop") == 1
    annotation = chunks[-2].choices[0]
    assert annotation.delta is None  # typed as ChoiceDelta, but None on Azure's annotations
    assert annotation.model_extra is not None and "content_filter_offsets" in annotation.model_extra
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 4)
    assert last.usage.total_tokens == 7

    (seen,) = fake.requests
    assert seen.deployment == "gpt-4o" and seen.query == {"api-version": API_VERSION}
    assert seen.headers["api-key"] == KEY
    assert seen.body["stream"] is True and seen.body["messages"] == USER


async def test_stream_without_usage_request_has_no_usage_chunk(client: AsyncAzureOpenAI) -> None:
    chunks = await collect(client)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is None  # the annotation chunk ends the stream


async def test_scripted_chunks_and_content_filter_finish(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    fake.push(Reply(text_chunks=["Once", " upon"], finish_reason="content_filter"))
    chunks = await collect(client, stream_options={"include_usage": True})
    assert text_of(chunks) == "Once upon"
    (finish,) = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish.finish_reason == "content_filter"
    assert finish.model_extra is not None
    assert finish.model_extra["content_filter_results"]["hate"]["filtered"] is True
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


async def test_raw_chunks_with_error_event_raise_api_error(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    content = {"choices": [{"delta": {"content": "hi"}, "index": 0, "finish_reason": None}]}
    error = {"error": {"code": "server_error", "message": "stream broke"}}
    fake.push(Reply(raw_chunks=[content, error]))
    stream = await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="stream broke"):
        async with stream:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
    assert received == ["hi"]


async def test_default_reply_paces_n_chunks() -> None:
    with FakeAzure(api_key=KEY, default_chunks=5, default_chunk_delay=0.03) as fake:
        async with make_client(fake) as client:
            started = time.monotonic()
            chunks = await collect(client)
            elapsed = time.monotonic() - started
    assert text_of(chunks) == "echo: hello there world echo:"
    assert elapsed >= 0.15


# ---- non-streaming -----------------------------------------------------------------------------


async def test_non_stream_completion(fake: FakeAzure, client: AsyncAzureOpenAI) -> None:
    fake.push(Reply(text_chunks=["Hi", " you"]))
    reply = await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == "Hi you"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == 5
    assert reply.model_extra is not None and "prompt_filter_results" in reply.model_extra
    again = await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert again.choices[0].message.content == "echo: hello there world"


async def test_a_tool_call_has_null_content_streamed_and_not(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    fake.push(Reply(tool_calls=[call]), Reply(tool_calls=[call]))
    chunks = await collect(client)
    role = chunks[1].choices[0].delta
    assert (role.role, role.content) == ("assistant", None)  # no text: null, as OpenAI sends
    whole = await client.chat.completions.create(model="gpt-4o", messages=USER)
    message = whole.choices[0].message
    assert message.content is None and whole.choices[0].finish_reason == "tool_calls"
    assert [c.model_dump() for c in message.tool_calls or []] == [call]
    assert whole.choices[0].model_extra is not None
    assert whole.choices[0].model_extra["content_filter_results"]["hate"]["severity"] == "safe"


def test_sync_client_from_sync_code(fake: FakeAzure) -> None:
    with AzureOpenAI(
        azure_endpoint=fake.url, api_key=KEY, api_version=API_VERSION, max_retries=0
    ) as client:
        stream = client.chat.completions.create(model="d", messages=USER, stream=True)
        with stream:
            assert text_of(list(stream)) == "echo: hello there world"


# ---- errors ------------------------------------------------------------------------------------


async def test_wrong_key_is_authentication_error_and_consumes_no_reply(fake: FakeAzure) -> None:
    fake.push(Reply(text_chunks=["kept"]))
    async with make_client(fake, api_key="wrong") as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="gpt-4o", messages=USER)
    assert caught.value.status_code == 401 and caught.value.code == "401"
    assert "Access denied" in caught.value.message
    async with make_client(fake) as good:
        reply = await good.chat.completions.create(model="gpt-4o", messages=USER)
    assert reply.choices[0].message.content == "kept"


async def test_scripted_unauthorized(fake: FakeAzure, client: AsyncAzureOpenAI) -> None:
    fake.push(unauthorized())
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)


async def test_entra_bearer_token() -> None:
    with FakeAzure(api_key=KEY, ad_token="entra-token") as fake:
        async with make_client(fake, api_key=None, azure_ad_token="entra-token") as client:
            reply = await client.chat.completions.create(model="gpt-4o", messages=USER)
            assert reply.choices[0].message.content == "echo: hello there world"
        assert fake.requests[-1].headers["authorization"] == "Bearer entra-token"
        async with make_client(fake, api_key=None, azure_ad_token="other") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(model="gpt-4o", messages=USER)


async def test_content_filter_is_bad_request(fake: FakeAzure, client: AsyncAzureOpenAI) -> None:
    fake.push(content_filter_error())
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    error = caught.value
    assert error.code == "content_filter" and error.param == "prompt"
    assert isinstance(error.body, dict)
    assert error.body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert error.body["innererror"]["content_filter_result"]["hate"]["filtered"] is True


async def test_server_error_without_retries(fake: FakeAzure, client: AsyncAzureOpenAI) -> None:
    fake.push(server_error(503))
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert caught.value.status_code == 503 and len(fake.requests) == 1


async def test_404_without_api_version_and_keep_alive(fake: FakeAzure) -> None:
    path = "/openai/deployments/gpt-4o/chat/completions"
    async with httpx.AsyncClient(base_url=fake.url) as raw:
        missing = await raw.post(path, headers={"api-key": KEY}, json={"messages": USER})
        wrong = await raw.post("/openai/nope?api-version=1", headers={"api-key": KEY}, json={})
        ok = await raw.post(f"{path}?api-version=1", headers={"api-key": KEY}, json={})
    assert missing.status_code == wrong.status_code == 404
    assert missing.json() == {"error": {"code": "404", "message": "Resource not found"}}
    assert ok.status_code == 200
    assert fake.connections == 1
    assert [r.deployment for r in fake.requests] == ["gpt-4o", "", "gpt-4o"]


# ---- retries -----------------------------------------------------------------------------------


async def test_429_is_retried_after_retry_after_ms(fake: FakeAzure) -> None:
    fake.push(rate_limited(retry_after_ms=200, retry_after=30))
    async with make_client(fake, max_retries=1) as client:
        started = time.monotonic()
        chunks = await collect(client)
        elapsed = time.monotonic() - started
    assert text_of(chunks) == "echo: hello there world"
    # retry-after-ms wins over retry-after (30 s) and over the 0.5 s exponential backoff
    assert 0.2 <= elapsed < 1.5
    first, second = fake.requests
    assert first.headers["x-stainless-retry-count"] == "0"
    assert second.headers["x-stainless-retry-count"] == "1"


async def test_429_without_retries_is_rate_limit_error(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    fake.push(rate_limited(retry_after_ms=10, retry_after=1))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=USER)
    headers = caught.value.response.headers
    assert headers["retry-after-ms"] == "10" and headers["retry-after"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "Please retry after 1 seconds" in caught.value.message


async def test_x_should_retry_false_overrides_429(fake: FakeAzure) -> None:
    reply = rate_limited(retry_after_ms=10)
    reply.headers["x-should-retry"] = "false"
    fake.push(reply)
    async with make_client(fake, max_retries=2) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert len(fake.requests) == 1


# ---- timing, hangs, drops, disconnects ----------------------------------------------------------


async def test_hang_after_hits_client_read_timeout(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    fake.push(Reply(text_chunks=["a", "b", "c"], hang_after=1))
    stream = await client.with_options(timeout=0.5).chat.completions.create(
        model="gpt-4o", messages=USER, stream=True
    )
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APITimeoutError):
        async with stream:
            async for chunk in stream:
                received.append(chunk)
    assert text_of(received) == "a"
    assert await fake.await_disconnect(within=5)
    assert fake.open_streams == 0


async def test_first_byte_delay_times_out_then_retry_succeeds(fake: FakeAzure) -> None:
    fake.push(Reply(first_byte_delay=5))
    async with make_client(fake, max_retries=1, timeout=0.3) as client:
        reply = await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert reply.choices[0].message.content == "echo: hello there world"
    assert len(fake.requests) == 2
    assert await fake.await_disconnect(within=5)


async def test_drop_after_raises_connection_error(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    fake.push(Reply(text_chunks=["a", "b", "c"], drop_after=2))
    stream = await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError) as caught:
        async with stream:
            async for chunk in stream:
                received.append(chunk)
    assert not isinstance(caught.value, openai.APITimeoutError)
    assert text_of(received) == "ab"
    assert fake.disconnects == 0  # the server hung up, not the client


async def test_client_closing_mid_stream_is_detected(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    fake.push(Reply(text_chunks=[f" t{i}" for i in range(200)], chunk_delay=0.02))
    stream = await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    received: list[ChatCompletionChunk] = []
    async with stream:
        async for chunk in stream:
            received.append(chunk)
            if text_of(received).count("t") >= 2:
                assert fake.open_streams == 1
                break
    assert await fake.await_disconnect(within=5)
    assert fake.disconnects == 1 and fake.open_streams == 0


async def test_connection_is_reused_after_complete_streams(
    fake: FakeAzure, client: AsyncAzureOpenAI
) -> None:
    await collect(client)
    await collect(client, stream_options={"include_usage": True})
    await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert fake.connections == 1 and fake.disconnects == 0


# ---- bookkeeping -------------------------------------------------------------------------------


async def test_push_is_fifo_and_reset_clears(fake: FakeAzure, client: AsyncAzureOpenAI) -> None:
    fake.push(Reply(text_chunks=["one"]), Reply(text_chunks=["two"]), Reply(text_chunks=["x"]))
    first = await client.chat.completions.create(model="gpt-4o", messages=USER)
    second = await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert [first.choices[0].message.content, second.choices[0].message.content] == ["one", "two"]
    fake.reset()
    assert fake.requests == []
    third = await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert third.choices[0].message.content == "echo: hello there world"


def test_standalone_cli_serves_paced_chunks() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "tests.fake_azure", "--port", "0", "--chunks", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            found = re.search(r"http://\S+", proc.stdout.readline())
            assert found is not None
            url = found.group()
            with AzureOpenAI(
                azure_endpoint=url, api_key=KEY, api_version=API_VERSION, max_retries=0
            ) as client:
                reply = client.chat.completions.create(model="d", messages=USER)
            assert reply.choices[0].message.content == "echo: hello there"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
