"""Request ids, the JSON access log and /metrics, on a real server process."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamsvc.web.auth import key_id
from tests.fake_azure import FakeAzure, Reply, rate_limited, server_error, unauthorized
from tests.harness import AZURE_KEY, ServerProcess, asgi_client, read_sse, server_env

API_KEY = "client-api-key-abcdef0123456789"
SECRET_TEXT = "the-launch-code-is-7f3a9c"  # message content: never in the log
V1 = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def access_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in server.log().splitlines():
        if '"streamsvc.access"' in line:
            lines.append(json.loads(line))
    return lines


async def access_line(server: ServerProcess, request_id: str) -> dict[str, Any]:
    """The access record of one request (written when its response is over)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [line for line in access_lines(server) if line["request_id"] == request_id]
        if found:
            assert len(found) == 1
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no access-log line for {request_id}:\n{server.log()}")


async def scrape(client: httpx.AsyncClient, server: ServerProcess) -> str:
    answer = await client.get(server.url + "/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return answer.text


async def v1_stream(
    client: httpx.AsyncClient,
    server: ServerProcess,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> list[str]:
    """The ``data:`` of each frame of a /v1/chat/completions stream."""
    url = server.url + V1
    async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as answer:
        assert answer.status_code == 200
        text = (await answer.aread()).decode()
    blocks = text.replace("\r\n", "\n").split("\n\n")
    return [block[len("data: ") :] for block in blocks if block.startswith("data: ")]


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def test_request_id_is_echoed_when_valid_and_generated_otherwise(
    fake_azure: FakeAzure,
) -> None:
    async with asgi_client(server_env(fake_azure)) as app:  # headers only: in-process
        offered = "req-2024.abc_DEF-" + "x" * 100
        echoed = await app.get("/health", headers={"X-Request-ID": offered})
        assert echoed.headers["x-request-id"] == offered

        generated = (await app.get("/health")).headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
        other = (await app.get("/health")).headers["x-request-id"]
        assert other != generated

        for bad in ("has space", "x" * 129, "semi;colon", "ünïcode"):
            answer = await app.get("/health", headers=[(b"X-Request-ID", bad.encode())])
            replaced = answer.headers["x-request-id"]
            assert replaced != bad and len(replaced) == 32
            assert answer.headers.get_list("x-request-id") == [replaced]

        # Errors carry it too (404 from the router, 401 from the API-key check).
        missing = await app.get("/nope", headers={"X-Request-ID": "r404"})
        assert missing.status_code == 404 and missing.headers["x-request-id"] == "r404"


async def test_access_log_is_json_with_facts_and_without_content_or_secrets(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_LOG_FORMAT="json", STREAMSVC_API_KEYS=API_KEY)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": [{"role": "user", "content": SECRET_TEXT}], "stream": True}

    azure.push(Reply(text_chunks=["Hel", "lo", SECRET_TEXT], chunk_delay=0.05))
    streamed = await read_sse(
        client, server.url + "/chat", body, headers={**auth, "X-Request-ID": "stream-1"}
    )
    assert streamed.status == 200 and streamed.headers["x-request-id"] == "stream-1"
    assert streamed.last.event == "done"
    usage = streamed.last.data["usage"]

    plain = await client.post(
        server.url + "/chat",
        json={**body, "stream": False},
        headers={**auth, "X-Request-ID": "plain-1"},
    )
    assert plain.status_code == 200
    denied = await client.post(
        server.url + "/chat", json=body, headers={"X-Request-ID": "denied-1"}
    )
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "denied-1"

    line = await access_line(server, "stream-1")
    assert line["logger"] == "streamsvc.access" and line["level"] == "info"
    assert line["method"] == "POST" and line["path"] == "/chat" and line["route"] == "/chat"
    assert line["status"] == 200 and line["streamed"] is True
    assert line["bytes_sent"] > 100
    # The first token came after the upstream's first 50 ms pause; the whole stream took longer.
    assert 40 <= line["ttft_ms"] < line["duration_ms"]
    assert line["duration_ms"] >= 140
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"] == 3
    assert line["total_tokens"] == usage["total_tokens"]

    line = await access_line(server, "plain-1")
    assert line["streamed"] is False and line["status"] == 200
    assert line["bytes_sent"] == len(plain.content)
    assert line["ttft_ms"] > 0 and line["completion_tokens"] > 0

    line = await access_line(server, "denied-1")
    assert line["status"] == 401 and line["error"] == "unauthorized"
    assert "ttft_ms" not in line

    log = server.log()
    for line_text in log.splitlines():
        json.loads(line_text)  # every line is one JSON object
    assert SECRET_TEXT not in log
    assert API_KEY not in log and AZURE_KEY not in log


async def test_content_is_logged_at_debug_only_when_enabled(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(
        STREAMSVC_LOG_FORMAT="json", STREAMSVC_LOG_LEVEL="debug", STREAMSVC_LOG_CONTENT="true"
    )
    azure.push(Reply(text_chunks=["sun", "ny"]))
    answer = await client.post(
        server.url + "/chat",
        json={"messages": [{"role": "user", "content": "weather?"}]},
        headers={"X-Request-ID": "content-1"},
    )
    assert answer.status_code == 200
    await access_line(server, "content-1")
    records = [json.loads(line) for line in server.log().splitlines()]
    content = [r for r in records if r["logger"] == "streamsvc.content"]
    assert [r["level"] for r in content] == ["debug"]
    assert content[0]["request_id"] == "content-1"
    assert content[0]["content"]["content"] == "sunny"


async def test_text_format_is_the_default_and_still_carries_the_fields(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    request_id = uuid.uuid4().hex
    await client.get(server.url + "/health", headers={"X-Request-ID": request_id})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in server.log().splitlines() if request_id in line]
        if lines:
            break
        await asyncio.sleep(0.05)
    (line,) = lines
    assert " INFO streamsvc.access: GET /health 200 {" in line
    fields = json.loads(line[line.index("{") :])
    assert fields["request_id"] == request_id and fields["status"] == 200


async def test_metrics_count_requests_errors_and_first_tokens(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    before = await scrape(client, server)
    for name in (
        "streamsvc_active_streams",
        "streamsvc_active_runs",
        "streamsvc_queue_length",
        "streamsvc_time_to_first_token_seconds",
    ):
        assert f"# TYPE {name} " in before

    await client.get(server.url + "/health")
    await client.get(server.url + "/health")
    await client.get(server.url + "/nope")
    azure.push(Reply(text_chunks=["a", "b"]))
    ok = await read_sse(
        client, server.url + "/chat", {"messages": [{"role": "user", "content": "hi"}]}
    )
    assert ok.last.event == "done"
    azure.push(unauthorized())
    refused = await client.post(
        server.url + "/chat", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert refused.status_code == 502
    azure.push(Reply(text_chunks=["a", "b", "c"], drop_after=1))
    dropped = await read_sse(
        client, server.url + "/chat", {"messages": [{"role": "user", "content": "hi"}]}
    )
    assert dropped.status == 200 and dropped.last.event == "error"
    dropped_code = dropped.last.data["error"]["code"]

    await asyncio.sleep(0.2)  # the last access record is written just after the response
    after = await scrape(client, server)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("streamsvc_requests_total", route="/health", code="200") == 2
    assert moved("streamsvc_requests_total", route="unmatched", code="404") == 1
    assert moved("streamsvc_errors_total", route="unmatched", code="404", error="not_found") == 1
    assert moved("streamsvc_requests_total", route="/chat", code="200") == 2
    assert moved("streamsvc_errors_total", route="/chat", code="502", error="upstream_auth") == 1
    assert moved("streamsvc_errors_total", route="/chat", code="200", error=dropped_code) == 1
    assert moved("streamsvc_errors_total", route="/health", code="200", error="http_200") == 0
    # Two streams reached a first token (the refused one did not).
    assert moved("streamsvc_time_to_first_token_seconds_count", route="/chat") == 2
    assert moved("streamsvc_chat_tokens_total", kind="completion") == 2
    assert sample(after, "streamsvc_active_streams") == 0


async def test_v1_metrics_count_failed_streams_first_tokens_and_tokens_like_chat(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    before = await scrape(client, server)
    azure.push(Reply(text_chunks=["a", "b"]))
    assert (await v1_stream(client, server, {"messages": USER}))[-1] == "[DONE]"
    azure.push(Reply(text_chunks=["one", "two", "three"], drop_after=1))
    broken = await v1_stream(client, server, {"messages": USER})
    assert "[DONE]" not in broken
    assert json.loads(broken[-1])["error"]["code"] == "upstream_error"
    azure.push(Reply(text_chunks=["a", "b", "c"]))
    plain = await client.post(server.url + V1, json={"messages": USER})
    assert plain.status_code == 200
    azure.push(unauthorized())
    refused = await client.post(server.url + V1, json={"messages": USER})
    assert refused.status_code == 502

    await asyncio.sleep(0.2)  # the last access record is written just after the response
    after = await scrape(client, server)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("streamsvc_requests_total", route=V1, code="200") == 3
    # The stream that broke off after its headers is an error, by the code it ended with.
    assert moved("streamsvc_errors_total", route=V1, code="200", error="upstream_error") == 1
    assert moved("streamsvc_errors_total", route=V1, code="502", error="upstream_auth") == 1
    # Three answers reached a first token; the usage of the two complete ones was counted.
    assert moved("streamsvc_time_to_first_token_seconds_count", route=V1) == 3
    assert moved("streamsvc_chat_tokens_total", kind="completion") == 2 + 3
    assert sample(after, "streamsvc_active_streams") == 0


async def test_v1_errors_count_by_our_code_while_the_client_sees_the_upstreams(
    server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    """An upstream's own codes reach /v1 clients, but never become metric labels."""
    before = await scrape(client, server)
    made_up = {"code": "made_up_code_7", "message": "no", "type": None, "param": None}
    azure.push(Reply(status=400, error={"error": made_up}))
    refused = await client.post(server.url + V1, json={"messages": USER})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "made_up_code_7"
    await asyncio.sleep(0.2)  # the access record is written just after the response
    after = await scrape(client, server)
    moved = sample(after, "streamsvc_errors_total", route=V1, code="400", error="upstream_rejected")
    assert (
        moved - sample(before, "streamsvc_errors_total", route=V1, error="upstream_rejected") == 1
    )
    assert "made_up_code_7" not in after


async def test_v1_access_log_has_the_facts_and_content_only_when_enabled(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(
        STREAMSVC_LOG_FORMAT="json", STREAMSVC_LOG_LEVEL="debug", STREAMSVC_LOG_CONTENT="true"
    )
    azure.push(Reply(text_chunks=["sun", "ny"]))
    await v1_stream(client, server, {"messages": USER}, {"X-Request-ID": "v1-stream"})
    azure.push(Reply(text_chunks=["one", "two", "three"], drop_after=1))
    await v1_stream(client, server, {"messages": USER}, {"X-Request-ID": "v1-broken"})
    azure.push(Reply(text_chunks=["rai", "ny"]))
    plain = await client.post(
        server.url + V1, json={"messages": USER}, headers={"X-Request-ID": "v1-plain"}
    )
    assert plain.status_code == 200

    line = await access_line(server, "v1-stream")
    assert line["route"] == V1 and line["status"] == 200 and line["streamed"] is True
    assert "error" not in line
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    assert line["completion_tokens"] == 2 and line["prompt_tokens"] > 0
    line = await access_line(server, "v1-broken")
    assert line["status"] == 200 and line["streamed"] is True
    assert line["error"] == "upstream_error" and line["ttft_ms"] > 0
    assert "completion_tokens" not in line
    line = await access_line(server, "v1-plain")
    assert line["streamed"] is False and "error" not in line
    assert line["ttft_ms"] > 0 and line["completion_tokens"] == 2

    # The whole answer, once per complete answer, at debug level (none for the broken one).
    records = [json.loads(line) for line in server.log().splitlines()]
    content = {r["request_id"]: r for r in records if r["logger"] == "streamsvc.content"}
    assert sorted(content) == ["v1-plain", "v1-stream"]
    for request_id, text in (("v1-stream", "sunny"), ("v1-plain", "rainy")):
        record = content[request_id]
        assert record["level"] == "debug"
        assert record["content"]["object"] == "chat.completion"
        assert record["content"]["choices"][0]["message"]["content"] == text
        assert record["content"]["usage"]["completion_tokens"] == 2

    # Without STREAMSVC_LOG_CONTENT, even at debug level, no answer is logged (sse-starlette
    # would log every frame at debug).
    quiet = start_server(STREAMSVC_LOG_FORMAT="json", STREAMSVC_LOG_LEVEL="debug")
    azure.push(Reply(text_chunks=[SECRET_TEXT]))
    frames = await v1_stream(client, quiet, {"messages": USER}, {"X-Request-ID": "v1-quiet"})
    assert any(SECRET_TEXT in frame for frame in frames)
    azure.push(Reply(text_chunks=[SECRET_TEXT]))
    streamed = await read_sse(
        client,
        quiet.url + "/chat",
        {"messages": USER, "stream": True},
        headers={"X-Request-ID": "chat-quiet"},
    )
    assert streamed.last.data["content"] == SECRET_TEXT
    await access_line(quiet, "v1-quiet")
    await access_line(quiet, "chat-quiet")
    assert '"streamsvc.content"' not in quiet.log()
    assert SECRET_TEXT not in quiet.log()


@pytest.mark.docker
async def test_executions_log_exit_code_and_ok(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_LOG_FORMAT="json")
    secret = "connector-secret-value-0123456789"
    program = 'import sys\nprint(\'{"ok": true, "result": 1}\')\nsys.exit(3)\n'
    body = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py"},
            "files": {"main.py": program},
        },
        "env": {"TOKEN": secret},
        "stream": False,
    }
    answer = await client.post(
        server.url + "/execute-connector", json=body, headers={"X-Request-ID": "run-1"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["exit_code"] == 3
    line = await access_line(server, "run-1")
    assert line["route"] == "/execute-connector" and line["status"] == 200
    assert line["exit_code"] == 3 and line["ok"] is False
    assert secret not in server.log()


async def test_chat_outcomes_retries_fallbacks_and_the_access_log_fields(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(
        STREAMSVC_LOG_FORMAT="json",
        STREAMSVC_API_KEYS=API_KEY,
        STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS="backup-1",
        STREAMSVC_MAX_RETRIES="1",
    )
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": USER, "stream": True}
    before = await scrape(client, server)

    async def chat(request_id: str, model: str = "gpt-4o", **options: Any) -> Any:
        headers = {**auth, "X-Request-ID": request_id}
        asked = {**body, "model": model}
        return await read_sse(client, server.url + "/chat", asked, headers=headers, **options)

    azure.push(Reply(text_chunks=["a", "b"]))
    assert (await chat("o-done")).last.event == "done"
    azure.push(rate_limited(retry_after_ms=50, retry_after=None))  # then the default echo
    assert (await chat("o-retry")).last.event == "done"
    azure.push(server_error(500), server_error(500))  # its retry fails too: backup-1 answers
    assert (await chat("o-fallback")).last.event == "done"
    assert [r.deployment for r in azure.requests][-3:] == ["gpt-4o", "gpt-4o", "backup-1"]
    azure.push(Reply(text_chunks=["a", "b", "c", "d"], chunk_delay=0.3))
    assert len((await chat("o-cancel", stop_after=1)).events) == 1  # then hangs up
    azure.push(Reply(text_chunks=["a"], first_byte_delay=4))  # no first token within 3 s
    assert (await chat("o-timeout", model="solo")).status == 504  # solo: no fallback

    line = await access_line(server, "o-done")
    assert line["client"] == "127.0.0.1" and line["key_id"] == key_id(API_KEY)
    assert line["model"] == "gpt-4o" and line["outcome"] == "completed"
    assert "cancel_reason" not in line
    line = await access_line(server, "o-cancel")
    assert line["outcome"] == "cancelled" and line["cancel_reason"] == "client_disconnected"
    assert line["status"] == 200 and line["key_id"] == key_id(API_KEY)
    line = await access_line(server, "o-timeout")
    assert line["outcome"] == "timeout" and line["error"] == "upstream_timeout"
    assert API_KEY not in server.log()

    after = await scrape(client, server)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    outcomes = "streamsvc_run_outcomes_total"
    assert moved(outcomes, kind="chat", outcome="completed") == 3
    assert moved(outcomes, kind="chat", outcome="cancelled") == 1
    assert moved(outcomes, kind="chat", outcome="timeout") == 1
    attempts = "streamsvc_upstream_attempts_total"
    assert moved(attempts, action="retry", reason="upstream_rate_limited") == 1
    assert moved(attempts, action="retry", reason="upstream_error") == 1
    assert moved(attempts, action="fallback", reason="upstream_error") == 1
    # Usage by key and model: the deployment asked for, whichever answered.
    key = {"key": key_id(API_KEY), "model": "gpt-4o", "kind": "completion"}
    assert moved("streamsvc_key_tokens_total", **key) >= 2
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert sample(after, name) > 0


async def test_metrics_sum_over_two_workers(
    start_server: Callable[..., ServerProcess], azure: FakeAzure
) -> None:
    """Every scrape, whichever worker answers it, reports every worker's requests."""
    server = start_server(STREAMSVC_WORKERS="2")
    workers = psutil.Process(server.process.pid).children()
    assert len(workers) == 2
    served: dict[int, int] = {}
    # A fresh connection per request; each worker paused in turn, so the other serves them.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=fresh) as client:
        for paused, count in zip(workers, (3, 4), strict=True):
            paused.suspend()
            try:
                for _ in range(count):
                    azure.push(Reply(text_chunks=["x", "y"]))
                    answer = await client.post(server.url + "/chat", json={"messages": USER})
                    assert answer.status_code == 200
                    assert (await client.get(server.url + "/health/live")).status_code == 200
            finally:
                paused.resume()
            served[paused.pid] = count
        await asyncio.sleep(1.5)  # the gauges are written every second
        for _ in range(6):
            text = await scrape(client, server)
            assert sample(text, "streamsvc_requests_total", route="/chat", code="200") == 7
            assert sample(text, "streamsvc_requests_total", route="/health/live", code="200") == 7
            assert sample(text, "streamsvc_chat_tokens_total", kind="completion") == 14
            outcome = {"kind": "chat", "outcome": "completed"}
            assert sample(text, "streamsvc_run_outcomes_total", **outcome) == 7
            durations = sample(text, "streamsvc_request_duration_seconds_count", route="/chat")
            assert durations == 7
            assert sample(text, "streamsvc_active_streams") == 0
            pids = {
                s.labels["pid"]
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "process_cpu_seconds_total"
            }
            assert pids == {str(w.pid) for w in workers}
    assert sum(served.values()) == 7


def _run(program: str, **runtime: Any) -> dict[str, Any]:
    files = {"main.py": program}
    runtime = {"language": "python", "entryPoint": "main.py", **runtime}
    return {"connector": {"runtime": runtime, "files": files}, "stream": False}


@pytest.mark.docker
async def test_connector_outcomes_queue_wait_and_the_entry_point(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_LOG_FORMAT="json", STREAMSVC_OUTPUT_CAP_BYTES="65536")
    url = server.url + "/execute-connector"
    before = await scrape(client, server)
    runs = {
        "completed": _run('print(\'{"ok": true, "result": 1}\')'),
        "program_error": _run("raise SystemExit(3)"),
        "timeout": _run("import time\ntime.sleep(30)", timeoutMs=1000),
        "output_limit": _run("print('x' * 200_000, flush=True)\nimport time\ntime.sleep(30)"),
        "oom": _run("chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))", memoryMb=64),
    }
    for expected, body in runs.items():
        answer = await client.post(url, json=body, headers={"X-Request-ID": f"run-{expected}"})
        assert answer.status_code == 200, answer.text
    refused = await client.post(
        url, json=_run("print(1)", memoryMb=1), headers={"X-Request-ID": "run-refused"}
    )
    assert refused.status_code == 400
    # A streamed run whose client hangs up at its first line of output.
    body = {**_run("print('started', flush=True)\nimport time\ntime.sleep(30)"), "stream": True}
    headers = {"X-Request-ID": "run-cancelled", "accept": "text/event-stream"}
    async with client.stream("POST", url, json=body, headers=headers) as stream:
        async for text in stream.aiter_lines():
            if text == "event: stdout":
                break

    for expected in (*runs, "refused", "cancelled"):
        line = await access_line(server, f"run-{expected}")
        assert line["outcome"] == expected, line
        assert line.get("entry_point") == (None if expected == "refused" else "main.py")
    assert line["cancel_reason"] == "client_disconnected"
    after = await scrape(client, server)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    for expected in (*runs, "refused", "cancelled"):
        assert moved("streamsvc_run_outcomes_total", kind="connector", outcome=expected) == 1
    # Every run that got a slot waited for it (none here for long: one at a time).
    assert moved("streamsvc_queue_wait_seconds_count") == len(runs) + 1
    assert moved("streamsvc_queue_wait_seconds_sum") < 5
    assert "# TYPE streamsvc_dependency_install_seconds histogram" in after
