"""The dependency cache: one Docker volume per (sandbox image, dependency set).

A set is installed once, by its own short-lived install container that has
network access and no secrets (the connector's ``env`` never reaches it), into
a named volume that run containers then mount read-only at ``/opt/deps``. So
dependencies work under ``network_mode: none`` and later runs with the same
set pay nothing. Concurrent first requests for one set wait on one lock and
install once. ``uv`` installs when the image has it, ``pip`` otherwise; the
host's CA bundle (setting ``STREAMSVC_SANDBOX_CA_BUNDLE``) is copied in so
TLS-intercepting proxies work. Least-recently-used volumes are evicted past
``STREAMSVC_DEPS_CACHE_MB``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import aiodocker
import anyio
import msgspec
from aiodocker.volumes import DockerVolume

from .dependencies import Dependency, dependency_key
from .docker_api import (
    LABEL_MANAGED,
    NETWORK_NAME,
    SANDBOX_UID,
    create_container,
    docker_call,
    ensure_network,
    labels,
    remove_container,
    tar_bytes,
)
from .errors import SandboxError
from .settings import Settings

log = logging.getLogger("streamsvc.deps")

LABEL_DEPS = "streamsvc.deps"
COMPLETE_MARKER = ".streamsvc-complete"
_INSTALL_SCRIPT = f"""
set -eu
if command -v uv >/dev/null 2>&1; then
  uv pip install --quiet --no-cache --python python3 --target /opt/deps -r /bundle/requirements.txt
else
  python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check \\
    --target /opt/deps -r /bundle/requirements.txt
