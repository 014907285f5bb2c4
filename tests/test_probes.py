"""The probes: /health/live, /health/ready (503 while a component is down or draining), /health."""

from __future__ import annotations

import httpx
import pytest

from streamsvc.settings import load_settings
from streamsvc.web.app import create_app
from streamsvc.web.services import installed
from tests.fake_azure import FakeAzure
from tests.harness import NO_DOCKER, ServerProcess, asgi_client, server_env


async def test_live_is_200_and_ready_is_503_while_the_engine_is_unreachable(
    fake_azure: FakeAzure,
) -> None:
    async with asgi_client(server_env(fake_azure)) as app:  # its Docker host is nowhere
        live = await app.get("/health/live")
        assert live.status_code == 200 and live.json() == {"status": "live"}
        ready = await app.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "not_ready",
            "reasons": ["sandbox: the Docker engine is unreachable"],
        }
        # /health stays as it was: always 200, the component states inside.
        health = await app.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["components"]["sandbox"]["state"] == "unavailable"


async def test_ready_is_503_when_chat_is_configured_but_its_client_is_not_open(
    fake_azure: FakeAzure,
) -> None:
    # The app before its lifespan ran: no upstream client, no sandbox.
    app = create_app(load_settings({"DOCKER_HOST": NO_DOCKER, **server_env(fake_azure)}, None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["reasons"] == [
            "chat: configured, but its upstream client is not open",
            "sandbox: not started",
        ]
        assert (await client.get("/health/live")).status_code == 200


@pytest.mark.docker
async def test_ready_on_a_real_server_then_503_while_draining(client: httpx.AsyncClient) -> None:
    # Without chat settings chat is not required; the sandbox is, and its engine answers.
    server = ServerProcess({"STREAMSVC_ALLOW_BRIDGE": "false"})
    try:
        ready = await client.get(server.url + "/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready"}
    finally:
        server.close()
    # Draining (set by serving.server on SIGTERM, before streams are interrupted).
    app = create_app(load_settings({"STREAMSVC_ALLOW_BRIDGE": "false"}, None))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as local,
    ):
        assert (await local.get("/health/ready")).status_code == 200
        installed(app).streams.draining = True
        ready = await local.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["reasons"] == ["draining: the server is shutting down"]
        assert (await local.get("/health/live")).status_code == 200
