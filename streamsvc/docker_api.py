"""The boundary to the Docker engine: bounded calls, translated errors, archives.

Every aiodocker call goes through ``docker_call``, which bounds it in time and
turns Docker and aiohttp errors into ``SandboxError``: ``sandbox_unavailable``
(503) when the engine cannot be reached, ``sandbox_failed`` (500) when it
refuses or breaks. Labels mark every container, network and volume the
service creates, with the owning process, so leftovers can be found.
"""

from __future__ import annotations

import io
import os
import socket
import tarfile
from collections.abc import Awaitable
from typing import TypeVar

import aiodocker
import aiohttp
import anyio

from .errors import SandboxError

T = TypeVar("T")

SANDBOX_UID = 10001
NETWORK_NAME = "streamsvc-sandbox"
LABEL_MANAGED = "streamsvc.managed"
LABEL_OWNER = "streamsvc.owner"
API_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 15.0

#: What a lost or refused engine raises inside aiodocker and aiohttp.
ENGINE_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError)


def owner_label() -> str:
    """Identifies this process, so start-up can tell its leftovers from a live peer's."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def labels(owner: str, role: str) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_OWNER: owner, "streamsvc.role": role}


async def docker_call(what: str, call: Awaitable[T], limit: float = API_TIMEOUT) -> T:
    """Await one Docker API call, bounded by ``limit`` seconds, errors translated to ours."""
    try:
        with anyio.fail_after(limit):
            return await call
    except TimeoutError as exc:
        raise SandboxError(f"the Docker engine did not answer ({what})") from exc
    except aiodocker.DockerError as exc:
        message = exc.message if isinstance(exc.message, str) else str(exc.message)
        raise SandboxError(
            f"the Docker engine refused to {what}: {message}", code="sandbox_failed", status=500
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise SandboxError(f"the Docker engine is unreachable ({what})") from exc


def tar_bytes(files: dict[str, bytes], mode: int = 0o444) -> bytes:
    """A tar archive of ``files``, owned by root and read-only to everyone else."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        directories: set[str] = set()
        for name, data in sorted(files.items()):
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o555
                    archive.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def remove_container(container: aiodocker.containers.DockerContainer) -> bool:
    """Force-remove a container and its anonymous volumes; bounded and shielded."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
        try:
            await container.delete(force=True, v=True)
            return True
        except aiodocker.DockerError as exc:
            return exc.status == 404
        except (aiohttp.ClientError, OSError):
            return False
    return False
