"""The sandbox-side findings of issue 12 (Medium 5, Low 10, Low 12), on the real engine.

Each test replays the attack against a real server (or the real install helper)
and fails without its fix: installs refused without a network, limited like runs,
stopped when nobody waits; no secret in ``docker inspect`` or on the host's disk;
bridge runs refused until the network's firewall rules are there.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import anyio
import httpx
import pytest

from streamsvc.connectors.dependencies import Dependency
from streamsvc.sandbox.docker import config
from streamsvc.sandbox.docker import installer as installer_module
from streamsvc.sandbox.docker.deps_cache import DependencyCache
from streamsvc.sandbox.docker.installer import Installer
from streamsvc.settings import load_settings
from tests.harness import (
    ServerProcess,
    body,
    docker,
    eventually,
    execute,
    image_id,
    inspect,
    owner,
    result_line,
    sse_events,
    wait_until,
)

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent


# -- Medium 5: dependency installs -----------------------------------------------------


async def test_an_install_for_a_none_run_is_refused_when_bridge_is_disallowed(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    """Its install would have joined the bridge network all the same."""
    server = start_server(STREAMSVC_ALLOW_BRIDGE="false")
    payload = body("print(1)", dependencies=["idna==3.7"])
    response = await client.post(server.url + "/execute-connector", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "install_network_not_allowed", error
    assert "STREAMSVC_ALLOW_BRIDGE" in error["details"]["problems"][0]["message"]
    assert not docker("ps", "-aq", "--filter", f"label=streamsvc.owner={owner(server)}").split()


async def test_an_install_container_has_the_limits_of_a_run() -> None:
    """CPU quota, memory with no swap, a pids limit, nofile and fsize: read from the engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STREAMSVC_"))}
    settings = load_settings(env, None).sandbox
    me = f"test-install-{uuid.uuid4().hex[:12]}"
    found: list[Any] = []

    def running() -> bool:
        ids = docker("ps", "-q", "--filter", f"label=streamsvc.owner={me}").split()
        found.extend(inspect(i) for i in ids)
        return bool(ids)

    async with aiodocker.Docker() as engine, anyio.create_task_group() as tasks:
        installer = Installer(engine, settings, me)
        tasks.start_soon(
            lambda: installer.one_shot(None, ["sleep", "20"], {}, action="install", writable=True)
        )
        with anyio.fail_after(30):
            while not await anyio.to_thread.run_sync(running):  # noqa: ASYNC110 - in the engine
                await anyio.sleep(0.1)
        tasks.cancel_scope.cancel()
    host = found[0]["HostConfig"]
    assert found[0]["Config"]["Labels"][config.LABEL_ACTION] == "install"
    assert host["NanoCpus"] == int(settings.cpus * 1e9) > 0
    assert host["Memory"] == host["MemorySwap"] == config.HELPER_MEMORY_MB * 1024 * 1024
    assert 0 < host["PidsLimit"] <= config.HELPER_PIDS_LIMIT
    ulimits = {u["Name"]: u["Hard"] for u in host["Ulimits"] or []}
    assert ulimits == {
        "nofile": config.HELPER_NOFILE_LIMIT,
        "fsize": config.HELPER_TMPFS_MB * 1024 * 1024,
    }
    assert host["NetworkMode"] == settings.network  # the firewalled bridge, never "default"
    assert installer.slots == settings.max_concurrent_runs
    wait_until(lambda: not docker("ps", "-aq", "--filter", f"label=streamsvc.owner={me}"), 20)


