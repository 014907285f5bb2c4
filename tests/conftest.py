"""Shared fixtures: the fake Azure upstream, real server processes, Docker checks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fake_azure import FakeAzure
from tests.harness import (
    AZURE_KEY,
    ENGINE2,
    HEALTH_WATCH,
    IMAGE,
    REDIS_URL,
    ServerProcess,
    docker,
    image_id,
    server_env,
    volume_labels,
)


def _answers(command: list[str], env: dict[str, str] | None = None) -> bool:
    import subprocess

    try:
        result = subprocess.run(command, capture_output=True, timeout=10, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def docker_available(host: str | None = None) -> bool:
    """The engine (the first, or ``host``) answers and has the sandbox image."""
    env = {**os.environ, "DOCKER_HOST": host} if host else None
    return _answers(["docker", "image", "inspect", IMAGE], env)


def redis_available() -> bool:
    import redis

    try:
        with redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5) as r:
            return bool(r.ping())
    except (redis.RedisError, OSError):
        return False


#: marker -> (is the part there, the variable that makes it required, what it is).
NEEDS: dict[str, tuple[Callable[[], bool], str, str]] = {
    "docker": (
        docker_available,
        "STREAMSVC_REQUIRE_DOCKER",
        "a Docker engine and the sandbox image",
    ),
    "engine2": (
        lambda: docker_available(ENGINE2),
        "STREAMSVC_REQUIRE_DOCKER",
        f"the second Docker engine ({ENGINE2}) with the sandbox image",
    ),
    "redis": (redis_available, "STREAMSVC_REQUIRE_REDIS", f"the tests' Redis ({REDIS_URL})"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of a missing part skip on a machine without it, except in CI where that fails."""
    for marker, (available, required, what) in NEEDS.items():
        if not any(item.get_closest_marker(marker) for item in items) or available():
            continue
        if os.environ.get(required) == "1":
            raise pytest.UsageError(f"{what}: required (CI), missing")
        skip = pytest.mark.skip(reason=f"{what}: missing (run scripts/test)")
        for item in items:
            if item.get_closest_marker(marker):
                item.add_marker(skip)


#: (test, wall-clock start, end) of each test run, for the health watch (scripts/attack).
_RAN: list[tuple[str, float, float]] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    started = time.time()
    try:
        return (yield)
    finally:
        _RAN.append((item.nodeid, started, time.time()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under scripts/attack: fail the run when any server's /health took over 100 ms."""
    if not HEALTH_WATCH:
        return
    from tests.health_watch import LIMIT

    probes, slow = 0, []
    for report in Path(HEALTH_WATCH).glob("*.txt"):
        started = 0.0
        for line in report.read_text().splitlines():
            first, second = line.split()
            if first == "probes":
                probes += int(second)
            elif first == "started":
                started = float(second)
            else:
                at = float(first)
                during = [name for name, start, end in _RAN if start <= at <= end]
                where = f"{report.stem.split('-')[0]}, {at - started:.1f} s after it was up"
                slow.append((float(second), during[0] if during else "between tests", where))
    lines = [f"health watch: {probes} /health answers polled from outside, every 50 ms"]
    lines += [
        f"  {seconds * 1000:.0f} ms during {name} (server on port {where})"
        for seconds, name, where in sorted(slow)
    ]
    lines.append(
        f"health watch: {len(slow)} over {LIMIT * 1000:.0f} ms" if slow
        else f"health watch: every answer under {LIMIT * 1000:.0f} ms"
    )  # fmt: skip
    session.config.stash[_WATCHED] = lines
    if slow and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_WATCHED = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in terminalreporter.config.stash.get(_WATCHED, []):
        terminalreporter.write_line(line)


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


@pytest.fixture(scope="session")
def engine2() -> str:
    """``DOCKER_HOST`` of the second engine (tests marked ``engine2`` have it)."""
    return ENGINE2


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The tests' Redis (tests marked ``redis`` have it); keys go under a per-test prefix."""
    return REDIS_URL


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60) as http:
        yield http


@pytest.fixture
def own_image() -> Iterator[str]:
    """A copy of the sandbox image with its own id, so its cache is this test's alone."""
    tag = f"streamsvc-sandbox-test:{uuid.uuid4().hex[:12]}"
    dockerfile = f"FROM {IMAGE}\nLABEL streamsvc.test={tag}\n"
    subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-"],
        input=dockerfile,
        text=True,
        capture_output=True,
        check=True,
        timeout=120,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    built = image_id(tag)
    try:
        yield tag
    finally:
        for name in docker("volume", "ls", "-q", "--filter", "label=streamsvc.deps").split():
            if volume_labels(name).get("streamsvc.deps.image") == built:
                docker("volume", "rm", name, check=False)
        docker("rmi", tag, check=False)
