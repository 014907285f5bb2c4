"""The Docker boundary: which engine a client talks to, and how an absent one fails."""

from __future__ import annotations

import pytest

from streamsvc.errors import SandboxError
from streamsvc.sandbox.docker.api import connect, ping


@pytest.mark.docker
async def test_connect_takes_the_setting_or_the_default_never_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiodocker alone would read this and refuse to build a client at all.
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/streamsvc-absent.sock")
    docker = connect(None)  # DEFAULT_DOCKER_HOST, where this machine's engine listens
    try:
        await ping(docker)
    finally:
        await docker.close()
    monkeypatch.setenv("DOCKER_HOST", "")
    await connect(None).close()  # aiodocker alone: ValueError, "Missing protocol scheme"


async def test_an_absent_engine_fails_its_calls_not_the_client() -> None:
    docker = connect("unix:///nonexistent/streamsvc-absent.sock")
    try:
        with pytest.raises(SandboxError) as raised:
            await ping(docker)
        assert raised.value.code == "sandbox_unavailable"
        assert raised.value.status == 503
    finally:
        await docker.close()