async def test_requesters_that_leave_do_not_leave_installs_running(
    own_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six requests for six new sets whose install never ends (a sleeping install
    container), then all six leave: at most the install slots ran at once, the cache's
    stats (what /health shows) counted them, and every install was stopped."""
    monkeypatch.setattr(installer_module, "_INSTALL_SCRIPT", "sleep 120")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STREAMSVC_"))}
    env |= {"STREAMSVC_SANDBOX_IMAGE": own_image, "STREAMSVC_MAX_CONCURRENT_RUNS": "2"}
    settings = load_settings(env, None).sandbox
    me = f"test-leave-{uuid.uuid4().hex[:12]}"
    filters = ["--filter", f"label=streamsvc.owner={me}"]
    filters += ["--filter", "label=streamsvc.deps.action=install"]

    def installs() -> int:
        return len(docker("ps", "-q", *filters).split())

    async with aiodocker.Docker() as engine, anyio.create_task_group() as tasks:
        cache = DependencyCache(engine, settings, me)
        cache.use_image(image_id(own_image))
        cache.start(tasks)
        with anyio.fail_after(120):
            async with anyio.create_task_group() as requesters:
                for minor in range(6):
                    requesters.start_soon(
                        cache.ensure, (Dependency("idna", specifier=f"==3.{minor}"),)
                    )
                await eventually(lambda: installs() >= 2, 60)
                await anyio.sleep(2)  # time for more to start, were they unbounded
                assert installs() == 2
                stats = cache.stats()
                assert (stats["installing"], stats["install_queued"]) == (2, 4), stats
                requesters.cancel_scope.cancel()  # every requester leaves
            assert installs() == 0  # stopped, their containers removed
            assert (cache.stats()["installing"], cache.stats()["install_queued"]) == (0, 0)
        tasks.cancel_scope.cancel()
    wait_until(lambda: not docker("ps", "-aq", "--filter", f"label=streamsvc.owner={me}"), 20)


# -- Low 10: secrets of a cold run -------------------------------------------------------


async def test_a_cold_run_keeps_its_secrets_out_of_inspect_and_the_hosts_disk(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    """LANG forces a cold run; its env and context (the secret substituted) never reach
    the container's config or any file of the container under the engine's data root."""
    secret = f"cold-secret-{uuid.uuid4().hex}"
    code = """
        import json, os, socket, sys, time
        print(socket.gethostname(), flush=True)
        time.sleep(3)
        context = json.load(open(os.environ["STREAMSVC_CONTEXT_FILE"]))
        print(json.dumps({"ok": True, "result": {
            "lang": os.environ.get("LANG"),
            "secret": os.environ["API_TOKEN"] == context["connector"]["configuration"]["t"],
            "utf8": sys.flags.utf8_mode,
        }}))
    """
    payload = body(
        code,
        env={"LANG": "C.UTF-8", "PYTHONUTF8": "1", "API_TOKEN": secret},
        configuration={"t": "{{env:API_TOKEN}}"},
    )
    root = docker("info", "-f", "{{.DockerRootDir}}").strip()
    leaks: list[str] = []
    result: Any = None
    with anyio.fail_after(60):
        async for event, data in sse_events(client, server, payload):
            if event == "stdout" and result is None:
                hostname = data["text"].split()[0]
                record = inspect(hostname)
                if secret in json.dumps(record):
                    leaks.append("docker inspect")
                places = [Path(root, "containers", record["Id"])]
                places += [Path(m["Source"]) for m in record["Mounts"] if m.get("Source")]
                upper = (record.get("GraphDriver") or {}).get("Data", {}).get("UpperDir")
                if upper:
                    places.append(Path(upper))
                leaks += await anyio.to_thread.run_sync(_files_holding, places, secret)
                result = True
            if event == "done":
                result = data
    assert isinstance(result, dict), result
    assert result_line(result) == {"lang": "C.UTF-8", "secret": True, "utf8": 1}
    assert leaks == []


def _files_holding(places: list[Path], secret: str) -> list[str]:
    found = []
    for place in places:
        for path in place.rglob("*") if place.is_dir() else [place]:
            if path.is_file() and not path.is_symlink():
                try:
                    if secret.encode() in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    continue
    return found


# -- Low 12: the bridge's firewall, checked ----------------------------------------------


@pytest.fixture
def own_network() -> Iterator[str]:
    """A sandbox network of this test's own: its rules are this test's, removed after."""
    name = f"streamsvc-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        subnet = _subnet(name)
        if subnet:
            for chain in ("DOCKER-USER", "INPUT"):
                for rule in _rules(chain, subnet):
                    _iptables("-D", *rule[1:])
            docker("network", "rm", name, check=False)


async def test_bridge_runs_are_refused_until_the_networks_firewall_is_in_place(
    start_server: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
    own_network: str,
) -> None:
    code = 'print(\'{"ok": true, "result": 1}\')'
    on_bridge = body(code, network="bridge")
    server = start_server(STREAMSVC_SANDBOX_NETWORK=own_network)

    async def bridge() -> dict[str, Any]:
        health = (await client.get(server.url + "/health")).json()
        found: dict[str, Any] = health["components"]["sandbox"]["bridge"]
        return found

    # No network yet: the service must create it itself; it does, but runs nothing on it.
    refused = await client.post(server.url + "/execute-connector", json=on_bridge)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "bridge_unprotected"
    subnet = _subnet(own_network)
    assert subnet
    state = await bridge()
    assert state["state"] == "unprotected" and subnet in state["reason"], state
    # The firewall script's rules for its actual subnet (and the host's LAN): allowed.
    script = "source scripts/_lib.sh; ensure_sandbox_firewall"
    env = {**os.environ, "STREAMSVC_SANDBOX_NETWORK": own_network}
    with anyio.fail_after(60):
        done = await anyio.run_process(["bash", "-c", script], cwd=ROOT, env=env, check=False)
    output = done.stdout.decode() + done.stderr.decode()
    assert "reach neither" in output, output
    await _until(bridge, "protected")
    answer = await execute(client, server, on_bridge)
    assert result_line(answer) == 1
    # One rule gone: unprotected again, and bridge runs refused.
    (rule,) = _rules("INPUT", subnet)
    _iptables("-D", *rule[1:])
    await _until(bridge, "unprotected")
    assert "INPUT" in (await bridge())["reason"]
    refused = await client.post(server.url + "/execute-connector", json=on_bridge)
    assert refused.status_code == 503 and "INPUT" in refused.json()["error"]["message"]


async def _until(bridge: Callable[[], Any], state: str) -> None:
    with anyio.fail_after(20):
        while (await bridge())["state"] != state:  # noqa: ASYNC110 - the server's view
            await anyio.sleep(0.5)


def _subnet(network: str) -> str:
    found = docker(
        "network", "inspect", network, "-f", "{{(index .IPAM.Config 0).Subnet}}", check=False
    )
    return found.strip()


def _rules(chain: str, subnet: str) -> list[list[str]]:
    listed = subprocess.run(
        ["iptables", "-w", "-S", chain], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return [line.split() for line in listed.splitlines() if f"-s {subnet} " in line + " "]


def _iptables(*args: str) -> None:
    subprocess.run(["iptables", "-w", *args], check=True, timeout=30)
