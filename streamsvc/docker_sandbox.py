"""The Docker sandbox: one fresh, locked-down container per run, via aiodocker.

This is the one module that imports ``aiodocker``; Docker and aiohttp errors
are translated here into ``SandboxError`` (``sandbox_unavailable`` when the
engine cannot be reached, ``sandbox_failed`` when it refuses or breaks).

A run container is created from the sandbox image with: a non-root user, all
capabilities dropped, ``no-new-privileges``, a read-only root filesystem,
size-capped tmpfs at ``/work`` and ``/tmp``, memory = swap = ``memoryMb``,
a CPU quota, a pids limit, nofile/fsize ulimits, no log driver (output is
read through attach), tini as PID 1 (so a daemon dies with the run), and
either no network or the service's own bridge network with inter-container
traffic disabled. Files reach it by ``put_archive`` into an anonymous volume
at ``/bundle`` (root-owned, read-only to the program); the runner copies them
into ``/work``. Dependencies come from ``DependencyCache`` as a read-only
volume, so they work under ``network_mode: none``.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import aiodocker
import aiohttp
import anyio
from aiodocker.containers import DockerContainer

from .admission import Admission
from .dependencies import Dependency
from .deps_cache import DependencyCache
from .docker_api import (
    CLEANUP_TIMEOUT,
    ENGINE_ERRORS,
    LABEL_MANAGED,
    LABEL_OWNER,
    NETWORK_NAME,
    SANDBOX_UID,
    docker_call,
    labels,
    owner_alive,
    owner_label,
    remove_container,
    tar_bytes,
)
from .errors import SandboxError
from .sandbox import Exited, Output, RunSpec, SandboxEvent, Status
from .settings import Settings

log = logging.getLogger("streamsvc.sandbox")

RUNNER = resources.files("streamsvc").joinpath("sandbox_runner.py").read_bytes()


class DockerSandbox:
    """``Sandbox`` on a Docker engine."""

    def __init__(self, docker: aiodocker.Docker, settings: Settings) -> None:
        self._docker = docker
        self._settings = settings
        self._owner = owner_label()
        self._containers: set[DockerContainer] = set()
        self.admission = Admission(
            settings.streamsvc_max_concurrent_runs, settings.streamsvc_queue_size
        )
        self.deps = DependencyCache(docker, settings, self._owner)
        self.image_id: str | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Best-effort preparation; an engine that is down now may come back later."""
        try:
            await self._prepare()
            await self.remove_leftovers()
        except SandboxError as exc:
            log.warning("sandbox not ready at start-up: %s", exc.message)

    async def _prepare(self) -> None:
        image = await docker_call(
            "inspect the sandbox image",
            self._docker.images.inspect(self._settings.streamsvc_sandbox_image),
        )
        self.image_id = image["Id"]
        self.deps.image_id = image["Id"]
        await self._ensure_network()

    async def _ensure_network(self) -> None:
        """The service's own bridge: sandboxes reach out, never each other."""
        try:
            await self._docker.networks.get(NETWORK_NAME)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
            config = {
                "Name": NETWORK_NAME,
                "Driver": "bridge",
                "Labels": {LABEL_MANAGED: "true"},
                "Options": {"com.docker.network.bridge.enable_icc": "false"},
            }
            try:
                await docker_call(
                    "create the sandbox network", self._docker.networks.create(config)
                )
            except SandboxError:
                await self._docker.networks.get(NETWORK_NAME)  # a peer created it first

    async def remove_leftovers(self) -> int:
        """Remove sandboxes that earlier, now dead, processes of the service left behind."""
        filters = json.dumps({"label": [f"{LABEL_MANAGED}=true"]})
        found = await docker_call(
            "list sandboxes", self._docker.containers.list(all=True, filters=filters)
        )
        removed = 0
        for container in found:
            owner = container._container.get("Labels", {}).get(LABEL_OWNER, "")
            if owner != self._owner and not owner_alive(owner):
                await self._remove(container)
                removed += 1
        if removed:
            log.info("removed %d leftover sandbox(es)", removed)
        return removed

    async def health(self) -> dict[str, Any]:
        try:
            with anyio.fail_after(3):
                await self._docker.version()
                if self.image_id is None:
                    await self._prepare()
        except (*ENGINE_ERRORS, TimeoutError, SandboxError):
            return {"state": "unavailable", "image": self._settings.streamsvc_sandbox_image}
        return {
            "state": "ready",
            "image": self._settings.streamsvc_sandbox_image,
            "running": self.admission.running,
            "queued": len(self.admission.queue),
        }

    async def aclose(self) -> None:
        """Kill and remove every sandbox still running, then close the client."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for container in list(self._containers):
                    tg.start_soon(self._remove, container)
            await self._docker.close()

    # -- one run -----------------------------------------------------------------

    async def run(self, spec: RunSpec) -> AsyncIterator[SandboxEvent]:
        await docker_call("answer a ping", self._docker.version(), limit=5)
        if self.image_id is None:
            await self._prepare()
        ticket = self.admission.enter()
        try:
            async for position in ticket.positions():
                yield Status("queued", f"waiting for a free slot (position {position})", position)
            deps_volume = None
            if spec.dependencies:
                yield Status("installing_dependencies", _describe(spec.dependencies))
                deps_volume = await self.deps.ensure(spec.dependencies)
            try:
                async for event in self._execute(spec, deps_volume):
                    yield event
            finally:
                if deps_volume is not None:
                    self.deps.release(deps_volume)
        finally:
            ticket.release()

    async def _execute(self, spec: RunSpec, deps_volume: str | None) -> AsyncIterator[SandboxEvent]:
        container = await self._create(spec, deps_volume)
        try:
            async with contextlib.AsyncExitStack() as stack:
                attach = container.attach(stdout=True, stderr=True, logs=False)
                stream: Any = await docker_call(
                    "attach to the sandbox",
                    stack.enter_async_context(attach),  # type: ignore[arg-type]
                )
                yield Status("starting", "starting the sandbox")
                started = time.monotonic()
                await docker_call("start the sandbox", container.start())
                yield Status("running", f"running {spec.entry_point}")
                watch = _Watch(self._settings.streamsvc_output_cap_bytes)
                async for event in self._pump(stream, spec, watch, container):
                    yield event
                duration_ms = int((time.monotonic() - started) * 1000)
                yield await self._exited(container, watch, duration_ms)
        finally:
            await self._remove(container)

    async def _pump(
        self, stream: Any, spec: RunSpec, watch: _Watch, container: DockerContainer
    ) -> AsyncIterator[Output]:
        decoders = {1: _decoder(), 2: _decoder()}
        names = {1: "stdout", 2: "stderr"}
        deadline = anyio.current_time() + spec.timeout_ms / 1000
        while True:
            # The scope covers the read only: a cancel scope must never span a yield.
            with anyio.CancelScope(deadline=deadline) as scope:
                try:
                    message = await stream.read_out()
                except (aiohttp.ClientError, OSError) as exc:
                    raise SandboxError("lost the connection to the Docker engine") from exc
            if scope.cancelled_caught:
                watch.timed_out = True
                await self._kill(container)
                break
            if message is None:
                break
            if message.stream not in decoders:
                continue
            text = decoders[message.stream].decode(message.data)
            capped = watch.add(message.stream, len(message.data))
            if text:
                yield Output(names[message.stream], text)  # type: ignore[arg-type]
            if capped:
                await self._kill(container)
                break
        for number, decoder in decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                yield Output(names[number], tail)  # type: ignore[arg-type]

    async def _exited(self, container: DockerContainer, watch: _Watch, duration_ms: int) -> Exited:
        with anyio.move_on_after(CLEANUP_TIMEOUT):
            await docker_call("wait for the sandbox", container.wait())
        info = await docker_call("inspect the sandbox", container.show())
        state = info.get("State", {})
        exit_code = state.get("ExitCode")
        return Exited(
            exit_code=None if watch.timed_out or watch.capped else exit_code,
            timed_out=watch.timed_out,
            oom_killed=bool(state.get("OOMKilled")),
            duration_ms=duration_ms,
            output_capped=watch.capped,
            pids_limited=watch.pids_limited,
        )

    async def _create(self, spec: RunSpec, deps_volume: str | None) -> DockerContainer:
        config = self.container_config(spec, deps_volume)
        container = await docker_call("create a sandbox", self._docker.containers.create(config))
        self._containers.add(container)
        try:
            await docker_call("copy the files", container.put_archive("/bundle", _bundle(spec)))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._remove(container)
            raise
        return container

    def container_config(self, spec: RunSpec, deps_volume: str | None) -> dict[str, Any]:
        s = self._settings
        memory = spec.memory_mb * 1024 * 1024
        tmpfs = (
            f"rw,nosuid,nodev,noexec,size={s.streamsvc_tmpfs_mb}m,"
            f"uid={SANDBOX_UID},gid={SANDBOX_UID},mode=0700"
        )
        env = {
            **spec.env,
            "HOME": "/work",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "STREAMSVC_ENTRY_POINT": spec.entry_point,
            "STREAMSVC_CONTEXT_FILE": "/work/.streamsvc/context.json",
        }
        mounts: list[dict[str, Any]] = [{"Type": "volume", "Target": "/bundle"}]
        if deps_volume is not None:
            mounts.append(
                {"Type": "volume", "Source": deps_volume, "Target": "/opt/deps", "ReadOnly": True}
            )
            env["PYTHONPATH"] = "/opt/deps"
        fsize = s.streamsvc_tmpfs_mb * 1024 * 1024
        return {
            "Image": s.streamsvc_sandbox_image,
            "Cmd": ["python3", "-u", "/bundle/.streamsvc/runner.py"],
            "User": f"{SANDBOX_UID}:{SANDBOX_UID}",
            "WorkingDir": "/work",
            "Env": [f"{key}={value}" for key, value in env.items()],
            "Labels": labels(self._owner, "run"),
            "AttachStdout": True,
            "AttachStderr": True,
            "NetworkDisabled": spec.network == "none",
            "HostConfig": {
                "NetworkMode": "none" if spec.network == "none" else NETWORK_NAME,
                "Memory": memory,
                "MemorySwap": memory,
                "NanoCpus": int(s.streamsvc_cpus * 1e9),
                "PidsLimit": s.streamsvc_pids_limit,
                "ReadonlyRootfs": True,
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Tmpfs": {"/work": tmpfs, "/tmp": tmpfs},
                "Mounts": mounts,
                "Ulimits": [
                    {"Name": "nofile", "Soft": 256, "Hard": 256},
                    {"Name": "fsize", "Soft": fsize, "Hard": fsize},
                ],
                "LogConfig": {"Type": "none", "Config": {}},
                "Init": True,
                "IpcMode": "private",
                "AutoRemove": False,
            },
        }

    async def _kill(self, container: DockerContainer) -> None:
        # Gone already, or the engine is down: removal reports it.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(CLEANUP_TIMEOUT),
            contextlib.suppress(*ENGINE_ERRORS),
        ):
            await container.kill()

    async def _remove(self, container: DockerContainer) -> None:
        if not await remove_container(container):
            log.warning("could not remove sandbox %s", container.id[:12])
        self._containers.discard(container)


class _Watch:
    """Counts output per stream against the cap and remembers why a run ended."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.sizes = {1: 0, 2: 0}
        self.capped = False
        self.timed_out = False
        self.pids_limited = False

    def add(self, stream: int, size: int) -> bool:
        """Count ``size`` bytes; true when the stream just passed the cap."""
        self.sizes[stream] += size
        if self.sizes[stream] > self.cap and not self.capped:
            self.capped = True
            return True
        return False


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _describe(dependencies: tuple[Dependency, ...]) -> str:
    return "installing " + ", ".join(dep.requirement for dep in dependencies)


def _bundle(spec: RunSpec) -> bytes:
    files = {name: text.encode() for name, text in spec.files.items()}
    files[".streamsvc/runner.py"] = RUNNER
    files[".streamsvc/context.json"] = json.dumps(spec.context).encode()
    return tar_bytes(files)
