"""POST /chat against a real server process and the fake Azure upstream.

Covers the contract: streaming vs JSON, the final object, the parameters sent
upstream (deployment, defaults, reasoning families) and request validation.
Azure's failure behaviours are in ``test_azure.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.fake_azure import FakeAzure, Reply
from tests.harness import ServerProcess, read_sse

USER = [{"role": "user", "content": "Hello"}]
ANSWER_KEYS = {"id", "model", "content", "finish_reason", "usage", "run_id"}


async def test_stream_delivers_each_delta_as_it_arrives_then_the_json_answer(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["Hel", "lo", " there"], chunk_delay=0.4))
    response = await read_sse(client, server.url + "/chat", {"messages": USER, "stream": True})
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    deltas = response.named("delta")
    assert [d.data for d in deltas] == [
        {"content": "Hel"},
        {"content": "lo"},
        {"content": " there"},
    ]
    # Each delta left as it arrived: the first one reached us while the upstream
    # still had two paced chunks to send.
    assert deltas[1].at - deltas[0].at > 0.2
    assert deltas[2].at - deltas[1].at > 0.2
    assert response.last.at - deltas[0].at > 0.6
    done = response.last
    assert done.event == "done"
    assert set(done.data) == ANSWER_KEYS
    assert done.data["content"] == "Hello there"
    assert done.data["finish_reason"] == "stop"
    assert done.data["id"].startswith("chatcmpl-")
    # One prompt word, three content chunks (the fake counts them so).
    assert done.data["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    ids = [int(e.id or 0) for e in response.events]
    assert ids == list(range(1, len(response.events) + 1))
    sent = azure.requests[-1]
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}


async def test_final_event_equals_the_json_answer_for_the_same_reply(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    script = Reply(text_chunks=["one", " two"], finish_reason="length")
    azure.push(script, script)
    streamed = await read_sse(client, server.url + "/chat", {"messages": USER, "stream": True})
    plain = await client.post(server.url + "/chat", json={"messages": USER})
    assert plain.status_code == 200
    assert plain.headers["content-type"] == "application/json"
    answer = plain.json()
    final = streamed.last.data
    assert streamed.last.event == "done"
    assert set(answer) == ANSWER_KEYS
    # Same object except the upstream's per-completion id and the run's id.
    assert {**final, "id": None, "run_id": None} == {**answer, "id": None, "run_id": None}
    assert final["run_id"] == streamed.headers["x-run-id"] != answer["run_id"]
    assert answer["content"] == "one two"
    assert answer["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2
    # The JSON mode streams upstream too, and asks for usage.
    assert [r.body["stream_options"] for r in azure.requests] == [{"include_usage": True}] * 2


@pytest.mark.parametrize(
    ("extra", "headers", "streams"),
    [
        ({}, {"accept": "text/event-stream"}, True),
        ({}, {"accept": "application/json"}, False),
        ({}, {}, False),
        ({"stream": False}, {"accept": "text/event-stream"}, False),
        ({"stream": True}, {"accept": "application/json"}, True),
    ],
    ids=["accept-sse", "accept-json", "no-accept", "body-false-wins", "body-true-wins"],
)
async def test_accept_header_streams_unless_the_body_says_otherwise(
    server: ServerProcess,
    azure: FakeAzure,
    client: httpx.AsyncClient,
    extra: dict[str, Any],
    headers: dict[str, str],
    streams: bool,
) -> None:
    response = await client.post(
        server.url + "/chat", json={"messages": USER, **extra}, headers=headers
    )
    assert response.status_code == 200
    if streams:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "event: done" in response.text
    else:
        assert response.headers["content-type"] == "application/json"
        assert response.json()["content"] == "echo: Hello"


async def test_model_picks_the_deployment_and_explicit_parameters_pass_through(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    body = {"messages": USER, "model": "my-deployment", "temperature": 1.3, "max_tokens": 9}
    assert (await client.post(server.url + "/chat", json=body)).status_code == 200
    assert (await client.post(server.url + "/chat", json={"messages": USER})).status_code == 200
    chosen, default = azure.requests
    assert chosen.path == "/openai/deployments/my-deployment/chat/completions"
    assert chosen.query["api-version"] == "2024-10-21"
    assert (chosen.body["temperature"], chosen.body["max_tokens"]) == (1.3, 9)
    assert default.deployment == "gpt-4o"
    # The built-in defaults (the session server sets no OPENAI_* values).
    assert (default.body["temperature"], default.body["max_tokens"]) == (0.7, 2000)


@pytest.mark.parametrize("model", ["gpt-5", "gpt-5-mini", "o1", "o3-mini", "o4-mini", "O3"])
async def test_reasoning_deployments_get_max_completion_tokens_and_no_temperature(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient, model: str
) -> None:
    body = {"messages": USER, "model": model, "temperature": 0.2, "max_tokens": 50}
    assert (await client.post(server.url + "/chat", json=body)).status_code == 200
    sent = azure.requests[-1].body
    assert sent["max_completion_tokens"] == 50
    assert "max_tokens" not in sent
    assert "temperature" not in sent


async def test_defaults_and_reasoning_families_come_from_settings(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(
        OPENAI_TEMPERATURE="0.25", OPENAI_MAX_TOKENS="77", OPENAI_REASONING_MODELS="thinker, r1"
    )
    for model in ("gpt-4o", "o1", "thinker-large", "r1"):
        body = {"messages": USER, "model": model}
        assert (await client.post(server.url + "/chat", json=body)).status_code == 200
    plain, o1, thinker, r1 = (r.body for r in azure.requests)
    # Not reasoning models any more: o1 gets the configured defaults like gpt-4o.
    for sent in (plain, o1):
        assert (sent["temperature"], sent["max_tokens"]) == (0.25, 77)
        assert "max_completion_tokens" not in sent
    for sent in (thinker, r1):
        assert sent["max_completion_tokens"] == 77
        assert "temperature" not in sent and "max_tokens" not in sent


# ---- validation -----------------------------------------------------------------------------


async def test_every_role_and_text_parts_are_accepted(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}],
        },
        {"role": "assistant", "content": "Calling a tool."},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": "Thanks", "name": "ada"},
    ]
    response = await client.post(server.url + "/chat", json={"messages": messages})
    assert response.status_code == 200, response.text
    sent = azure.requests[-1].body["messages"]
    assert [m["role"] for m in sent] == [m["role"] for m in messages]
    assert sent[2]["content"] == "Hi you"
    assert sent[4]["tool_call_id"] == "call_1"
    assert sent[5]["name"] == "ada"


def _messages(count: int, text: str = "x") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}] * count


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "$.messages[0].role"),
        ({"messages": [{"role": "user"}]}, "$.messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "$.messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
            "$.messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
            "$.messages[0].content[0].x",
        ),
        ({"messages": USER, "stream_mode": "fast"}, "$.stream_mode"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "$.messages[0].extra"),
        ({"messages": []}, "$.messages"),
        ({"messages": _messages(513)}, "$.messages"),
        ({"messages": _messages(2, "y" * 600_000)}, "$.messages"),
        ({"messages": USER, "temperature": 2.01}, "$.temperature"),
        ({"messages": USER, "temperature": -0.1}, "$.temperature"),
        ({"messages": USER, "max_tokens": 0}, "$.max_tokens"),
        ({"messages": USER, "max_tokens": 1.5}, "$.max_tokens"),
        ({"messages": USER, "model": ""}, "$.model"),
        ({"messages": USER, "stream": "yes"}, "$.stream"),
        ({}, "$"),
        ([], "$"),
    ],
    ids=[
        "bad-role",
        "no-content",
        "content-int",
        "non-text-part",
        "part-unknown-field",
        "unknown-field",
        "message-unknown-field",
        "no-messages",
        "too-many-messages",
        "too-many-characters",
        "temperature-high",
        "temperature-negative",
        "max-tokens-zero",
        "max-tokens-float",
        "empty-model",
        "stream-string",
        "missing-messages",
        "not-an-object",
    ],
)
async def test_wrong_shapes_are_422_with_the_path(
    server: ServerProcess,
    azure: FakeAzure,
    client: httpx.AsyncClient,
    body: Any,
    path: str,
) -> None:
    response = await client.post(server.url + "/chat", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["path"] == path
    assert error["message"]
    assert azure.requests == []  # nothing reached the upstream


@pytest.mark.parametrize(
    "body",
    [
        {"messages": USER, "temperature": 0, "max_tokens": 1},
        {"messages": USER, "temperature": 2},
        {"messages": _messages(512)},
    ],
    ids=["lower-bounds", "temperature-2", "512-messages"],
)
async def test_bounds_are_inclusive(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await client.post(server.url + "/chat", json=body)
    assert response.status_code == 200, response.text
    assert len(azure.requests) == 1
