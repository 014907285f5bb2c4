"""Dependencies on the real engine: installed before the entry point, usable offline.

Each documented form of ``runtime.dependencies`` with the seed's
``requests==2.32.3``, imported by a program running under
``network_mode: none``; the set is installed once into a labelled volume
that runs mount read-only; a set that cannot be installed is a clear error
and leaves nothing behind. Issue 5: the volume is keyed by the image id, the
image's Python version and the set; three concurrent first requests install
once (the engine's event log says so); past the size cap the least recently
used set goes; ``streamsvc deps list|clear`` show and empty the cache from the
engine, and the server installs a cleared set again. A host lock not had in
time is a sandbox error; removing a set from a broken engine is a quiet False;
a request for a set whose install outlived its first requester waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import aiodocker
import anyio
import anyio.abc
import httpx
import pytest

from streamsvc.connectors.dependencies import Dependency
from streamsvc.errors import SandboxError, SandboxUnavailable
from streamsvc.sandbox.docker.api import connect
from streamsvc.sandbox.docker.deps_cache import DependencyCache
from streamsvc.sandbox.docker.deps_inventory import disk_usage, entries
from streamsvc.sandbox.docker.host_lock import host_lock
from streamsvc.settings import load_settings
from tests.harness import (
    IMAGE,
    NO_DOCKER,
    ServerProcess,
    assert_no_sandboxes,
    body,
    docker,
    execute,
    image_id,
    owner,
    result_line,
    sandboxes,
    volume_labels,
)

pytestmark = pytest.mark.docker

IMPORTS_REQUESTS = """
    import json, os, requests
    try:
        open("/opt/deps/probe", "w")
        writable = True
    except OSError:
        writable = False
    print(json.dumps({"ok": True, "result": {
        "version": requests.__version__,
        "from": os.path.dirname(os.path.dirname(requests.__file__)),
        "deps_writable": writable,
    }}))
"""


async def install_metrics(client: httpx.AsyncClient, server: ServerProcess) -> dict[str, float]:
    """The install-time histogram's count and sum in /metrics."""
    text = (await client.get(server.url + "/metrics")).text
    found = {"streamsvc_dependency_install_seconds_count": 0.0}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("streamsvc_dependency_install_seconds_"):
            found[name] = float(value)
    return found


def deps_volumes(requirement: str) -> list[str]:
    names = docker("volume", "ls", "-q", "--filter", "label=streamsvc.deps").split()
    found = []
    for name in names:
        labels = json.loads(docker("volume", "inspect", name))[0]["Labels"] or {}
        if requirement in json.loads(labels.get("streamsvc.deps", "[]")):
            assert labels["streamsvc.managed"] == "true"
            found.append(name)
    return found


