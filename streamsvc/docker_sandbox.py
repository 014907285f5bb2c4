"""The Docker sandbox: one fresh, locked-down container per run, via aiodocker.

This is the one module that drives containers (``docker_api`` holds the
bounded, error-translating calls it uses; ``deps_cache`` the dependency
volumes).

A run container is created from the sandbox image with (``container_config``):
a non-root user, all capabilities dropped, ``no-new-privileges``, a read-only
root filesystem, size-capped tmpfs at ``/work``, ``/tmp`` and ``/dev/shm``,
memory = memory+swap = ``memoryMb``, a CPU quota, a pids limit, nofile and
fsize ulimits, no host mounts, no log driver (output is read through attach,
so a flood never reaches the host's disk), tini as PID 1 (so whatever the
program leaves behind dies with it), and either no network at all or the
service's own bridge network with inter-container traffic disabled. Files
reach it by ``put_archive`` into an anonymous volume at ``/bundle``
(root-owned, read-only to the program; Docker refuses ``put_archive`` on a
read-only root filesystem, and tmpfs is mounted only at start); the runner
copies them into ``/work``. Dependencies come from ``DependencyCache`` as a
read-only volume at ``/opt/deps``, so they work under ``network_mode: none``.

Limits are reported, never silent. The wall clock is enforced by a watchdog
task in the sandbox's own task group, so it holds even while a slow client
stalls the stream: at ``timeoutMs`` it closes the output stream (an engine
with unread output would not let the container die) and kills the
container: ``timed_out``. Past the output cap on either stream the run is
killed the same way: ``output_capped``. ``oom_killed`` is Docker's own
verdict. ``pids_limited`` is set when the runner reports that the cgroup's
pids limit refused a fork (see ``sandbox_runner``). Every container is
removed when its run ends, however it ends; one that cannot be removed (the
engine is down) is retried once the engine answers again, and a server that
starts removes what dead earlier processes left.

Use it as an async context manager (the app's lifespan does): it owns the
watchdogs' task group.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from types import TracebackType
from typing import Any, Literal

import aiodocker
import anyio
from aiodocker.containers import DockerContainer
from aiodocker.stream import Message, Stream
from anyio.abc import TaskGroup

from .admission import Admission
from .dependencies import Dependency
from .deps_cache import DependencyCache
from .docker_api import (
    CLEANUP_TIMEOUT,
    ENGINE_ERRORS,
    LABEL_OWNER,
    LABEL_ROLE,
    NETWORK_NAME,
    SANDBOX_UID,
    container_labels,
    create_container,
    docker_call,
    ensure_network,
    kill_container,
    labels,
    list_managed,
    owner_alive,
    owner_label,
    remove_container,
    tar_bytes,
)
from .errors import SandboxError
from .sandbox import Exited, Output, RunSpec, SandboxEvent, Status
from .sandbox_runner import PIDS_MARKER
from .settings import Settings

log = logging.getLogger("streamsvc.sandbox")

RUNNER = resources.files("streamsvc").joinpath("sandbox_runner.py").read_bytes()
CONTEXT_FILE = "/work/.streamsvc/context.json"
NOFILE_LIMIT = 256
STREAMS: dict[int, Literal["stdout", "stderr"]] = {1: "stdout", 2: "stderr"}


class DockerSandbox:
    """``Sandbox`` on a Docker engine."""

    def __init__(self, docker: aiodocker.Docker, settings: Settings) -> None:
        self._docker = docker
        self._settings = settings
        self._owner = owner_label()
        self._containers: set[DockerContainer] = set()
        self._unremoved = False
        self._tasks: TaskGroup | None = None
        self.admission = Admission(
            settings.streamsvc_max_concurrent_runs, settings.streamsvc_queue_size
        )
        self.deps = DependencyCache(docker, settings, self._owner)
        self.image_id: str | None = None

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> DockerSandbox:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

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

    async def remove_leftovers(self) -> int:
        """Remove run containers of dead earlier processes, and ours that a lost engine kept."""
        removed, failed = 0, False
        active = {container.id for container in self._containers}
        for container in await list_managed(self._docker):
            found = container_labels(container)
            owner = found.get(LABEL_OWNER, "")
            if owner == self._owner:
                stale = found.get(LABEL_ROLE) == "run" and container.id not in active
            else:
                stale = not owner_alive(owner)
            if stale:
                gone = await remove_container(container)
                removed += gone
                failed = failed or not gone
        if removed:
            log.info("removed %d leftover sandbox(es)", removed)
        self._unremoved = failed
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
        """Kill and remove every sandbox still running, stop the watchdogs, close the client."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for container in list(self._containers):
                    tg.start_soon(self._remove, container)
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            tasks.cancel_scope.cancel()
            await tasks.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self._docker.close()

    # -- one run -----------------------------------------------------------------

    async def run(self, spec: RunSpec) -> AsyncIterator[SandboxEvent]:
        await docker_call("answer a ping", self._docker.version(), limit=5)
        if self.image_id is None:
            await self._prepare()
        if self._unremoved:
            await self.remove_leftovers()
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
        run: _Run | None = None
        try:
            async with _attached(container) as stream:
                run = _Run(container, stream, self._settings.streamsvc_output_cap_bytes)
                yield Status("starting", "starting the sandbox")
                await self._start(run, spec.timeout_ms)
                yield Status("running", f"running {spec.entry_point}")
                async for output in self._pump(run):
                    yield output
                yield await self._exited(run)
        finally:
            if run is not None:
                run.watchdog.cancel()
            await self._remove(container)

    async def _create(self, spec: RunSpec, deps_volume: str | None) -> DockerContainer:
        if spec.network == "bridge":
            await ensure_network(self._docker)
        container = await create_container(self._docker, self.container_config(spec, deps_volume))
        self._containers.add(container)
        try:
            await docker_call("copy the files", container.put_archive("/bundle", _bundle(spec)))
        except BaseException:
            await self._remove(container)
            raise
        return container

    async def _start(self, run: _Run, timeout_ms: int) -> None:
        assert self._tasks is not None, "use DockerSandbox as an async context manager"
        await docker_call("start the sandbox", run.container.start())
        run.started = anyio.current_time()
        run.deadline = run.started + timeout_ms / 1000
        self._tasks.start_soon(self._watchdog, run)

    async def _watchdog(self, run: _Run) -> None:
        """Kill the run at its deadline, whatever its consumer is doing."""
        with run.watchdog:
            await anyio.sleep_until(run.deadline)
            run.timed_out = True
            await run.stop()

    async def _pump(self, run: _Run) -> AsyncIterator[Output]:
        """The program's output as it comes, until it ends or is stopped."""
        decoders = {number: _decoder() for number in STREAMS}
        while (message := await run.read()) is not None:
            if message.stream not in STREAMS:
                continue
            passed_cap = run.count(message.stream, len(message.data))
            text = decoders[message.stream].decode(message.data)
            if text:
                yield Output(STREAMS[message.stream], run.note(message.stream, text))
            if passed_cap:
                run.capped = True
                await run.stop()
                break
        for number, decoder in decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                yield Output(STREAMS[number], run.note(number, tail))

    async def _exited(self, run: _Run) -> Exited:
        """Wait for the container to stop (the watchdog bounds that), then read its state."""
        limit = max(run.deadline - anyio.current_time(), 0) + CLEANUP_TIMEOUT
        await docker_call("wait for the sandbox", run.container.wait(), limit=limit)
        run.watchdog.cancel()
        duration_ms = int(((run.stopped_at or anyio.current_time()) - run.started) * 1000)
        info = await docker_call("inspect the sandbox", run.container.show())
        state = info.get("State", {})
        killed = run.timed_out or run.capped
        return Exited(
            exit_code=None if killed else state.get("ExitCode"),
            timed_out=run.timed_out,
            oom_killed=bool(state.get("OOMKilled")),
            duration_ms=duration_ms,
            output_capped=run.capped,
            pids_limited=run.pids_limited,
        )

    async def _remove(self, container: DockerContainer) -> None:
        if await remove_container(container):
            self._containers.discard(container)
            return
        log.warning("could not remove sandbox %s; will retry", container.id[:12])
        self._containers.discard(container)
        self._unremoved = True

    # -- the container -------------------------------------------------------------

    def container_config(self, spec: RunSpec, deps_volume: str | None) -> dict[str, Any]:
        """The engine's create request for one run: every hardening setting is here."""
        s = self._settings
        memory = spec.memory_mb * 1024 * 1024
        tmpfs_bytes = s.streamsvc_tmpfs_mb * 1024 * 1024
        tmpfs = (
            f"rw,nosuid,nodev,noexec,size={s.streamsvc_tmpfs_mb}m,"
            f"uid={SANDBOX_UID},gid={SANDBOX_UID},mode=0700"
        )
        env = {
            **spec.env,
            "HOME": "/work",
            "PYTHONDONTWRITEBYTECODE": "1",
            "STREAMSVC_ENTRY_POINT": spec.entry_point,
            "STREAMSVC_CONTEXT_FILE": CONTEXT_FILE,
        }
        mounts: list[dict[str, Any]] = [{"Type": "volume", "Target": "/bundle"}]
        if deps_volume is not None:
            mounts.append(
                {"Type": "volume", "Source": deps_volume, "Target": "/opt/deps", "ReadOnly": True}
            )
            env["PYTHONPATH"] = "/opt/deps"
        return {
            "Image": s.streamsvc_sandbox_image,
            "Cmd": ["python3", "/bundle/.streamsvc/runner.py"],
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
                "MemorySwap": memory,  # memory + swap: no swap at all
                "NanoCpus": int(s.streamsvc_cpus * 1e9),
                "PidsLimit": s.streamsvc_pids_limit,
                "ReadonlyRootfs": True,
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Privileged": False,
                "Tmpfs": {"/work": tmpfs, "/tmp": tmpfs},
                "ShmSize": tmpfs_bytes,
                "IpcMode": "private",
                "Mounts": mounts,
                "Binds": [],
                "Ulimits": [
                    {"Name": "nofile", "Soft": NOFILE_LIMIT, "Hard": NOFILE_LIMIT},
                    {"Name": "fsize", "Soft": tmpfs_bytes, "Hard": tmpfs_bytes},
                ],
                "LogConfig": {"Type": "none", "Config": {}},
                "Init": True,
                "AutoRemove": False,
            },
        }


