"""Chat providers: Entra ID tokens, an OpenAI-compatible base URL, and deployment fallback.

Fallback and the OpenAI-compatible provider run on real server processes
against the fake upstream (which serves Azure's route and OpenAI's
``/v1/chat/completions``). Entra ID auth is checked in-process with a token
provider stub in place of azure-identity's (so the optional package is not
needed), through the real SDK to a fake that accepts only that bearer token;
without the package, start-up fails with a message naming the setting.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import httpx
import httpx2
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from streamsvc.chat.provider import ENTRA_SCOPE, create_provider, has_azure_identity, timed_out
from streamsvc.chat.types import UpstreamChunk
from streamsvc.errors import UpstreamAuth
from streamsvc.settings import ChatSettings, load_settings
from tests.fake_azure import FakeAzure, Reply, rate_limited, server_error, unauthorized
from tests.harness import AZURE_KEY, ROOT, ServerProcess, read_sse, server_env

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
PLAIN = {"messages": USER}
STREAM = {"messages": USER, "stream": True}


# ---- transport errors -------------------------------------------------------------------------


def _raised(error: BaseException, cause: BaseException | None) -> BaseException:
    try:
        raise error from cause
    except BaseException as caught:
        return caught


def test_a_timeout_shaped_aiohttp_error_is_judged_by_its_cause() -> None:
    """The SDK's aiohttp transport maps refused and disconnected to ``ConnectTimeout``."""
    refused = aiohttp.ClientConnectorError(
        aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None),
        ConnectionRefusedError(111, "refused"),
    )
    assert not timed_out(_raised(httpx2.ConnectTimeout("x"), refused))
    assert not timed_out(_raised(httpx2.ConnectTimeout("x"), aiohttp.ServerDisconnectedError()))
    assert timed_out(_raised(httpx2.ReadTimeout("x"), aiohttp.SocketTimeoutError()))
    assert timed_out(_raised(httpx2.ConnectTimeout("x"), aiohttp.ConnectionTimeoutError()))
    assert timed_out(httpx2.ReadTimeout("x"))  # httpx's own transport: a timeout is a timeout


# ---- Microsoft Entra ID -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def entra_fake() -> Iterator[FakeAzure]:
    with FakeAzure(api_key="key-we-must-not-send", ad_token="entra-token-1") as fake:
        yield fake


def entra_settings(fake: FakeAzure) -> ChatSettings:
    return load_settings(
        {
            "AZURE_OPENAI_AUTH": "entra",
            "AZURE_OPENAI_ENDPOINT": fake.url,
            "AZURE_OPENAI_DEPLOYMENT": "gpt-4o",
        },
        None,
    ).chat


async def drain(chunks: AsyncIterator[UpstreamChunk]) -> list[UpstreamChunk]:
    return [chunk async for chunk in chunks]


async def test_entra_auth_sends_the_token_providers_bearer_token_and_no_key(
    entra_fake: FakeAzure,
) -> None:
    entra_fake.reset()
    settings = entra_settings(entra_fake)
    assert settings.configured  # no API key needed
    calls = []

    async def token() -> str:
        calls.append(1)
        return "entra-token-1"

    provider = create_provider(settings, token_provider=token)
    try:
        body = {"model": "gpt-4o", "messages": USER, "stream": True}
        chunks = await drain(provider.completion([body]))
        await drain(provider.completion([body]))
    finally:
        await provider.aclose()
    text = "".join(
        c["choices"][0].get("delta", {}).get("content") or "" for c in chunks if c["choices"]
    )
    assert text == "echo: Hello"
    first, second = entra_fake.requests
    assert first.headers["authorization"] == "Bearer entra-token-1"
    assert "api-key" not in first.headers
    assert first.path == "/openai/deployments/gpt-4o/chat/completions"
    assert len(calls) >= 1  # asked for a token (the SDK may cache it between requests)
    assert second.headers["authorization"] == "Bearer entra-token-1"


async def test_a_rejected_entra_token_is_upstream_auth(entra_fake: FakeAzure) -> None:
    entra_fake.reset()

    async def stale() -> str:
        return "expired-token"

    provider = create_provider(entra_settings(entra_fake), token_provider=stale)
    try:
        with pytest.raises(UpstreamAuth):
            await drain(provider.completion([{"model": "gpt-4o", "messages": USER}]))
    finally:
        await provider.aclose()
    assert [r.headers["authorization"] for r in entra_fake.requests] == ["Bearer expired-token"]


