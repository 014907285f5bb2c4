"""The boundary to the Docker engine: bounded calls, translated errors, labels.

The rule: every aiodocker call goes through ``docker_call`` (bounded; ``SandboxUnavailable``
or ``EngineRefused`` with ``engine_status``). Kill and remove are bounded and shielded; labels
carry the owner (``host:pid``) so leftovers of dead processes can be told apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiodocker
import aiohttp
import anyio
from aiodocker.containers import DockerContainer

from streamsvc.errors import EngineRefused, EngineUnreachable, SandboxError
from streamsvc.identity import process_alive, process_name

T = TypeVar("T")

SANDBOX_UID = 10001
LABEL_MANAGED = "streamsvc.managed"
LABEL_OWNER = "streamsvc.owner"
LABEL_ROLE = "streamsvc.role"
API_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 15.0

#: The status aiodocker gives a ``DockerError`` when it cannot connect at all.
UNREACHABLE = 900
#: The engine's answer for a container, network, volume or image it does not have.
NOT_FOUND = 404
#: What a lost or refused engine raises inside aiodocker and aiohttp (a closed
#: client session raises RuntimeError).
ENGINE_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError, RuntimeError)
#: The engine's address when ``DOCKER_HOST`` is not set, as for the docker CLI.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


def connect(docker_host: str | None) -> aiodocker.Docker:
    """A client of the engine at ``docker_host`` (the ``DOCKER_HOST`` setting) or the default.

    The address is always explicit, so aiodocker neither reads the environment
    itself nor refuses to build a client when no socket exists yet: an engine
    that is absent or down fails the calls (``sandbox_unavailable``), and
    ``/health`` says so, while everything else keeps working.
    """
    return aiodocker.Docker(url=docker_host or DEFAULT_DOCKER_HOST)


#: Identifies this process, so start-up can tell its leftovers from a live peer's.
owner_label = process_name
owner_alive = process_alive


def labels(owner: str, role: str) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_OWNER: owner, LABEL_ROLE: role}


async def docker_call(what: str, call: Awaitable[T], limit: float = API_TIMEOUT) -> T:
    """Await one Docker API call, bounded by ``limit`` seconds, errors translated to ours."""
    try:
        with anyio.fail_after(limit):
            return await call
    except TimeoutError as exc:
        raise EngineUnreachable(f"the Docker engine did not answer ({what})") from exc
    except aiodocker.DockerError as exc:
        if exc.status == UNREACHABLE:
            raise EngineUnreachable(f"the Docker engine is unreachable ({what})") from exc
        message = exc.message if isinstance(exc.message, str) else str(exc.message)
        raise EngineRefused(
            f"the Docker engine refused to {what}: {message}", engine_status=exc.status
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise EngineUnreachable(f"the Docker engine is unreachable ({what})") from exc


async def ping(docker: aiodocker.Docker) -> None:
    """``GET /_ping``: the cheapest proof that the engine answers (``/version`` costs more)."""

    async def call() -> None:
        async with docker._query("_ping", versioned_api=False):
            pass

    await docker_call("answer a ping", call(), limit=5)


async def ensure_network(docker: aiodocker.Docker, name: str) -> bool:
    """The service's own bridge network: sandboxes reach out, never each other (no ICC).

    IPv4 only (the firewall covers IPv4). True when this call created it: it
    then has none of the firewall rules yet.
    """
    try:
        await docker_call("inspect the sandbox network", docker.networks.get(name))
        return False
    except EngineRefused as exc:
        if exc.engine_status != NOT_FOUND:
            raise
    config = {
        "Name": name,
        "Driver": "bridge",
        "EnableIPv6": False,
        "Labels": {LABEL_MANAGED: "true"},
        "Options": {"com.docker.network.bridge.enable_icc": "false"},
    }
    try:
        await docker_call("create the sandbox network", docker.networks.create(config))
    except SandboxError:  # a peer may have created it first
        await docker_call("inspect the sandbox network", docker.networks.get(name))
        return False
    return True


async def list_managed(docker: aiodocker.Docker) -> list[DockerContainer]:
    """Every container (any state) that carries the service's label."""
    filters = f'{{"label": ["{LABEL_MANAGED}=true"]}}'
    found: list[DockerContainer] = await docker_call(
        "list sandboxes", docker.containers.list(all=True, filters=filters)
    )
    return found


def container_labels(container: DockerContainer) -> dict[str, str]:
    found: dict[str, Any] = container._container.get("Labels") or {}
    return {str(key): str(value) for key, value in found.items()}


async def create_container(docker: aiodocker.Docker, config: dict[str, Any]) -> DockerContainer:
    """Create a container; shielded, so a cancelled caller never leaves one it cannot name."""
    with anyio.CancelScope(shield=True):
        created: DockerContainer = await docker_call(
            "create a sandbox", docker.containers.create(config)
        )
    return created


async def kill_container(container: DockerContainer) -> None:
    """SIGKILL the container; bounded, shielded, and quiet when it is gone or the engine is."""
    with (
        anyio.CancelScope(shield=True),
        anyio.move_on_after(CLEANUP_TIMEOUT),
        contextlib.suppress(*ENGINE_ERRORS),
    ):
        await container.kill()


async def remove_container(container: DockerContainer) -> bool:
    """Force-remove a container and its anonymous volumes; bounded and shielded.

    True when it is gone (removed now, or already).
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
        try:
            await container.delete(force=True, v=True)
            return True
        except aiodocker.DockerError as exc:
            return exc.status == NOT_FOUND
        except ENGINE_ERRORS:
            return False
    return False
