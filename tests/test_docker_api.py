"""The Docker boundary: which engine a client talks to, and how an absent one fails."""

from __future__ import annotations

import pytest

from streamsvc.errors import EngineRefused, SandboxError, SandboxFailed
from streamsvc.sandbox.docker import config
from streamsvc.sandbox.docker.api import connect, docker_call, ping
from streamsvc.settings import load_settings


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


@pytest.mark.docker
async def test_a_refusal_keeps_the_engines_status_and_is_a_sandbox_failure() -> None:
    docker = connect(None)
    try:
        with pytest.raises(EngineRefused) as raised:
            await docker_call(
                "inspect a missing image",
                docker.images.inspect("streamsvc-no-such-image:absent"),
            )
    finally:
        await docker.close()
    assert raised.value.engine_status == 404
    assert isinstance(raised.value, SandboxFailed)
    assert (raised.value.code, raised.value.status) == ("sandbox_failed", 500)


def test_helper_containers_get_the_one_hardening_with_their_own_limits() -> None:
    settings = load_settings({}, None).sandbox
    run = config.hardened(
        settings, "me", network="none", memory_mb=256, deps_volume=None, env={}, cmd=["x"],
        mounts=[], role="run",
    )  # fmt: skip
    install = config.helper_config(
        settings, "me", action="install", cmd=["sh"], env={}, volume="v", writable=True,
        stdin=True,
    )  # fmt: skip
    check = config.helper_config(
        settings, "me", action="check", cmd=["sh"], env={}, volume="v", writable=False,
        stdin=False,
    )  # fmt: skip
    for key in ("ReadonlyRootfs", "CapDrop", "SecurityOpt", "LogConfig", "Init"):
        assert install["HostConfig"][key] == check["HostConfig"][key] == run["HostConfig"][key]
    assert install["User"] == check["User"] == run["User"]
    assert install["HostConfig"]["NetworkMode"] == settings.network  # only an install
    assert check["HostConfig"]["NetworkMode"] == "none"
    assert install["HostConfig"]["Mounts"][0]["ReadOnly"] is False
    assert check["HostConfig"]["Mounts"][0]["ReadOnly"] is True
    assert install["Labels"][config.LABEL_ACTION] == "install" and install["OpenStdin"]
    assert install["HostConfig"]["PidsLimit"] == config.HELPER_PIDS_LIMIT
