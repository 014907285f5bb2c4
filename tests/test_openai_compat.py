"""POST /v1/chat/completions with the official ``openai`` SDK as the client.

The SDK (``AsyncOpenAI(base_url=<server>/v1)``) talks to a real server process,
which talks to the fake Azure upstream through the SDK again: both ends are
the real thing. The session server runs with a 3 s first-token timeout and a
3 s retry budget (``harness.server_env``). The merge of streamed chunks into
one ``chat.completion`` is also checked on its own, with chunks spelled out.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletionMessageParam,
    ChatCompletionMessageToolCallParam,
    ChatCompletionToolParam,
)

from streamsvc.chat.openai_chunks import CompletionBuilder, StreamCleaner
from tests.fake_azure import (
    NOT_FOUND,
    FakeAzure,
    Reply,
    content_filter_error,
    rate_limited,
)
from tests.harness import JSON_TYPE, ServerProcess, asgi_client, check_answer, server_env

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL: ChatCompletionMessageToolCallParam = {
    "id": "call_abc123",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
KEY = "v1-client-key-0123456789"


@pytest.fixture
async def sdk(server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def raw_frames(
    client: httpx.AsyncClient, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, list[str], str]:
    """POST and split the SSE answer into its blocks (comments dropped) and the raw text."""
    async with client.stream("POST", url, json=body, headers=headers) as response:
        text = (await response.aread()).decode()
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b and not b.startswith(":")]
    return response, blocks, text


# ---- the SDK as the client ----------------------------------------------------------------------


async def test_sdk_non_streaming_gets_a_chat_completion(sdk: AsyncOpenAI, azure: FakeAzure) -> None:
    completion = await sdk.chat.completions.create(model="gpt-4o", messages=USER)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-2024-11-20"
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo: Hello"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (1, 2)
    assert completion.usage.total_tokens == 3
    (sent,) = azure.requests
    assert sent.deployment == "gpt-4o"
    assert sent.body["stream"] is True  # the upstream always streams, with usage
    assert sent.body["stream_options"] == {"include_usage": True}
    # The client set neither: the service's defaults fill them in.
    assert (sent.body["temperature"], sent.body["max_tokens"]) == (0.7, 2000)


async def test_sdk_streaming_gets_clean_chunks_without_usage_unless_asked(
    sdk: AsyncOpenAI, azure: FakeAzure
) -> None:
    azure.push(Reply(text_chunks=["Hel", "lo", "!"]))
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    # OpenAI's docs loop, unguarded: every chunk has a choice, every choice a delta.
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello!"
    assert [c.choices[0].finish_reason for c in chunks].count("stop") == 1
    assert all(c.usage is None for c in chunks)
    # One id, model and created all along; Azure's extras are not in the default stream.
    assert {(c.id, c.model, c.created, c.object) for c in chunks} == {
        (chunks[0].id, "gpt-4o-2024-11-20", chunks[0].created, "chat.completion.chunk")
    }
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].created > 0
    assert not any((c.model_extra or {}).get("prompt_filter_results") for c in chunks)
    assert not any((c.choices[0].model_extra or {}).get("content_filter_offsets") for c in chunks)
    # Usage was still asked for upstream (for the access log), then dropped.
    assert azure.requests[0].body["stream_options"] == {"include_usage": True}


async def test_the_azure_extras_header_keeps_filter_results_in_a_clean_shape(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    body = {"model": "gpt-4o", "messages": USER, "stream": True}
    url = server.url + "/v1/chat/completions"
    azure.push(Reply(text_chunks=["Hel", "lo"]))
    _, blocks, _ = await raw_frames(client, url, body, {"X-Streamsvc-Azure-Extras": "1"})
    chunks = [json.loads(block[6:]) for block in blocks[:-1]]
    upstream = azure.requests[0]
    assert all(c["choices"] and all("delta" in ch for ch in c["choices"]) for c in chunks)
    assert len({(c["id"], c["model"], c["created"]) for c in chunks}) == 1
    # The prompt-filter results ride on the first chunk, the annotation keeps its offsets.
    (first, *_, annotation) = chunks
    assert first["prompt_filter_results"][0]["prompt_index"] == 0
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert annotation["choices"][0]["delta"] == {}
    assert annotation["choices"][0]["content_filter_offsets"]["end_offset"] == len("Hello")
    assert annotation["choices"][0]["content_filter_results"]["hate"]["severity"] == "safe"
    assert upstream.body["messages"] == USER
    # Without the header: neither (the annotation chunk is dropped).
    azure.push(Reply(text_chunks=["Hel", "lo"]))
    _, blocks, _ = await raw_frames(client, url, body)
    plain = [json.loads(block[6:]) for block in blocks[:-1]]
    assert len(plain) == len(chunks) - 1
    assert "prompt_filter_results" not in plain[0]
    assert not any("content_filter_offsets" in c["choices"][0] for c in plain)


async def test_sdk_streaming_with_include_usage_ends_with_the_usage_chunk(
    sdk: AsyncOpenAI, azure: FakeAzure
) -> None:
    azure.push(Reply(text_chunks=["a", "b"]))
    stream = await sdk.chat.completions.create(
        model="gpt-4o",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        1,
        2,
        3,
    )
    assert [c for c in chunks if c.usage is not None] == [last]


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
async def test_sdk_tool_calls_round_trip(
    sdk: AsyncOpenAI, azure: FakeAzure, streaming: bool
) -> None:
    azure.push(Reply(tool_calls=[dict(CALL)]), Reply(text_chunks=["It is sunny."]))
    extra: dict[str, Any] = {
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "temperature": 0.1,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n"],
        "user": "ada",
    }
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris?"}]
    if streaming:
        stream = await sdk.chat.completions.create(
            model="gpt-4o", messages=ask, stream=True, **extra
        )
        name, arguments, call_id, finish = "", "", "", None
        async for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for call in (choice.delta.tool_calls or []) if choice.delta else []:
                    assert call.index == 0
                    call_id = call.id or call_id
                    name += (call.function.name or "") if call.function else ""
                    arguments += (call.function.arguments or "") if call.function else ""
    else:
        completion = await sdk.chat.completions.create(model="gpt-4o", messages=ask, **extra)
        message = completion.choices[0].message
        assert message.tool_calls is not None
        (call,) = message.tool_calls
        assert call.type == "function"
        call_id, finish = call.id, completion.choices[0].finish_reason
        name, arguments = call.function.name, call.function.arguments
    assert (call_id, name, json.loads(arguments), finish) == (
        "call_abc123",
        "get_weather",
        {"city": "Paris"},
        "tool_calls",
    )
    first = azure.requests[0].body
    for key, value in extra.items():  # every field reached the upstream as sent
        assert first[key] == value, key
    assert first["messages"] == ask

    # The answer goes back: the assistant's tool call and the tool's result, untouched.
    history: list[ChatCompletionMessageParam] = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": '{"sky": "sunny"}'},
    ]
    final = await sdk.chat.completions.create(
        model="gpt-4o", messages=history, tools=[WEATHER_TOOL]
    )
    assert final.choices[0].message.content == "It is sunny."
    second = azure.requests[1].body
    assert second["messages"] == history
    assert second["tools"] == [WEATHER_TOOL]


async def test_legacy_functions_response_format_and_unknown_fields_pass_through(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ada"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "f", "arguments": "{}"},
            },
            {"role": "function", "name": "f", "content": "42"},
        ],
        "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
        "function_call": {"name": "f"},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        "n": 2,
        "logit_bias": {"50256": -100},
        "max_completion_tokens": 64,
        "metadata": {"trace": "abc"},
        "x_vendor_extension": [1, {"deep": None}],
    }
    response = await client.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    sent = azure.requests[0].body
    assert {k: sent[k] for k in body} == body
    assert "max_tokens" not in sent  # the client set max_completion_tokens: no default added


async def test_defaults_fill_only_what_the_client_left_out(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    url = server.url + "/v1/chat/completions"
    bodies = [
        {"messages": USER},  # no model: the default deployment
        {"messages": USER, "model": "o3-mini"},  # reasoning model, nothing set
        {"messages": USER, "model": "o3-mini", "max_tokens": 50, "temperature": 0.2},
        {"messages": USER, "model": "gpt-4o", "temperature": 1.5},
    ]
    for body in bodies:
        assert (await client.post(url, json=body)).status_code == 200
    default, reasoning, explicit, partial = (r.body for r in azure.requests)
    assert azure.requests[0].deployment == "gpt-4o"
    assert (default["model"], default["max_tokens"], default["temperature"]) == (
        "gpt-4o",
        2000,
        0.7,
    )
    assert reasoning["max_completion_tokens"] == 2000
    assert "max_tokens" not in reasoning and "temperature" not in reasoning
    # Explicit client parameters are never rewritten, even for a reasoning model.
    assert (explicit["max_tokens"], explicit["temperature"]) == (50, 0.2)
    assert "max_completion_tokens" not in explicit
    assert (partial["temperature"], partial["max_tokens"]) == (1.5, 2000)


# ---- the wire format ----------------------------------------------------------------------------


async def test_stream_is_data_lines_only_ending_with_done(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["a\nb", "c"]))
    body = {"model": "gpt-4o", "messages": USER, "stream": True}
    response, blocks, _ = await raw_frames(client, server.url + "/v1/chat/completions", body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks)
    assert blocks[-1] == "data: [DONE]"
    chunks = [json.loads(block[6:]) for block in blocks[:-1]]
    deltas = [c["choices"][0].get("delta", {}).get("content") for c in chunks if c["choices"]]
    assert "a\nb" in deltas and "c" in deltas
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[1:])


async def test_an_upstream_break_mid_stream_is_a_final_error_object_without_done(
    sdk: AsyncOpenAI, server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["one", "two", "three"], drop_after=1))
    body = {"model": "gpt-4o", "messages": USER, "stream": True}
    response, blocks, _ = await raw_frames(client, server.url + "/v1/chat/completions", body)
    assert response.status_code == 200
    assert "data: [DONE]" not in blocks
    error = json.loads(blocks[-1][6:])["error"]
    assert error == {
        "message": "the chat upstream broke off the stream",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }
    # The SDK raises it as an APIError after the chunks before it.
    azure.push(Reply(text_chunks=["one", "two", "three"], drop_after=1))
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="broke off"):
        async for chunk in stream:
            seen.append(chunk)
    assert any(
        c.choices and c.choices[0].delta and c.choices[0].delta.content == "one" for c in seen
    )


async def test_a_client_hanging_up_mid_stream_closes_the_upstream_request(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["x"] * 50, chunk_delay=0.2))
    body = {"model": "gpt-4o", "messages": USER, "stream": True}
    async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if '"content":"x"' in line:
                break
    assert await azure.await_disconnect(within=5)


# ---- errors in OpenAI's shape -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"model": "gpt-4o"}, None),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": USER, "model": 4}, "model"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        (
            {"messages": USER, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
    ],
    ids=[
        "no-messages",
        "missing-messages",
        "no-role",
        "not-an-object",
        "model-int",
        "stream-string",
        "usage-string",
    ],
)
async def test_wrong_shapes_are_400_in_openais_error_shape(
    server: ServerProcess,
    azure: FakeAzure,
    client: httpx.AsyncClient,
    body: dict[str, Any],
    param: str | None,
) -> None:
    response = await client.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        param,
        "validation_error",
    )
    assert error["message"]
    assert azure.requests == []


async def test_malformed_json_is_400_and_the_sdk_maps_statuses_to_its_errors(
    sdk: AsyncOpenAI, server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        server.url + "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"
    with pytest.raises(openai.BadRequestError) as invalid:
        await sdk.chat.completions.create(model="gpt-4o", messages=[])
    assert invalid.value.code == "validation_error" and invalid.value.param == "messages"

    azure.push(content_filter_error())
    with pytest.raises(openai.BadRequestError) as filtered:
        await sdk.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert filtered.value.code == "content_filter"

    azure.push(Reply(status=404, error=NOT_FOUND))
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="no-such-deployment", messages=USER)

    too_long = {
        "message": "This model's maximum context length is 128000 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    azure.push(Reply(status=400, error={"error": too_long}))
    with pytest.raises(openai.BadRequestError) as rejected:
        await sdk.chat.completions.create(model="gpt-4o", messages=USER)
    assert rejected.value.body == too_long  # the upstream's error, as it said it


async def test_rate_limits_keep_their_status_and_retry_after(
    sdk: AsyncOpenAI, azure: FakeAzure
) -> None:
    azure.push(*[rate_limited(retry_after_ms=None, retry_after=2)] * 5)
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.code == "upstream_rate_limited"
    assert caught.value.type == "rate_limit_error"
    assert len(azure.requests) == 2  # one retry fitted the 3 s budget


async def test_no_first_token_in_time_is_a_504_before_any_header(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    # Azure's prompt-filter and role chunks arrive at once; the first token never does.
    azure.push(Reply(text_chunks=["late"], chunk_delay=10))
    body = {"model": "gpt-4o", "messages": USER, "stream": True}
    response = await client.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert await azure.await_disconnect(within=2)


@pytest.fixture(scope="module")
def keyed_server(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    process = ServerProcess(server_env(fake_azure, STREAMSVC_API_KEYS=KEY))
    yield process
    process.close()


async def test_our_api_key_is_the_sdks_api_key_and_a_wrong_one_is_an_openai_401(
    keyed_server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    base = keyed_server.url + "/v1"
    async with AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            await wrong.chat.completions.create(model="gpt-4o", messages=USER)
    assert caught.value.body == {
        "message": "a valid API key is required",
        "type": "authentication_error",
        "param": None,
        "code": "unauthorized",
    }
    async with AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0) as right:
        completion = await right.chat.completions.create(model="gpt-4o", messages=USER)
    assert completion.choices[0].message.content == "echo: Hello"
    # Other routes keep the service's own error shape.
    refused = await client.post(keyed_server.url + "/chat", json={"messages": USER})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert "type" not in refused.json()["error"]
    unknown = await client.get(base + "/embeddings", headers={"authorization": f"Bearer {KEY}"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"
    # The model listing needs the key too, as OpenAI's does.
    listing = await client.get(base + "/models")
    assert listing.status_code == 401 and listing.json()["error"]["code"] == "unauthorized"
    async with AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0) as right:
        assert [m.id async for m in right.models.list()] == ["gpt-4o"]


async def test_unconfigured_chat_is_a_503_naming_the_missing_settings(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = start_server(AZURE_OPENAI_API_KEY="", AZURE_OPENAI_DEPLOYMENT="")
    response = await client.post(server.url + "/v1/chat/completions", json={"messages": USER})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "chat_not_configured" and error["type"] == "server_error"
    assert "AZURE_OPENAI_API_KEY" in error["message"]
    assert "AZURE_OPENAI_DEPLOYMENT" in error["message"]
    assert "AZURE_OPENAI_ENDPOINT" not in error["message"]


def test_real_answers_match_the_openapi_document(server: ServerProcess, azure: FakeAzure) -> None:
    path = "/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": USER}
    azure.push(
        Reply(), Reply(), Reply(tool_calls=[dict(CALL)]), Reply(text_chunks=["a"], drop_after=0)
    )
    with httpx.Client(base_url=server.url, timeout=30) as http:
        check_answer(path, "post", http.post(path, json=body))
        check_answer(path, "post", http.post(path, json={**body, "stream": True}))
        check_answer(path, "post", http.post(path, json={**body, "tools": [WEATHER_TOOL]}))
        check_answer(path, "post", http.post(path, json={**body, "stream": True}))  # an error
        check_answer(path, "post", http.post(path, json={"messages": []}))
        check_answer(path, "post", http.post(path, content=b"{", headers=JSON_TYPE))
        check_answer(path, "post", http.post(path, content=b"{"))  # 415: not JSON


# ---- /v1/models ---------------------------------------------------------------------------------

AZURE_ENV = {
    "AZURE_OPENAI_API_KEY": "k",
    "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9",
    "AZURE_OPENAI_DEPLOYMENT": "gpt-4o",
}


async def test_models_list_the_configured_deployments_in_openais_shape() -> None:
    env = {**AZURE_ENV, "STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS": "gpt-4o-mini,gpt-4o,o3-mini"}
    async with asgi_client(env) as http:
        listing = await http.get("/v1/models")
        one = await http.get("/v1/models/o3-mini")
        missing = await http.get("/v1/models/gpt-3.5-turbo")
    check_answer("/v1/models", "get", listing)
    assert listing.json() == {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "azure"}
            for name in ("gpt-4o", "gpt-4o-mini", "o3-mini")
        ],
    }
    check_answer("/v1/models/{model}", "get", one)
    assert one.json() == listing.json()["data"][2]
    check_answer("/v1/models/{model}", "get", missing)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_the_sdk_lists_and_retrieves_models(sdk: AsyncOpenAI) -> None:
    assert [m.id async for m in sdk.models.list()] == ["gpt-4o"]
    model = await sdk.models.retrieve("gpt-4o")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o", "model", "azure")
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.models.retrieve("gpt-3.5-turbo")
    assert missing.value.code == "model_not_found"
    assert missing.value.type == "not_found_error"


async def test_models_of_the_openai_provider_and_of_no_provider() -> None:
    env = {"STREAMSVC_CHAT_PROVIDER": "openai", "OPENAI_MODEL": "meta-llama/Llama-3.1-8B"}
    async with asgi_client(env) as http:
        one = await http.get("/v1/models/meta-llama/Llama-3.1-8B")  # a name with a slash
        assert one.status_code == 200
        assert one.json()["owned_by"] == "openai"
    async with asgi_client({}) as http:
        unconfigured = await http.get("/v1/models")
        assert unconfigured.status_code == 503
        assert unconfigured.json()["error"]["code"] == "chat_not_configured"


# ---- merging streamed chunks into one chat.completion --------------------------------------------


def test_merging_chunks_rebuilds_choices_tool_calls_and_logprobs() -> None:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}

    def chunk(index: int, delta: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        choice = {"index": index, "finish_reason": None, **extra}
        if delta is not None:
            choice["delta"] = delta
        return {**base, "choices": [choice]}

    call = {"index": 0, "id": "call_1", "type": "function"}
    chunks = [
        {"choices": [], "created": 0, "id": "", "model": "", "object": "",
         "prompt_filter_results": [{"prompt_index": 0}]},
        chunk(0, {"role": "assistant", "content": ""}),
        chunk(1, {"role": "assistant", "content": None, "tool_calls": [
            {**call, "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk(0, {"content": "Hel"}, logprobs={"content": [{"token": "Hel"}], "refusal": None}),
        chunk(1, {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk(0, {"content": "lo"}, logprobs={"content": [{"token": "lo"}], "refusal": None}),
        chunk(1, {"tool_calls": [
            {"index": 0, "type": "function", "function": {"arguments": ' "Paris"}'}},
            {"index": 1, "id": "call_2", "function": {"name": "f", "arguments": "{}"}}]}),
        chunk(0, {}, finish_reason="stop", content_filter_results={}),
        chunk(1, {}, finish_reason="tool_calls"),
        chunk(0, None, content_filter_results={"hate": {"filtered": False}},
              content_filter_offsets={"start_offset": 0}),
        {**base, "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ]  # fmt: skip
    builder = CompletionBuilder()
    for item in chunks:
        builder.add(item)
    completion = builder.completion()
    assert completion == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "prompt_filter_results": [{"prompt_index": 0}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None,
                            "annotations": []},
                "finish_reason": "stop",
                "logprobs": {"content": [{"token": "Hel"}, {"token": "lo"}], "refusal": None},
                "content_filter_results": {"hate": {"filtered": False}},
            },
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "annotations": [],
                    "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"id": "call_2", "function": {"name": "f", "arguments": "{}"}},
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            },
        ],
    }  # fmt: skip


def test_merging_concatenates_only_text_and_keeps_the_latest_of_everything_else() -> None:
    base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 9, "model": "m"}
    safe = {"hate": {"filtered": False, "severity": "safe"}}
    final = {"hate": {"filtered": True, "severity": "medium"}}

    def chunk(delta: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "finish_reason": None, **extra}
        if delta is not None:
            choice["delta"] = delta
        return {**base, "choices": [choice]}

    builder = CompletionBuilder()
    for item in [
        chunk({"role": "assistant", "content": "", "refusal": None}, content_filter_results={}),
        chunk({"content": "Sa"}, content_filter_results=safe),
        chunk({"content": "fe"}, content_filter_results=safe),
        chunk({"refusal": "I can"}, content_filter_results=safe),
        chunk({"refusal": "not."}, content_filter_results=safe),
        chunk({"function_call": {"name": "f", "arguments": "{\"a\""}}),
        chunk({"function_call": {"name": "f", "arguments": ": 1}"}}),
        chunk({"tool_calls": [{"index": 0, "id": "c", "type": "function",
                               "function": {"name": "g", "arguments": "["}}]}),
        chunk({"tool_calls": [{"index": 0, "type": "function",
                               "function": {"name": "g", "arguments": "]"}}]}),
        chunk({}, finish_reason="content_filter", content_filter_results={}),
        chunk(None, content_filter_results=final, content_filter_offsets={"end_offset": 4}),
    ]:  # fmt: skip
        builder.add(item)
    (choice,) = builder.completion()["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Safe",
        "refusal": "I cannot.",
        "annotations": [],
        "function_call": {"name": "f", "arguments": '{"a": 1}'},
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "g", "arguments": "[]"}}
        ],
    }
    assert choice["content_filter_results"] == final  # the verdict, not "safesafe..."
    assert choice["finish_reason"] == "content_filter"
    assert "content_filter_offsets" not in choice


@pytest.mark.parametrize("extras", [False, True], ids=["default", "extras"])
def test_the_cleaner_leaves_no_empty_choices_no_missing_delta_and_one_identity(
    extras: bool,
) -> None:
    def chunk(created: int, *choices: Any, **extra: Any) -> dict[str, Any]:
        return {
            "id": "chatcmpl-3",
            "object": "chat.completion.chunk",
            "created": created,
            "model": "m",
            "choices": list(choices),
            **extra,
        }

    filters = [{"prompt_index": 0, "content_filter_results": {}}]
    upstream = [
        {"choices": [], "created": 0, "id": "", "model": "", "object": "",
         "prompt_filter_results": filters},
        chunk(5, {"index": 0, "delta": {"role": "assistant", "content": ""}}),
        chunk(6, {"index": 0, "delta": {"content": "Hi"}}, "not a choice"),  # a later second
        chunk(6, {"index": 0, "content_filter_offsets": {}, "finish_reason": None}),
        chunk(7, {"index": 0, "finish_reason": "stop"}),  # a finish without a delta
        {**chunk(7), "usage": {"total_tokens": 3}},
    ]  # fmt: skip
    cleaner = StreamCleaner(extras)
    out = [c for c in (cleaner.clean(dict(item)) for item in upstream) if c is not None]
    assert [c["choices"] for c in out] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        [{"index": 0, "delta": {"content": "Hi"}}],
        *([[{"index": 0, "content_filter_offsets": {}, "finish_reason": None, "delta": {}}]]
          if extras else []),
        [{"index": 0, "finish_reason": "stop", "delta": {}}],
        [],  # the usage chunk, when the client asked for it: OpenAI's own shape
    ]  # fmt: skip
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in out} == {
        ("chatcmpl-3", 5, "m", "chat.completion.chunk")
    }
    assert [c.get("prompt_filter_results") for c in out][:2] == (
        [filters, None] if extras else [None, None]
    )


def test_merging_a_far_tool_call_index_appends_one_call() -> None:
    builder = CompletionBuilder()
    far = {"index": 10**12, "id": "far", "function": {"name": "f", "arguments": "{}"}}
    builder.add({"choices": [{"index": 0, "delta": {"tool_calls": [far]}}]})
    (choice,) = builder.completion()["choices"]
    assert choice["message"]["tool_calls"] == [
        {"id": "far", "function": {"name": "f", "arguments": "{}"}}
    ]
