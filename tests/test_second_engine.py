"""The second Docker engine (issue 16's second host): a real connector run on it.

scripts/_lib.sh's ensure_second_engine starts it (own data root, exec root, socket,
bridge) and copies the sandbox image in; a server pointed at it through ``DOCKER_HOST``
runs through ``DockerSandbox`` there, and the first engine never sees the container.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest

from tests.harness import (
    ServerProcess,
    body,
    docker,
    execute,
    result_line,
    sandboxes,
    wait_until,
)

pytestmark = [pytest.mark.docker, pytest.mark.engine2]

HOSTNAME = """
    import json, os, socket
    result = {"hostname": socket.gethostname(), "interfaces": sorted(os.listdir("/sys/class/net"))}
    print(json.dumps({"ok": True, "result": result}))
"""


def created(host: str | None, since: float) -> set[str]:
    """Ids of the containers an engine created since ``since`` (its own event log)."""
    out = docker(
        "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
        "--filter", "type=container", "--filter", "event=create", "--format", "{{json .}}",
        host=host,
    )  # fmt: skip
    return {json.loads(line)["id"] for line in out.splitlines() if line.strip()}


def test_the_engines_are_two(engine2: str) -> None:
    """Two data roots (their ``docker info`` ID is the same: both read /etc/docker/key.json)."""
    first = docker("info", "--format", "{{.DockerRootDir}}").strip()
    second = docker("info", "--format", "{{.DockerRootDir}}", host=engine2).strip()
    assert first != second, (first, second)


async def test_a_connector_runs_on_the_second_engine(
    engine2: str, start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = start_server(DOCKER_HOST=engine2, STREAMSVC_ALLOW_BRIDGE="false")
    health = (await client.get(server.url + "/health")).json()
    assert health["components"]["sandbox"]["state"] == "ready", health

    since = time.time() - 1
    answer = await execute(client, server, body(HOSTNAME, network="none"))
    result = result_line(answer)
    assert result["interfaces"] == ["lo"], result  # network none
    hostname = result["hostname"]
    on_second = [c for c in created(engine2, since) if c.startswith(hostname)]
    assert len(on_second) == 1, (hostname, created(engine2, since))
    assert not [c for c in created(None, since) if c.startswith(hostname)]
    wait_until(lambda: not sandboxes(server, host=engine2), 10)