async def test_each_dependency_form_is_importable_under_network_none(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    forms: list[object] = [
        [{"name": "requests", "version": "2.32.3"}],
        ["requests==2.32.3"],
        {"requests": "2.32.3"},
    ]
    volumes = []
    for dependencies in forms:
        payload = body(IMPORTS_REQUESTS, dependencies=dependencies, network="none")
        result = result_line(await execute(client, server, payload))
        assert result == {"version": "2.32.3", "from": "/opt/deps", "deps_writable": False}
        volumes.append(set(deps_volumes("requests==2.32.3")))
    assert volumes[0] and volumes[0] == volumes[1] == volumes[2]  # one set, one volume
    assert_no_sandboxes(server)


async def test_a_new_set_is_installed_once_then_reused(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    requirement = "six==1.16.0"
    for volume in deps_volumes(requirement):  # start from nothing
        docker("volume", "rm", volume, check=False)
    code = """
        import json, six
        print(json.dumps({"ok": True, "result": six.__version__}))
    """
    created = set()
    installs = "streamsvc_dependency_install_seconds_count"
    before = await install_metrics(client, server)
    try:
        for _ in range(2):
            payload = body(code, dependencies={"six": "1.16.0"}, network="none")
            assert result_line(await execute(client, server, payload)) == "1.16.0"
            [volume] = deps_volumes(requirement)
            created.add(json.loads(docker("volume", "inspect", volume))[0]["CreatedAt"])
        assert len(created) == 1  # the second run used the first run's volume
        after = await install_metrics(client, server)
        assert after[installs] - before[installs] == 1  # /metrics timed the one install
        assert after["streamsvc_dependency_install_seconds_sum"] > before.get(
            "streamsvc_dependency_install_seconds_sum", 0.0
        )
    finally:
        for volume in deps_volumes(requirement):
            docker("volume", "rm", volume, check=False)
    assert_no_sandboxes(server)


async def test_a_set_that_cannot_install_is_an_error_and_leaves_nothing(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    requirement = "streamsvc-no-such-package-7f3a==1.0"
    payload = body("print(1)", dependencies=[requirement])
    response = await client.post(server.url + "/execute-connector", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "dependency_install_failed"
    assert error["details"]["requirements"] == [requirement]
    assert deps_volumes(requirement) == []
    assert sandboxes(server) == []


# -- issue 5: the cache's key, one install, the size cap, listing and clearing --------------


def python_version(image: str = IMAGE) -> str:
    probe = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
    return docker("run", "--rm", "--network", "none", image, "python3", "-c", probe).strip()


async def test_the_key_is_the_image_the_python_version_and_the_set(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    payload = body(IMPORTS_REQUESTS, dependencies=["requests==2.32.3"])
    assert result_line(await execute(client, server, payload))["version"] == "2.32.3"
    image, python = image_id(), python_version()
    [volume] = [
        name
        for name in deps_volumes("requests==2.32.3")
        if volume_labels(name).get("streamsvc.deps.image") == image
    ]
    assert volume_labels(volume)["streamsvc.deps.python"] == python
    key = f"{image}\n{python}\nrequests==2.32.3"
    assert volume == "streamsvc-deps-" + hashlib.sha256(key.encode()).hexdigest()[:20]


async def test_concurrent_first_requests_for_a_new_set_install_it_once(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    requirement = "six==1.15.0"
    for volume in deps_volumes(requirement):  # a set this engine has not seen
        docker("volume", "rm", volume, check=False)
    code = """
        import json, six
        print(json.dumps({"ok": True, "result": six.__version__}))
    """
    since = int(time.time())
    results: list[Any] = []

    async def one() -> None:
        payload = body(code, dependencies={"six": "1.15.0"})
        results.append(result_line(await execute(client, server, payload)))

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        assert results == ["1.15.0"] * 3
        installs = docker(
            "events", "--since", str(since), "--until", str(int(time.time()) + 1),
            "--filter", "type=container", "--filter", "event=create",
            "--filter", f"label=streamsvc.owner={owner(server)}",
            "--filter", "label=streamsvc.deps.action=install",
            "--format", "{{.Actor.ID}}",
        ).split()  # fmt: skip
        assert len(installs) == 1, installs  # the engine's own record: one install container
        assert len(deps_volumes(requirement)) == 1
    finally:
        for volume in deps_volumes(requirement):
            docker("volume", "rm", volume, check=False)
    assert_no_sandboxes(server)


async def test_disk_usage_waits_for_a_report_already_running() -> None:
    """The engine refuses a second concurrent df; workers starting together must not fail."""
    async with aiodocker.Docker() as engine, anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(disk_usage, engine)


async def test_two_server_processes_install_a_new_set_once(
    start_server: Any, client: httpx.AsyncClient
) -> None:
    """Workers (or servers) on one host share the install through a host-wide lock."""
    requirement = "six==1.14.0"
    for volume in deps_volumes(requirement):
        docker("volume", "rm", volume, check=False)
    first, second = start_server(), start_server()
    code = """
        import json, six
        print(json.dumps({"ok": True, "result": six.__version__}))
    """
    since = int(time.time())
    results: list[Any] = []

    async def one(server: ServerProcess) -> None:
        payload = body(code, dependencies={"six": "1.14.0"})
        results.append(result_line(await execute(client, server, payload)))

    try:
        async with anyio.create_task_group() as tg:
            for server in (first, second, first, second):
                tg.start_soon(one, server)
        assert results == ["1.14.0"] * 4
        installs = docker(
            "events", "--since", str(since), "--until", str(int(time.time()) + 1),
            "--filter", "type=container", "--filter", "event=create",
            "--filter", "label=streamsvc.deps.action=install",
            "--format", "{{.Actor.ID}}",
        ).split()  # fmt: skip
        assert len(installs) == 1, installs  # one install container between the two processes
        assert len(deps_volumes(requirement)) == 1
    finally:
        for volume in deps_volumes(requirement):
            docker("volume", "rm", volume, check=False)
    assert_no_sandboxes(first)
    assert_no_sandboxes(second)


def deps_cli(image: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC_")}
    result = subprocess.run(
        [sys.executable, "-m", "streamsvc", "deps", *args],
        env={**env, "STREAMSVC_SANDBOX_IMAGE": image},
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def imports(module: str) -> str:
    return f"""
        import json, {module}
        print(json.dumps({{"ok": True, "result": {module}.__name__}}))
    """


async def test_a_listing_for_an_image_the_engine_lacks_marks_no_set_current() -> None:
    env = {"STREAMSVC_SANDBOX_IMAGE": f"streamsvc-no-such-image:{uuid.uuid4().hex[:8]}"}
    settings = load_settings(env, None).sandbox
    docker = connect(settings.docker_host)
    try:
        found = await entries(docker, settings)
    finally:
        await docker.close()
    assert [entry.volume for entry in found if entry.current] == []


async def test_a_listing_without_an_engine_is_sandbox_unavailable() -> None:
    settings = load_settings({"DOCKER_HOST": NO_DOCKER}, None).sandbox
    docker = connect(settings.docker_host)
    try:
        with anyio.fail_after(10), pytest.raises(SandboxUnavailable, match="inspect the sandbox"):
            await entries(docker, settings)
    finally:
        await docker.close()


async def test_the_cache_is_size_capped_lru_and_listed_and_cleared(
    own_image: str, start_server: Any, client: httpx.AsyncClient
) -> None:
    """urllib3 (~1 MiB installed) and idna (~0.7 MiB) do not both fit in 1 MiB."""
    capped: ServerProcess = start_server(
        STREAMSVC_SANDBOX_IMAGE=own_image, STREAMSVC_DEPS_CACHE_MB="1"
    )
    built = image_id(own_image)

    def sets() -> dict[str, str]:
        names = docker("volume", "ls", "-q", "--filter", "label=streamsvc.deps").split()
        found = {}
        for name in names:
            marks = volume_labels(name)
            if marks.get("streamsvc.deps.image") == built:
                found[json.loads(marks["streamsvc.deps"])[0]] = name
        return found

    def deps_stats() -> Any:
        health = httpx.get(capped.url + "/health", timeout=10).json()
        return health["components"]["sandbox"]["deps"]

    old = body(imports("urllib3"), dependencies=["urllib3==2.2.3"])
    new = body(imports("idna"), dependencies=["idna==3.10"])
    assert result_line(await execute(client, capped, old)) == "urllib3"
    assert list(sets()) == ["urllib3==2.2.3"]  # over the cap alone, but in use: kept
    assert result_line(await execute(client, capped, new)) == "idna"
    assert list(sets()) == ["idna==3.10"]  # the least recently used set went
    assert deps_stats()["installs"] == 2 and deps_stats()["sets"] == 1

    # Listing and clearing, from the command line, straight from the engine.
    listed = json.loads(deps_cli(own_image, "list", "--json"))
    [entry] = [e for e in listed if e["image"] == built]
    assert entry["requirements"] == ["idna==3.10"] and entry["current"] is True
    assert entry["python"] == python_version() and entry["size_kb"] > 100
    assert entry["volume"] == sets()["idna==3.10"]
    assert "idna==3.10" in deps_cli(own_image, "list")
    cleared = deps_cli(own_image, "clear")
    assert f"removed {entry['volume']}" in cleared
    assert sets() == {}
    # The server notices the set is gone and installs it again.
    assert result_line(await execute(client, capped, new)) == "idna"
    assert list(sets()) == ["idna==3.10"] and deps_stats()["installs"] == 3
    assert_no_sandboxes(capped)


# -- review fixes: the host lock's timeout, removal through the boundary, a left install ----


async def test_a_host_lock_not_had_in_time_is_a_sandbox_error() -> None:
    """Another process installing for too long: 503 sandbox_unavailable, not a bare timeout."""
    name = f"streamsvc-test-{uuid.uuid4().hex[:12]}"
    async with host_lock(name, 5):
        with pytest.raises(SandboxError) as caught:
            async with host_lock(name, 0.3):
                pass
    assert caught.value.code == "sandbox_unavailable" and caught.value.status == 503
    assert isinstance(caught.value.__cause__, TimeoutError)
    async with host_lock(name, 5):  # released after all
        pass


async def test_removing_a_set_from_an_engine_that_breaks_is_a_quiet_false() -> None:
    """An engine answering garbage: ``remove`` says not removed, nothing escapes the boundary."""
    folder = tempfile.mkdtemp(prefix="streamsvc-broken-engine-")
    path = os.path.join(folder, "docker.sock")

    async def answer(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await conn.receive()
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                await conn.send(b"Content-Length: 100\r\n\r\n{")  # then hangs up, short

    listener = await anyio.create_unix_listener(path)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, answer)
            engine = aiodocker.Docker(url=f"unix://{path}")
            try:
                cache = DependencyCache(engine, load_settings({}, None).sandbox, "test")
                with anyio.fail_after(60):
                    assert await cache.remove("streamsvc-deps-not-there") is False
            finally:
                await engine.close()
                tg.cancel_scope.cancel()
    finally:
        await listener.aclose()
        os.unlink(path)
        os.rmdir(folder)


async def test_an_install_whose_requester_left_stops_and_the_next_request_installs_afresh(
    own_image: str,
) -> None:
    """A client that disconnects mid-install stops the install (nobody waits for it: issue
    12, Medium 5); the next request for the set takes the half-written volume for broken,
    removes it (no install container mounts it any more) and installs it again."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "OPENAI_", "STREAMSVC_"))
    }
    settings = load_settings({**env, "STREAMSVC_SANDBOX_IMAGE": own_image}, None).sandbox
    me = f"test-deps-{uuid.uuid4().hex[:12]}"
    dependencies = (Dependency("requests", specifier="==2.32.3"),)
    since = int(time.time())

    def installing() -> bool:
        filters = ["--filter", f"label=streamsvc.owner={me}"]
        filters += ["--filter", "label=streamsvc.deps.action=install"]
        return bool(docker("ps", "-q", *filters).split())

    async with aiodocker.Docker() as engine, anyio.create_task_group() as tasks:
        cache = DependencyCache(engine, settings, me)
        cache.use_image(image_id(own_image))
        cache.start(tasks)
        created = anyio.Event()
        with anyio.fail_after(240):
            async with anyio.create_task_group() as first:
                first.start_soon(cache.ensure, dependencies, created)
                await created.wait()  # the volume exists
                while not installing():  # noqa: ASYNC110 - the install container runs, in the engine
                    await anyio.sleep(0.05)
                first.cancel_scope.cancel()  # when the first requester goes away
            assert cache.installs == 0
            assert not installing()  # stopped, its container removed
            assert cache.stats()["installing"] == 0
            volume = await cache.ensure(dependencies)
        cache.release(volume)
        assert cache.installs == 1
        tasks.cancel_scope.cancel()  # stop compiling the bytecode
    helpers = docker(
        "events", "--since", str(since), "--until", str(int(time.time()) + 1),
        "--filter", "type=container", "--filter", "event=create",
        "--filter", f"label=streamsvc.owner={me}",
        "--format", '{{index .Actor.Attributes "streamsvc.deps.action"}}',
    ).split()  # fmt: skip
    # the stopped install, the check that finds its volume incomplete, the new install
    assert sorted(helpers) == ["check", "install", "install", "python"]
    assert docker("ps", "-aq", "--filter", f"label=streamsvc.owner={me}").split() == []