@pytest.mark.skipif(has_azure_identity(), reason="azure-identity is installed")
def test_entra_without_azure_identity_fails_start_up_naming_the_setting(
    fake_azure: FakeAzure,
) -> None:
    env = {k: v for k, v in server_env(fake_azure).items() if k != "AZURE_OPENAI_API_KEY"} | {
        "AZURE_OPENAI_AUTH": "entra",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "streamsvc"],
        env=env,
        cwd=ROOT / "tests",  # no .env here
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "AZURE_OPENAI_AUTH" in result.stderr and "azure-identity" in result.stderr
    assert "Traceback" not in result.stderr
    assert ENTRA_SCOPE.startswith("https://cognitiveservices.azure.com/")


# ---- any OpenAI-compatible base URL -------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_server(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    env = server_env(
        fake_azure,
        STREAMSVC_CHAT_PROVIDER="openai",
        OPENAI_BASE_URL=fake_azure.url + "/v1",
        OPENAI_API_KEY=AZURE_KEY,
        OPENAI_MODEL="llama3.1",
        AZURE_OPENAI_API_KEY="",
        AZURE_OPENAI_ENDPOINT="",
        AZURE_OPENAI_DEPLOYMENT="",
    )
    process = ServerProcess(env)
    yield process
    process.close()


