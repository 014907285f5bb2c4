"""Real OpenAI clients against /v1 of a real server, the fake Azure upstream behind it.

The upstream speaks Azure's wire format with its filter chunks on (the prompt-filter
chunk with empty ``choices``, per-chunk filter results, the trailing annotation chunk
without a ``delta``). Each client is used as its docs show: the ``openai`` SDK (the
docs loop unguarded, the ``.stream()`` helper sync and async), LangChain's
``ChatOpenAI`` and the Vercel AI SDK (node, tests/clients). Non-streamed answers must
equal what Azure answers non-streaming for the same completion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import SecretStr

from tests.fake_azure import FakeAzure, Reply
from tests.harness import AZURE_KEY, ROOT, ServerProcess

CLIENTS_DIR = ROOT / "tests" / "clients"
TEXT = ["The ", "quick ", "brown ", "fox", "."]
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]
WEATHER: ChatCompletionToolParam = {
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
CALL = {
    "id": "call_weather_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def v1(server: ServerProcess) -> str:
    return server.url + "/v1"


def straight_from_azure(fake: FakeAzure, reply: Reply, **kwargs: Any) -> Any:
    """What Azure itself answers for ``reply`` (the SDK pointed at the fake directly)."""
    fake.push(reply)
    with openai.AzureOpenAI(
        azure_endpoint=fake.url, api_key=AZURE_KEY, api_version="2024-10-21", max_retries=0
    ) as azure:
        answer = azure.chat.completions.create(model="gpt-4o", messages=USER, **kwargs)
        # A stream is read before its client closes (after, its socket is gone).
        return list(answer) if kwargs.get("stream") else answer


def filter_results(completion: dict[str, Any]) -> list[Any]:
    return [choice.get("content_filter_results") for choice in completion["choices"]]


# ---- the openai SDK -----------------------------------------------------------------------------


def test_the_docs_loop_unguarded_streams_the_exact_text(
    server: ServerProcess, azure: FakeAzure
) -> None:
    # Straight from Azure, the docs loop breaks on the prompt-filter chunk: the upstream
    # really sends what this test is about.
    with pytest.raises(IndexError):
        for chunk in straight_from_azure(azure, Reply(text_chunks=TEXT), stream=True):
            print(chunk.choices[0].delta.content or "", end="")
    azure.push(Reply(text_chunks=TEXT))
    parts = []
    with openai.OpenAI(base_url=v1(server), api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
        for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "")  # as OpenAI's docs do
    assert "".join(parts) == "".join(TEXT)


def test_the_stream_helper_sync_gives_the_text_and_the_final_completion(
    server: ServerProcess, azure: FakeAzure
) -> None:
    azure.push(Reply(text_chunks=TEXT))
    with (
        openai.OpenAI(base_url=v1(server), api_key="unused", max_retries=0) as client,
        client.chat.completions.stream(model="gpt-4o", messages=USER) as stream,
    ):
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(deltas) == "".join(TEXT)
    assert final.choices[0].message.content == "".join(TEXT)
    assert final.choices[0].finish_reason == "stop"
    assert final.id.startswith("chatcmpl-") and final.model == "gpt-4o-2024-11-20"


async def test_the_stream_helper_async_with_a_tool_call_round_trip(
    server: ServerProcess, azure: FakeAzure
) -> None:
    azure.push(Reply(tool_calls=[CALL]), Reply(text_chunks=TEXT))
    async with openai.AsyncOpenAI(base_url=v1(server), api_key="unused", max_retries=0) as client:
        async with client.chat.completions.stream(
            model="gpt-4o", messages=USER, tools=[WEATHER]
        ) as stream:
            arguments = [
                event.arguments
                async for event in stream
                if event.type == "tool_calls.function.arguments.done"
            ]
            called = await stream.get_final_completion()
        (call,) = called.choices[0].message.tool_calls or []
        assert (call.id, call.function.name, arguments) == (
            "call_weather_1",
            "get_weather",
            ['{"city": "Paris"}'],
        )
        history: list[ChatCompletionMessageParam] = [
            *USER,
            {"role": "assistant", "content": None, "tool_calls": [CALL]},  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
        ]
        async with client.chat.completions.stream(
            model="gpt-4o", messages=history, tools=[WEATHER]
        ) as stream:
            text = "".join([e.delta async for e in stream if e.type == "content.delta"])
    assert text == "".join(TEXT)
    assert azure.requests[1].body["messages"] == history


@pytest.mark.parametrize(
    "reply",
    [
        Reply(text_chunks=TEXT),
        Reply(text_chunks=TEXT, finish_reason="content_filter"),
        Reply(tool_calls=[CALL]),
    ],
    ids=["text", "filtered", "tool-call"],
)
def test_the_json_answer_is_what_azure_answers_without_streaming(
    server: ServerProcess, azure: FakeAzure, reply: Reply
) -> None:
    expected = straight_from_azure(azure, reply, tools=[WEATHER]).model_dump()
    azure.push(reply)
    with openai.OpenAI(base_url=v1(server), api_key="unused", max_retries=0) as client:
        ours = client.chat.completions.create(model="gpt-4o", messages=USER, tools=[WEATHER])
    answer = ours.model_dump()
    assert filter_results(answer) == filter_results(expected)
    assert answer["prompt_filter_results"] == expected["prompt_filter_results"]
    # Everything else too, but the completion's own id and time.
    for completion in (answer, expected):
        completion.pop("id")
        completion.pop("created")
    assert answer == expected


# ---- LangChain ----------------------------------------------------------------------------------


class Wire:
    """What LangChain's HTTP client received: the JSON answers, as they came."""

    def __init__(self) -> None:
        self.answers: list[Any] = []

    def hook(self, response: httpx.Response) -> None:
        if response.headers.get("content-type", "").startswith("application/json"):
            response.read()
            self.answers.append(response.json())


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def chat_model(server: ServerProcess, wire: Wire) -> Iterator[ChatOpenAI]:
    with httpx.Client(event_hooks={"response": [wire.hook]}, timeout=30) as http:
        yield ChatOpenAI(
            model="gpt-4o",
            base_url=v1(server),
            api_key=SecretStr("unused"),
            max_retries=0,
            http_client=http,
        )


