"""Dependencies on the real engine: installed before the entry point, usable offline.

Each documented form of ``runtime.dependencies`` with the seed's
``requests==2.32.3``, imported by a program running under
``network_mode: none``; the set is installed once into a labelled volume
that runs mount read-only; a set that cannot be installed is a clear error
and leaves nothing behind.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.harness import ServerProcess
from tests.sandbox_kit import assert_no_sandboxes, body, docker, execute, result_line, sandboxes

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
    try:
        for _ in range(2):
            payload = body(code, dependencies={"six": "1.16.0"}, network="none")
            assert result_line(await execute(client, server, payload)) == "1.16.0"
            [volume] = deps_volumes(requirement)
            created.add(json.loads(docker("volume", "inspect", volume))[0]["CreatedAt"])
        assert len(created) == 1  # the second run used the first run's volume
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