async def test_openai_compatible_base_url_serves_chat(
    openai_server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    health = (await client.get(openai_server.url + "/health")).json()
    assert health["components"]["chat"] == {"state": "configured", "deployment": "llama3.1"}
    azure.push(Reply(text_chunks=["Hi", " there"]))
    streamed = await read_sse(client, openai_server.url + "/chat", STREAM)
    assert [e.event for e in streamed.events] == ["delta", "delta", "done"]
    assert streamed.last.data["content"] == "Hi there"
    assert streamed.last.data["usage"]["total_tokens"] == 3
    plain = await client.post(openai_server.url + "/chat", json={**PLAIN, "model": "qwen2.5"})
    assert plain.json()["content"] == "echo: Hello"
    first, second = azure.requests
    assert first.path == second.path == "/v1/chat/completions"
    assert first.query == {}  # no api-version
    assert first.headers["authorization"] == f"Bearer {AZURE_KEY}"
    assert "api-key" not in first.headers
    assert (first.deployment, second.deployment) == ("llama3.1", "qwen2.5")
    assert first.body["stream_options"] == {"include_usage": True}


async def test_openai_compatible_base_url_behind_the_v1_endpoint(
    openai_server: ServerProcess, azure: FakeAzure
) -> None:
    azure.push(Reply(text_chunks=["a", "b"]))
    base = openai_server.url + "/v1"
    async with AsyncOpenAI(base_url=base, api_key="unused", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="llama3.1", messages=USER, stream=True)
        chunks = [chunk async for chunk in stream]
        completion = await sdk.chat.completions.create(model="llama3.1", messages=USER)
    # OpenAI's wire format: no Azure prompt-filter chunk in front.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ab"
    assert completion.choices[0].message.content == "echo: Hello"
    assert [r.path for r in azure.requests] == ["/v1/chat/completions"] * 2


async def test_a_wrong_openai_key_is_upstream_auth(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(
        STREAMSVC_CHAT_PROVIDER="openai",
        OPENAI_BASE_URL=azure.url + "/v1",
        OPENAI_API_KEY="wrong-0penai-key-5ecret",
        OPENAI_MODEL="llama3.1",
    )
    response = await client.post(server.url + "/chat", json=PLAIN)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_auth"
    assert "wrong-0penai-key-5ecret" not in response.text + server.log()
    unset = start_server(STREAMSVC_CHAT_PROVIDER="openai")  # OPENAI_MODEL missing
    refused = await client.post(unset.url + "/chat", json=PLAIN)
    assert refused.status_code == 503
    assert "OPENAI_MODEL" in refused.json()["error"]["message"]


# ---- fallback across deployments ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fallback_server(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    env = server_env(
        fake_azure,
        STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS="backup-1, o3-backup",
        STREAMSVC_MAX_RETRIES="0",
    )
    process = ServerProcess(env)
    yield process
    process.close()


def deployments(fake: FakeAzure) -> list[str]:
    return [r.deployment for r in fake.requests]


@pytest.mark.parametrize("route", ["/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("failure", [rate_limited(), server_error(500), server_error(503)])
async def test_a_429_or_5xx_moves_on_to_the_next_deployment(
    fallback_server: ServerProcess,
    azure: FakeAzure,
    client: httpx.AsyncClient,
    route: str,
    failure: Reply,
) -> None:
    azure.push(failure)
    response = await client.post(fallback_server.url + route, json={**PLAIN, "stream": True})
    assert response.status_code == 200
    assert ("event: done" if route == "/chat" else "data: [DONE]") in response.text
    assert deployments(azure) == ["gpt-4o", "backup-1"]


async def test_fallback_goes_down_the_list_in_order_and_each_gets_its_own_limits(
    fallback_server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(rate_limited(), server_error(502))
    response = await client.post(fallback_server.url + "/chat", json=PLAIN)
    assert response.status_code == 200
    assert response.json()["content"] == "echo: Hello"
    assert deployments(azure) == ["gpt-4o", "backup-1", "o3-backup"]
    primary, backup, reasoning = (r.body for r in azure.requests)
    assert (primary["max_tokens"], backup["max_tokens"]) == (2000, 2000)
    # The reasoning-model rule applies per deployment.
    assert reasoning["max_completion_tokens"] == 2000 and "temperature" not in reasoning


async def test_when_every_deployment_fails_the_last_failure_is_the_answer(
    fallback_server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(server_error(500), rate_limited(), rate_limited(retry_after_ms=None, retry_after=7))
    response = await client.post(fallback_server.url + "/chat", json=STREAM)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert deployments(azure) == ["gpt-4o", "backup-1", "o3-backup"]


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (Reply(status=400, error={"error": {"code": "BadRequest", "message": "bad"}}), 400),
        (unauthorized(), 502),
    ],
    ids=["400", "401"],
)
@pytest.mark.parametrize("route", ["/chat", "/v1/chat/completions"])
async def test_a_400_or_401_does_not_fall_back(
    fallback_server: ServerProcess,
    azure: FakeAzure,
    client: httpx.AsyncClient,
    failure: Reply,
    status: int,
    route: str,
) -> None:
    azure.push(failure)
    response = await client.post(fallback_server.url + route, json=PLAIN)
    assert response.status_code == status
    assert deployments(azure) == ["gpt-4o"]


async def test_fallback_stays_among_the_configured_deployments(
    fallback_server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(rate_limited(), rate_limited(), server_error())
    other = await client.post(fallback_server.url + "/chat", json={**PLAIN, "model": "other"})
    assert other.status_code == 429
    assert deployments(azure) == ["other"]  # not one of ours: no substitute
    azure.reset()
    azure.push(rate_limited(), server_error())
    backup = await client.post(fallback_server.url + "/chat", json={**PLAIN, "model": "backup-1"})
    assert backup.status_code == 200
    assert deployments(azure) == ["backup-1", "gpt-4o", "o3-backup"]


async def test_no_first_token_in_time_falls_back_but_a_break_after_it_does_not(
    fallback_server: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    azure.push(Reply(text_chunks=["late"], chunk_delay=10))
    response = await client.post(fallback_server.url + "/chat", json=PLAIN)
    assert response.status_code == 200
    assert deployments(azure) == ["gpt-4o", "backup-1"]
    azure.reset()
    azure.push(Reply(text_chunks=["one", "two"], drop_after=1))
    broken = await read_sse(client, fallback_server.url + "/chat", STREAM)
    assert [e.event for e in broken.events] == ["delta", "error"]
    assert deployments(azure) == ["gpt-4o"]  # a token was out: too late to switch


async def test_each_deployment_gets_its_own_retries(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS="backup-1", STREAMSVC_MAX_RETRIES="1")
    fast = rate_limited(retry_after_ms=50, retry_after=None)
    azure.push(fast, fast, fast)
    response = await client.post(server.url + "/chat", json=PLAIN)
    assert response.status_code == 200
    assert deployments(azure) == ["gpt-4o", "gpt-4o", "backup-1", "backup-1"]