def test_langchain_streams_the_exact_text(chat_model: ChatOpenAI, azure: FakeAzure) -> None:
    azure.push(Reply(text_chunks=TEXT))
    chunks = list(chat_model.stream("Tell me a story"))
    assert "".join(str(chunk.content) for chunk in chunks) == "".join(TEXT)
    assert [chunk.content for chunk in chunks if chunk.content] == TEXT  # piece by piece


def test_langchain_invoke_gets_azures_filter_results(
    chat_model: ChatOpenAI, azure: FakeAzure, wire: Wire
) -> None:
    reply = Reply(text_chunks=TEXT, finish_reason="content_filter")
    expected = straight_from_azure(azure, reply).model_dump()
    azure.push(reply)
    message = chat_model.invoke("Tell me a story")
    assert message.content == "".join(TEXT)
    assert message.response_metadata["finish_reason"] == "content_filter"
    (answer,) = wire.answers
    assert filter_results(answer) == filter_results(expected)
    assert filter_results(answer)[0]["hate"] == {"filtered": True, "severity": "medium"}


def test_langchain_streams_a_tool_call_and_sends_the_result_back(
    chat_model: ChatOpenAI, azure: FakeAzure
) -> None:
    azure.push(Reply(tool_calls=[CALL]), Reply(text_chunks=TEXT))
    model = chat_model.bind_tools([dict(WEATHER)])
    question = HumanMessage("Weather in Paris?")
    merged: AIMessageChunk | None = None
    for chunk in model.stream([question]):
        assert isinstance(chunk, AIMessageChunk)
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    (call,) = merged.tool_calls
    assert (call["id"], call["name"], call["args"]) == (
        "call_weather_1",
        "get_weather",
        {"city": "Paris"},
    )
    called = AIMessage(content="", tool_calls=merged.tool_calls)
    result = ToolMessage('{"sky": "sunny"}', tool_call_id="call_weather_1")
    answer = "".join(str(c.content) for c in model.stream([question, called, result]))
    assert answer == "".join(TEXT)
    sent = azure.requests[1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_weather_1"
    assert sent[2] == {
        "role": "tool",
        "tool_call_id": "call_weather_1",
        "content": '{"sky": "sunny"}',
    }


# ---- the Vercel AI SDK (node) -------------------------------------------------------------------


def _ai_sdk_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is missing"
    for package in ("ai", "@ai-sdk/openai-compatible"):
        if not (CLIENTS_DIR / "node_modules" / package).is_dir():
            return f"{package} is missing in tests/clients (scripts/test runs npm ci)"
    return None


@pytest.fixture(scope="module")
def node_ready() -> None:
    missing = _ai_sdk_missing()
    if missing:
        if os.environ.get("CI") == "true" or os.environ.get("STREAMSVC_REQUIRE_DOCKER") == "1":
            pytest.fail(f"the AI SDK tests need node and tests/clients installed (CI): {missing}")
        pytest.skip(missing)


def ai_sdk(server: ServerProcess, mode: str, prompt: str = "Tell me a story") -> Any:
    command = {"baseURL": v1(server), "apiKey": "unused", "mode": mode, "prompt": prompt}
    done = subprocess.run(
        ["node", str(Path("ai_sdk.mjs")), json.dumps(command)],
        cwd=CLIENTS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_ai_sdk_stream_text(node_ready: None, server: ServerProcess, azure: FakeAzure) -> None:
    azure.push(Reply(text_chunks=TEXT))
    out = ai_sdk(server, "stream")
    assert out["errors"] == []
    assert out["parts"] == TEXT
    assert out["text"] == "".join(TEXT) and out["finishReason"] == "stop"
    # The response's metadata comes from the first chunk: not Azure's blank filter chunk.
    assert out["response"]["id"].startswith("chatcmpl-")
    assert out["response"]["modelId"] == "gpt-4o-2024-11-20"
    assert not out["response"]["timestamp"].startswith("1970")


def test_ai_sdk_generate_text_gets_azures_filter_results(
    node_ready: None, server: ServerProcess, azure: FakeAzure
) -> None:
    reply = Reply(text_chunks=TEXT, finish_reason="content_filter")
    expected = straight_from_azure(azure, reply).model_dump()
    azure.push(reply)
    out = ai_sdk(server, "generate")
    assert out["text"] == "".join(TEXT) and out["finishReason"] == "content-filter"
    assert filter_results(out["body"]) == filter_results(expected)


def test_ai_sdk_runs_a_tool_and_streams_the_answer(
    node_ready: None, server: ServerProcess, azure: FakeAzure
) -> None:
    azure.push(Reply(tool_calls=[CALL]), Reply(text_chunks=TEXT))
    out = ai_sdk(server, "tools", "Weather in Paris?")
    assert out["errors"] == []
    assert out["parts"] == [
        {"call": "get_weather", "input": {"city": "Paris"}},
        {"result": {"city": "Paris", "sky": "sunny"}},
        *TEXT,
    ]
    assert [step["finishReason"] for step in out["steps"]] == ["tool-calls", "stop"]
    first, second = azure.requests
    assert first.body["tools"][0]["function"]["name"] == "get_weather"
    called, result = second.body["messages"][-2:]
    assert called["tool_calls"][0]["id"] == "call_weather_1"
    assert result["role"] == "tool" and result["tool_call_id"] == "call_weather_1"
    assert json.loads(result["content"]) == {"city": "Paris", "sky": "sunny"}
