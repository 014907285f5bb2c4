"""Access control: API keys and CORS on the app in-process, and on a real server where it matters.

The gate's answers are checked over ASGI; streams through the gate, the refusal
to listen exposed without keys and listening exposed use a real server process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from streamsvc.web.auth import ApiKeyMiddleware
from tests.fake_azure import FakeAzure
from tests.harness import ServerProcess, asgi_client, free_port, read_sse, server_env

KEYS = ("key-one-0123456789", "key-two-abcdefghij")
CHAT = {"messages": [{"role": "user", "content": "Hello"}]}
INVALID_CONNECTOR = {
    "connector": {"runtime": {"language": "cobol", "entryPoint": "x"}, "files": {}}
}


@pytest.fixture(scope="module")
def keyed(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    process = ServerProcess(server_env(fake_azure, STREAMSVC_API_KEYS=" , ".join(KEYS)))
    yield process
    process.close()


def keyed_app(fake: FakeAzure) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """The app in-process with the two keys, as ``keyed`` runs it."""
    return asgi_client(server_env(fake, STREAMSVC_API_KEYS=" , ".join(KEYS)))


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "error": {"code": "unauthorized", "message": "a valid API key is required"}
    }


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer"},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Bearer {KEYS[0][:-1]}"},
        {"authorization": f"Bearer {KEYS[0]}x"},
        {"authorization": f"Bearer {KEYS[0].upper()}"},
        {"authorization": f"Basic {KEYS[0]}"},
        {"authorization": KEYS[0]},
        {"x-api-key": ""},
        {"x-api-key": "nope"},
        {"x-api-key": f"{KEYS[0]},{KEYS[1]}"},
    ],
)
async def test_protected_routes_refuse_a_missing_or_wrong_key(
    fake_azure: FakeAzure, headers: dict[str, str]
) -> None:
    async with keyed_app(fake_azure) as gate:
        for path, body in (("/chat", CHAT), ("/execute-connector", INVALID_CONNECTOR)):
            assert_unauthorized(await gate.post(path, json=body, headers=headers))


async def test_refusal_comes_before_reading_or_validating_the_body(fake_azure: FakeAzure) -> None:
    async with keyed_app(fake_azure) as gate:
        for path in ("/chat", "/execute-connector", "/chat/", "/%63hat", "/execute-connector?x=1"):
            assert_unauthorized(await gate.post(path, content=b"{not json"))
        # A method other than POST on a protected path is refused too, not described.
        assert_unauthorized(await gate.get("/chat"))
        sneaky = await gate.post("http://127.0.0.1//chat", json=CHAT)  # not "//host"
        assert sneaky.status_code in {401, 404}


async def test_each_configured_key_is_accepted_either_way(azure: FakeAzure) -> None:
    async with keyed_app(azure) as gate:
        for headers in (
            {"authorization": f"Bearer {KEYS[0]}"},
            {"authorization": f"bearer {KEYS[1]}"},
            {"x-api-key": KEYS[1]},
            {"x-api-key": KEYS[0]},
        ):
            response = await gate.post("/chat", json=CHAT, headers=headers)
            assert response.status_code == 200, headers
            assert response.json()["content"] == "echo: Hello"
            checked = await gate.post("/execute-connector", json=INVALID_CONNECTOR, headers=headers)
            assert checked.status_code == 400  # past the gate, into validation
            assert checked.json()["error"]["code"] == "invalid_connector"


async def test_streams_pass_the_gate_untouched(
    keyed: ServerProcess, azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    response = await read_sse(
        client,
        keyed.url + "/chat",
        {**CHAT, "stream": True},
        headers={"authorization": f"Bearer {KEYS[0]}"},
    )
    assert response.status == 200
    assert response.last.event == "done"
    assert response.last.data["content"] == "echo: Hello"


async def test_health_stays_open(fake_azure: FakeAzure) -> None:
    async with keyed_app(fake_azure) as gate:
        response = await gate.get("/health")
        assert response.status_code == 200
        assert response.json()["components"]["chat"]["state"] == "configured"


async def test_without_keys_nothing_is_asked(azure: FakeAzure) -> None:
    async with asgi_client(server_env(azure)) as app:
        response = await app.post("/chat", json=CHAT)
    assert response.status_code == 200


async def test_the_middleware_guards_only_its_paths_around_a_tiny_app() -> None:
    async def hello(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse(f"hello {scope['path']}")(scope, receive, send)

    gate = ApiKeyMiddleware(hello, keys=KEYS, protected=("/chat",))
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert_unauthorized(await client.get("/chat"))
        assert_unauthorized(await client.get("/chat", headers={"x-api-key": KEYS[0][:-1]}))
        bearer = await client.get("/chat", headers={"authorization": f"Bearer {KEYS[1]}"})
        header = await client.get("/chat", headers={"x-api-key": KEYS[0]})
        open_path = await client.get("/health")
    assert (bearer.status_code, bearer.text) == (200, "hello /chat")
    assert (header.status_code, header.text) == (200, "hello /chat")
    assert (open_path.status_code, open_path.text) == (200, "hello /health")


# -- exposure -------------------------------------------------------------------------------


def start_up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the server expecting it to refuse to start; it must exit on its own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC_")}
    return subprocess.run(
        [sys.executable, "-m", "streamsvc"],
        env={**base, "STREAMSVC_PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.internal"])
def test_refuses_a_non_loopback_address_without_keys(host: str) -> None:
    done = start_up({"STREAMSVC_HOST": host})
    assert done.returncode == 2
    assert "STREAMSVC_ALLOW_INSECURE" in done.stderr
    assert "STREAMSVC_API_KEYS" in done.stderr
    assert host in done.stderr
    assert "Traceback" not in done.stderr


def test_an_explicit_false_is_still_a_refusal() -> None:
    done = start_up({"STREAMSVC_HOST": "0.0.0.0", "STREAMSVC_ALLOW_INSECURE": "false"})
    assert done.returncode == 2
    assert "STREAMSVC_ALLOW_INSECURE" in done.stderr


@pytest.mark.parametrize(
    "extra",
    [{"STREAMSVC_API_KEYS": KEYS[0]}, {"STREAMSVC_ALLOW_INSECURE": "true"}],
    ids=["with-keys", "insecure"],
)
def test_listens_exposed_with_keys_or_when_told_to(
    start_server: Callable[..., ServerProcess], extra: dict[str, str]
) -> None:
    server = start_server(STREAMSVC_HOST="0.0.0.0", **extra)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    server.stop()
    assert "0.0.0.0" in server.log()


ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def cors(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    env = server_env(
        fake_azure, STREAMSVC_API_KEYS=KEYS[0], STREAMSVC_CORS_ORIGINS=f"{ORIGIN}, http://x:81"
    )
    process = ServerProcess(env)
    yield process
    process.close()


def cors_app(fake: FakeAzure) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """The app in-process with one key and two origins, as ``cors`` runs it."""
    env = server_env(
        fake, STREAMSVC_API_KEYS=KEYS[0], STREAMSVC_CORS_ORIGINS=f"{ORIGIN}, http://x:81"
    )
    return asgi_client(env)


async def test_an_allowed_origin_gets_its_preflight_answered_without_a_key(
    fake_azure: FakeAzure,
) -> None:
    async with cors_app(fake_azure) as cors_gate:
        preflight = {
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-request-id",
        }
        for path in ("/chat", "/execute-connector", "/v1/chat/completions"):
            answer = await cors_gate.options(path, headers=preflight)
            assert answer.status_code == 200, answer.text
            assert answer.headers["access-control-allow-origin"] == ORIGIN
            assert "POST" in answer.headers["access-control-allow-methods"]
            allowed = answer.headers["access-control-allow-headers"].lower()
            assert {"authorization", "content-type", "x-request-id"} <= set(allowed.split(", "))
        stranger = await cors_gate.options(
            "/chat", headers={**preflight, "origin": "https://evil.example"}
        )
        assert stranger.status_code == 403  # the Host/Origin gate, before CORS
        assert stranger.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in stranger.headers


async def test_an_allowed_origin_reads_streams_errors_and_the_request_id(
    cors: ServerProcess, client: httpx.AsyncClient
) -> None:
    headers = {"origin": ORIGIN, "authorization": f"Bearer {KEYS[0]}"}
    stream = await read_sse(client, cors.url + "/chat", {**CHAT, "stream": True}, headers=headers)
    assert stream.status == 200
    assert stream.headers["access-control-allow-origin"] == ORIGIN
    assert [event.event for event in stream.events][-1] == "done"
    assert stream.last.data["content"] == "echo: Hello"
    refused = await client.post(cors.url + "/chat", json=CHAT, headers={"origin": ORIGIN})
    assert_unauthorized(refused)  # and readable by the page:
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    exposed = refused.headers["access-control-expose-headers"].lower()
    assert {"x-request-id", "retry-after"} <= set(exposed.split(", "))
    assert refused.headers["x-request-id"]


async def test_without_origins_no_cors_header_is_sent(fake_azure: FakeAzure) -> None:
    async with keyed_app(fake_azure) as gate:
        preflight = {"origin": ORIGIN, "access-control-request-method": "POST"}
        answer = await gate.options("/chat", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        plain = await gate.post("/chat", json=CHAT, headers={"origin": ORIGIN})
        assert "access-control-allow-origin" not in plain.headers