class _Run:
    """One started sandbox: its container, its output stream, and why it stopped."""

    def __init__(self, container: DockerContainer, stream: Stream, cap: int) -> None:
        self.container = container
        self.stream = stream
        self.cap = cap
        self.sizes = dict.fromkeys(STREAMS, 0)
        self.started = 0.0
        self.deadline = 0.0
        self.watchdog = anyio.CancelScope()
        self.timed_out = False
        self.capped = False
        self.pids_limited = False
        self.stopped_at: float | None = None
        self._stderr_tail = ""

    async def read(self) -> Message | None:
        """The next chunk of output, or ``None`` at the end (or once stopped)."""
        try:
            message: Message | None = await self.stream.read_out()
        except ENGINE_ERRORS as exc:
            if self.stopped_at is not None:
                return None  # we closed the stream ourselves
            raise SandboxError("lost the connection to the Docker engine") from exc
        return message

    def count(self, stream: int, size: int) -> bool:
        """Count ``size`` bytes of ``stream``; true once it is past the cap.

        The chunk that passes the cap is still passed on (the transcript cuts
        its copy at the cap and flags it), so a stream carries at most one
        chunk (32 KiB) more than the cap.
        """
        self.sizes[stream] += size
        return self.sizes[stream] > self.cap

    def note(self, stream: int, text: str) -> str:
        """Watch stderr for the runner's process-limit line; ``text`` unchanged."""
        if stream == 2 and not self.pids_limited:
            seen = self._stderr_tail + text
            self.pids_limited = PIDS_MARKER.strip() in seen
            self._stderr_tail = seen[-len(PIDS_MARKER) :]
        return text

    async def stop(self) -> None:
        """Close the output stream first (an engine with unread output hangs a kill), then kill."""
        if self.stopped_at is not None:
            return
        self.stopped_at = anyio.current_time()
        with contextlib.suppress(*ENGINE_ERRORS):
            await self.stream.close()
        await kill_container(self.container)


@contextlib.asynccontextmanager
async def _attached(container: DockerContainer) -> AsyncIterator[Stream]:
    """The container's stdout and stderr, attached before it starts so nothing is missed."""
    stream = container.attach(stdout=True, stderr=True, logs=False)
    await docker_call("attach to the sandbox", stream.__aenter__())
    try:
        yield stream
    finally:
        with contextlib.suppress(*ENGINE_ERRORS):
            await stream.close()


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _describe(dependencies: tuple[Dependency, ...]) -> str:
    return "installing " + ", ".join(dep.requirement for dep in dependencies)


def _bundle(spec: RunSpec) -> bytes:
    files = {name: text.encode() for name, text in spec.files.items()}
    files[".streamsvc/runner.py"] = RUNNER
    files[".streamsvc/context.json"] = json.dumps(spec.context).encode()
    return tar_bytes(files)
