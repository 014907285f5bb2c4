"""Shared fixtures: the fake Azure upstream, real server processes, Docker checks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import psutil
import pytest

from tests.fake_azure import FakeAzure
from tests.harness import AZURE_KEY, ServerProcess, server_env


def docker_available() -> bool:
    import subprocess

    try:
        result = subprocess.run(
            [
                "docker",
                "image",
                "inspect",
                os.environ.get("STREAMSVC_SANDBOX_IMAGE", "streamsvc-sandbox:latest"),
            ],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Docker tests skip on a machine without an engine, except in CI where that fails."""
    if not any(item.get_closest_marker("docker") for item in items) or docker_available():
        return
    if os.environ.get("STREAMSVC_REQUIRE_DOCKER") == "1":
        raise pytest.UsageError("a Docker engine and the sandbox image are required (CI)")
    skip = pytest.mark.skip(reason="no Docker engine or sandbox image (run scripts/test)")
    for item in items:
        if item.get_closest_marker("docker"):
            item.add_marker(skip)


def _identity(process: psutil.Process) -> tuple[int, float]:
    """A process's pid and start time: a pid alone can be reused."""
    try:
        return process.pid, process.create_time()
    except psutil.Error:
        return process.pid, 0.0


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the run when a test left a child process running (after ending it).

    Children that were there before the first test are not the tests' doing: a
    script that started the Docker engine and then exec'd pytest leaves it here.
    """
    before = {_identity(child) for child in psutil.Process().children(recursive=True)}
    yield
    left, described = [], []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if _identity(child) not in before and child.status() != psutil.STATUS_ZOMBIE:
                described.append(f"{child.pid}: {' '.join(child.cmdline())}")
                child.kill()
                left.append(child)
    psutil.wait_procs(left, timeout=5)
    assert not described, f"processes left behind: {described}"


@pytest.fixture(scope="session")
def fake_azure() -> Iterator[FakeAzure]:
    with FakeAzure(api_key=AZURE_KEY) as fake:
        yield fake


@pytest.fixture
def azure(fake_azure: FakeAzure) -> FakeAzure:
    """The session's fake upstream, emptied for this test."""
    fake_azure.reset()
    return fake_azure


@pytest.fixture(scope="session")
def server(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    """One real server for the session, pointed at the fake upstream."""
    process = ServerProcess(server_env(fake_azure))
    yield process
    process.close()


@pytest.fixture
def start_server(fake_azure: FakeAzure) -> Iterator[Callable[..., ServerProcess]]:
    """Start a dedicated server with extra settings; stopped after the test."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        process = ServerProcess(server_env(fake_azure, **env))
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60) as http:
        yield http
