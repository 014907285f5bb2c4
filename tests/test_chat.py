"""POST /chat against a real server process and the fake Azure upstream."""

from __future__ import annotations

import httpx

from tests.fake_azure import FakeAzure, Reply
from tests.harness import ServerProcess, read_sse

USER = [{"role": "user", "content": "Hello"}]


async def test_stream_delivers_each_delta_then_the_json_answer(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["Hel", "lo", " there"], chunk_delay=0.2))
    response = await read_sse(client, server.url + "/chat", {"messages": USER, "stream": True})
    assert response.status == 200
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    deltas = response.named("delta")
    assert [d.data["content"] for d in deltas] == ["Hel", "lo", " there"]
    # Delivered as they arrived, not buffered: 0.2 s apart on the wire.
    assert deltas[2].at - deltas[0].at > 0.3
    done = response.last
    assert done.event == "done"
    assert done.data["content"] == "Hello there"
    assert done.data["finish_reason"] == "stop"
    assert done.data["usage"]["total_tokens"] == (
        done.data["usage"]["prompt_tokens"] + done.data["usage"]["completion_tokens"]
    )
    assert [int(e.id or 0) for e in response.events] == list(range(1, len(response.events) + 1))
    sent = azure.requests[-1]
    assert sent.deployment == "gpt-4o"
    assert sent.body["stream_options"] == {"include_usage": True}

    plain = await client.post(server.url + "/chat", json={"messages": USER})
    assert plain.headers["content-type"] == "application/json"
    answer = plain.json()
    assert set(answer) == {"id", "model", "content", "finish_reason", "usage"}
    assert answer["content"] == "echo: Hello"