fi
touch /opt/deps/{COMPLETE_MARKER}
du -sk /opt/deps | cut -f1
"""


class CachedSet(msgspec.Struct):
    volume: str
    requirements: list[str]
    size_kb: int
    last_used: float


class DependencyCache:
    def __init__(
        self,
        docker: aiodocker.Docker,
        settings: Settings,
        owner: str,
    ) -> None:
        self._docker = docker
        self._settings = settings
        self._owner = owner
        self._locks: dict[str, anyio.Lock] = {}
        self._sets: dict[str, CachedSet] = {}
        self._in_use: dict[str, int] = {}
        self.image_id: str | None = None
        self.installs = 0

    def volume_name(self, dependencies: tuple[Dependency, ...]) -> str:
        key = f"{self.image_id}\n{dependency_key(dependencies)}"
        return "streamsvc-deps-" + hashlib.sha256(key.encode()).hexdigest()[:20]

    def listing(self) -> list[CachedSet]:
        return sorted(self._sets.values(), key=lambda entry: -entry.last_used)

    async def ensure(self, dependencies: tuple[Dependency, ...]) -> str:
        """The volume holding ``dependencies``, installing them first if needed.

        The caller holds the volume (it is not evicted) until ``release``.
        """
        name = self.volume_name(dependencies)
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:
            entry = self._sets.get(name)
            if entry is None:
                entry = await self._adopt(name, dependencies) or await self._install(
                    name, dependencies
                )
                self._sets[name] = entry
            entry.last_used = time.time()
            self._in_use[name] = self._in_use.get(name, 0) + 1
        await self._evict(keep=name)
        return name

    async def _adopt(self, name: str, dependencies: tuple[Dependency, ...]) -> CachedSet | None:
        """Reuse a complete volume that an earlier process installed."""
        try:
            await DockerVolume(self._docker, name).show()
        except aiodocker.DockerError:
            return None
        output, code = await self._one_shot(
            name, ["sh", "-c", f"test -f /opt/deps/{COMPLETE_MARKER} && du -sk /opt/deps"], {}, None
        )
        if code != 0:
            await docker_call(
                "remove a broken cache volume", DockerVolume(self._docker, name).delete()
            )
            return None
        return CachedSet(name, [d.requirement for d in dependencies], _size(output), time.time())

    async def _install(self, name: str, dependencies: tuple[Dependency, ...]) -> CachedSet:
        requirements = [dep.requirement for dep in dependencies]
        await ensure_network(self._docker)  # the install step, unlike the run, may need network
        volume_labels = {**labels(self._owner, "deps"), LABEL_DEPS: json.dumps(requirements)}
        await docker_call(
            "create a cache volume",
            self._docker.volumes.create({"Name": name, "Labels": volume_labels}),
        )
        files = {"requirements.txt": ("\n".join(requirements) + "\n").encode()}
        env = {"HOME": "/tmp", "UV_CACHE_DIR": "/tmp/uv", "UV_PYTHON_DOWNLOADS": "never"}
        ca = self._settings.ca_bundle
        if ca:
            files["ca.pem"] = await anyio.Path(ca).read_bytes()
            env |= {
                "SSL_CERT_FILE": "/bundle/ca.pem",
                "PIP_CERT": "/bundle/ca.pem",
                "REQUESTS_CA_BUNDLE": "/bundle/ca.pem",
                "UV_NATIVE_TLS": "1",
            }
        started = time.monotonic()
        output, code = await self._one_shot(
            name, ["sh", "-c", _INSTALL_SCRIPT], env, files, writable=True
        )
        if code != 0:
            await docker_call(
                "remove a failed cache volume", DockerVolume(self._docker, name).delete()
            )
            raise SandboxError(
                "installing the dependencies failed",
                code="dependency_install_failed",
                status=400,
                details={"requirements": requirements, "output": output[-4000:]},
            )
        self.installs += 1
        log.info("installed %s in %.1fs", requirements, time.monotonic() - started)
        return CachedSet(name, requirements, _size(output), time.time())

    async def _one_shot(
        self,
        volume: str,
        cmd: list[str],
        env: dict[str, str],
        files: dict[str, bytes] | None,
        writable: bool = False,
    ) -> tuple[str, int]:
        """Run a helper container over ``volume``; its output (capped) and exit code."""
        s = self._settings
        mounts: list[dict[str, Any]] = [
            {"Type": "volume", "Source": volume, "Target": "/opt/deps", "ReadOnly": not writable}
        ]
        if files is not None:
            mounts.append({"Type": "volume", "Target": "/bundle"})
        config: dict[str, Any] = {
            "Image": s.streamsvc_sandbox_image,
            "Cmd": cmd,
            "User": f"{SANDBOX_UID}:{SANDBOX_UID}",
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": labels(self._owner, "deps"),
            "AttachStdout": True,
            "AttachStderr": True,
            "HostConfig": {
                "NetworkMode": NETWORK_NAME if writable else "none",
                "Memory": 1024 * 1024 * 1024,
                "PidsLimit": 512,
                "ReadonlyRootfs": True,
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Tmpfs": {"/tmp": "rw,nosuid,nodev,size=1024m"},
                "Mounts": mounts,
                "LogConfig": {"Type": "none", "Config": {}},
                "Init": True,
            },
        }
        container = await create_container(self._docker, config)
        try:
            if files is not None:
                await docker_call("copy files", container.put_archive("/bundle", tar_bytes(files)))
            chunks: list[bytes] = []
            async with container.attach(stdout=True, stderr=True, logs=False) as stream:
                await docker_call("start the install container", container.start())
                with anyio.fail_after(s.streamsvc_install_timeout_seconds):
                    while (message := await stream.read_out()) is not None:
                        if sum(map(len, chunks)) < 256 * 1024:
                            chunks.append(message.data)
            result = await docker_call("wait for the install", container.wait())
            return b"".join(chunks).decode(errors="replace"), int(result.get("StatusCode", 1))
        except TimeoutError:
            return "the install took longer than STREAMSVC_INSTALL_TIMEOUT_SECONDS", 124
        finally:
            await remove_container(container)

    def release(self, volume: str) -> None:
        self._in_use[volume] -= 1

    async def _evict(self, keep: str) -> None:
        cap_kb = self._settings.streamsvc_deps_cache_mb * 1024
        total = sum(entry.size_kb for entry in self._sets.values())
        for entry in sorted(self._sets.values(), key=lambda e: e.last_used):
            if total <= cap_kb:
                break
            if entry.volume == keep or self._in_use.get(entry.volume):
                continue
            if await self.remove(entry.volume):
                total -= entry.size_kb

    async def remove(self, volume: str) -> bool:
        try:
            await DockerVolume(self._docker, volume).delete()
        except aiodocker.DockerError as exc:
            log.info("cannot evict %s yet: %s", volume, exc)
            return False
        self._sets.pop(volume, None)
        return True

    async def clear(self) -> int:
        """Remove every cache volume not in use; the number removed."""
        found = await docker_call(
            "list cache volumes",
            self._docker.volumes.list(
                filters=json.dumps({"label": [LABEL_DEPS, f"{LABEL_MANAGED}=true"]})
            ),
        )
        removed = 0
        for volume in found.get("Volumes") or []:
            if not self._in_use.get(volume["Name"]) and await self.remove(volume["Name"]):
                removed += 1
        return removed


def _size(output: str) -> int:
    lines = output.strip().splitlines()
    return int(lines[-1]) if lines and lines[-1].strip().isdigit() else 0
