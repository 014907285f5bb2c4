"""The Docker sandbox: one fresh, locked-down container per run, via aiodocker.

This is the one module that drives run containers. Its parts:
``docker_api`` (the bounded, error-translating engine calls), ``sandbox_config``
(the create request: every hardening setting, the same for cold and warm
sandboxes), ``warm_protocol`` (what the server and a warm runner say over the
attach stream: framing, delivery, nonce, ready and end lines), ``deps_cache``
(the dependency volumes, mounted read-only at ``/opt/deps``) and ``warm_pool``
(the bookkeeping of warm sandboxes).

Two ways to run (``sandbox_runner`` is the program inside either way):

- **Warm** (``STREAMSVC_WARM_POOL_SIZE`` > 0, the fast path). A warm sandbox
  is created, attached (stdin, stdout, stderr) and started *before* any
  request, with a request-independent config: no user env, no files, no
  secrets; its runner waits on stdin. Its ``PoolKey`` is everything fixed at
  creation that differs between requests (image, network mode, dependency
  volume, memory limit), so the limits of a request apply exactly without
  touching the container. A run sends one delivery over the attach stream
  (``warm_protocol``; **not** ``put_archive``), the wall clock starts at
  delivery, and the run ends at the runner's end lines (exit code and the
  cgroup's OOM verdict), with no Docker round trip. Each warm
  sandbox is used for one run and then destroyed; the pool refills the key
  in the background once the run is over. A request whose key has no ready
  sandbox gets one made the same way on the spot (for a dependency set not
  installed yet, while it installs). A request whose env sets a variable the
  interpreter reads at start-up (``PYTHON*``, ``LC_*``, ``LANG``,
  ``LANGUAGE``; ``LD_*`` is refused earlier) runs cold, since a warm interpreter has already
  started. Warm sandboxes of a dependency set *preload* it (import its
  top-level modules) when that import is clean; the env variables it read
  are recorded, and such a sandbox is never used for a request that sets
  one of them (``_Warm.fits``; that set is then no longer preloaded).
- **Cold** (the pool off, or the env above). The container is created with the
  request's env; files reach it by ``put_archive`` into an anonymous volume at
  ``/bundle`` (root-owned, read-only to the program; Docker refuses
  ``put_archive`` on a read-only root filesystem, and tmpfs is mounted only
  at start); the runner copies them into ``/work``. The run ends when Docker
  reports the container stopped.

Limits are reported, never silent. The wall clock is enforced by a watchdog
task in the sandbox's own task group, so it holds even while a slow client
stalls the stream: at ``timeoutMs`` it closes the output stream (an engine
with unread output would not let the container die) and kills the
container: ``timed_out``. Past the output cap on either stream the run is
killed the same way: ``output_capped``. ``oom_killed`` is the kernel's
verdict (Docker's for cold runs, the memory cgroup's counter read by the
runner for warm ones). ``pids_limited`` is set when the runner reports that
the cgroup's pids limit refused a fork (see ``sandbox_runner``). Every
container is removed when its run ends, however it ends (in the background,
so the answer does not wait for it); one that cannot be removed (the engine
is down) is retried once the engine answers again, shutdown removes every
container, warm ones included, and a server that starts removes what dead
earlier processes left (all carry the owner label).

Use it as an async context manager (the app's lifespan does): it owns the
task group of the watchdogs, the pool's fills and the removals.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Any

import aiodocker
import anyio
from aiodocker.containers import DockerContainer
from aiodocker.stream import Message, Stream
from anyio.abc import TaskGroup

from streamsvc.connectors.dependencies import Dependency
from streamsvc.errors import (
    DependencyInstallFailed,
    SandboxError,
    SandboxFailed,
    SandboxUnavailable,
)
from streamsvc.sandbox.admission import Admission
from streamsvc.sandbox.docker import config as sandbox_config
from streamsvc.sandbox.docker.api import (
    CLEANUP_TIMEOUT,
    ENGINE_ERRORS,
    LABEL_OWNER,
    LABEL_ROLE,
    container_labels,
    create_container,
    docker_call,
    ensure_network,
    kill_container,
    list_managed,
    owner_alive,
    owner_label,
    ping,
    remove_container,
    tar_bytes,
)
from streamsvc.sandbox.docker.config import PoolKey, run_env
from streamsvc.sandbox.docker.deps_cache import DependencyCache
from streamsvc.sandbox.docker.warm_protocol import (
    RUNNER,
    STREAMS,
    EndLines,
    ReadyReport,
    bundle_files,
    delivery,
    frame,
    new_nonce,
    ready_report,
)
from streamsvc.sandbox.runner.runner import PIDS_MARKER
from streamsvc.sandbox.types import Exited, Output, RunSpec, SandboxEvent, Status
from streamsvc.sandbox.warm_pool import WarmPool
from streamsvc.settings import Settings

log = logging.getLogger("streamsvc.sandbox")

#: Seconds a new warm sandbox may take to say it is ready.
READY_TIMEOUT = 30.0
#: Env names the interpreter reads at start-up: a request setting one runs cold.
COLD_ENV_PREFIXES = ("PYTHON", "LC_")
COLD_ENV_NAMES = frozenset({"LANG", "LANGUAGE"})
#: Roles of this process's own run containers (``warm``: made ahead of its request).
RUN_ROLES = frozenset({"run", "warm"})


class _Warm:
    """A started sandbox whose runner waits on the attach stream for one delivery."""

    def __init__(
        self,
        container: DockerContainer,
        stream: Stream,
        key: PoolKey,
        env_reads: frozenset[str] | None,
    ) -> None:
        self.container = container
        self.stream = stream
        self.key = key
        #: Preloaded: the env variables its imports read (``"*"``: all); else ``None``.
        self.env_reads = env_reads

    def fits(self, env: dict[str, str]) -> bool:
        """Whether a run with ``env`` sees what it would have seen in a cold sandbox.

        An import that listed the whole environment (``"*"``) fits a request with
        no env: it missed only ``STREAMSVC_ENTRY_POINT``, which names a file.
        """
        if self.env_reads is None:
            return True
        changed = {*env, "STREAMSVC_ENTRY_POINT"}
        return not ("*" in self.env_reads and env) and self.env_reads.isdisjoint(changed)


class DockerSandbox:
    """``Sandbox`` on a Docker engine."""

    def __init__(self, docker: aiodocker.Docker, settings: Settings) -> None:
        self._docker = docker
        self._settings = settings
        self._owner = owner_label()
        self._containers: set[DockerContainer] = set()
        self._holds: dict[str, str] = {}  # container id -> the dependency volume it mounts
        self._set_names: dict[str, list[str]] = {}  # dependency volume -> distribution names
        self._no_preload: set[str] = set()  # dependency volumes whose import is not clean
        self._unremoved = False
        self._tasks: TaskGroup | None = None
        self.admission = Admission(
            settings.streamsvc_max_concurrent_runs,
            settings.streamsvc_queue_size,
            max_wait=settings.streamsvc_queue_timeout_seconds,
        )
        self.deps = DependencyCache(docker, settings, self._owner)
        self.pool: WarmPool[PoolKey, _Warm] = WarmPool(
            settings.streamsvc_warm_pool_size,
            settings.streamsvc_warm_pool_keys,
            fill=self._fill,
            discard=self._discard,
            watch=_watch,
        )
        self.image_id: str | None = None

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> DockerSandbox:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self.pool.start(self._tasks)
        self.deps.start(self._tasks)
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
        self.deps.use_image(image["Id"])

    async def remove_leftovers(self) -> int:
        """Remove run containers of dead earlier processes, and ours that a lost engine kept."""
        removed, failed = 0, False
        active = {container.id for container in self._containers}
        for container in await list_managed(self._docker):
            found = container_labels(container)
            owner = found.get(LABEL_OWNER, "")
            if owner == self._owner:
                stale = found.get(LABEL_ROLE) in RUN_ROLES and container.id not in active
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
            "warm": self.pool.stats(),
            "deps": self.deps.stats(),
        }

    async def aclose(self) -> None:
        """Kill and remove every sandbox (running, warm, finished), stop the tasks, close."""
        await self.pool.close()
        await self._remove_all()
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            tasks.cancel_scope.cancel()
            await tasks.__aexit__(None, None, None)
        await self._remove_all()  # a fill may have created one meanwhile
        with anyio.CancelScope(shield=True):
            await self._docker.close()

    async def _remove_all(self) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for container in list(self._containers):
                    tg.start_soon(self._remove, container)

    # -- one run -----------------------------------------------------------------

    async def run(self, spec: RunSpec) -> AsyncIterator[SandboxEvent]:
        await ping(self._docker)
        if self.image_id is None:
            await self._prepare()
        if self._unremoved:
            await self.remove_leftovers()
        ticket = self.admission.enter()
        try:
            async for position in ticket.positions():
                yield Status("queued", f"waiting for a free slot (position {position})", position)
            deps_volume, early = None, None
            if spec.dependencies:
                yield Status("installing_dependencies", _describe(spec.dependencies))
                deps_volume, early = await self._dependencies(spec)
            try:
                key = self.pool_key(spec, deps_volume)
                if key is None:
                    events = self._execute(spec, deps_volume)
                else:
                    events = self._execute_warm(spec, key, early)
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield event
            finally:
                if deps_volume is not None:
                    self.deps.release(deps_volume)
        finally:
            ticket.release()

    async def _dependencies(self, spec: RunSpec) -> tuple[str, _Warm | None]:
        """The set's volume; when it must be installed first, also a sandbox made meanwhile.

        A new set's install (network, seconds) and the making of the sandbox that
        will run it (~0.3 s) overlap: the sandbox mounts the volume as soon as it
        exists and imports nothing from it before the delivery.
        """
        names = [dep.name for dep in spec.dependencies]
        key = self.pool_key(spec, await self.deps.known(spec.dependencies))
        if key is None or key.deps_volume is not None:  # cold, or installed already
            ready = key is not None and self.pool.ready(key) > 0
            volume = await self.deps.ensure(spec.dependencies, mounted=ready)
            self._set_names[volume] = names
            return volume, None
        created = anyio.Event()
        early: list[_Warm] = []

        async def make_early() -> None:
            await created.wait()
            key = self.pool_key(spec, self.deps.name_of(spec.dependencies))
            assert key is not None
            try:
                early.append(await self._fill(key, preload=False))
            except Exception as exc:  # the run makes one later instead
                log.info("could not start a sandbox during the install: %s", exc)

        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(make_early)
                try:
                    volume = await self.deps.ensure(spec.dependencies, created)
                except Exception as exc:  # raised below, not wrapped in the group's
                    failure = exc
                    tg.cancel_scope.cancel()
                if not created.is_set():  # it was there already: nothing to overlap
                    tg.cancel_scope.cancel()
            if failure is not None:
                raise failure
        except BaseException:
            for warm in early:
                await self._discard(warm)
            if isinstance(failure, DependencyInstallFailed):
                with anyio.CancelScope(shield=True):  # the sandbox above kept it in use
                    await self.deps.remove(self.deps.name_of(spec.dependencies))
            raise
        self._set_names[volume] = names
        return volume, (early[0] if early else None)

    def pool_key(self, spec: RunSpec, deps_volume: str | None) -> PoolKey | None:
        """The warm pool's key for ``spec``; ``None`` when it must run cold."""
        if not self.pool.enabled or self.image_id is None or _needs_cold(spec.env):
            return None
        return PoolKey(self.image_id, spec.network, deps_volume, spec.memory_mb)

    async def _execute(
        self, spec: RunSpec, deps_volume: str | None
    ) -> AsyncGenerator[SandboxEvent, None]:
        """A cold run: create with the request in it, ``put_archive``, start, wait for the end."""
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
            self._dispose(container, None)

    async def _execute_warm(
        self, spec: RunSpec, key: PoolKey, early: _Warm | None = None
    ) -> AsyncGenerator[SandboxEvent, None]:
        """A warm run: a started sandbox (from the pool, else made now), one delivery, its end."""
        warm = early if early is not None else await self.pool.take(key, refill=False)
        if warm is not None and not warm.fits(spec.env):
            # Its preloaded imports read a variable this request sets: they would
            # have seen another value in a cold run. Stop preloading this set.
            if key.deps_volume is not None:
                self._no_preload.add(key.deps_volume)
            self._dispose(warm.container, warm.stream)
            warm = None
        run: _Run | None = None
        try:
            if warm is None:
                yield Status("starting", "starting a sandbox (none was warm)")
                warm = await self._fill(key, preload=False)
            else:
                yield Status("starting", "using a warm sandbox")
            run = _Run(
                warm.container,
                warm.stream,
                self._settings.streamsvc_output_cap_bytes,
                nonce=new_nonce(),
            )
            await self._deliver(run, spec, key)
            yield Status("running", f"running {spec.entry_point}")
            async for output in self._pump(run):
                yield output
            yield await self._exited(run)
        finally:
            if run is not None:
                run.watchdog.cancel()
            if warm is not None:
                self._dispose(warm.container, warm.stream)
            self.pool.touch(key)  # refilled now that the run no longer needs the CPU

    async def _create(self, spec: RunSpec, deps_volume: str | None) -> DockerContainer:
        if spec.network == "bridge":
            await ensure_network(self._docker)
        container = await create_container(self._docker, self.container_config(spec, deps_volume))
        self._adopt(container, deps_volume)
        try:
            await docker_call("copy the files", container.put_archive("/bundle", _bundle(spec)))
        except BaseException:
            await self._remove(container)
            raise
        return container

    async def _start(self, run: _Run, timeout_ms: int) -> None:
        await docker_call("start the sandbox", run.container.start())
        self._start_clock(run, timeout_ms)

    def _start_clock(self, run: _Run, timeout_ms: int, started: float | None = None) -> None:
        assert self._tasks is not None, "use DockerSandbox as an async context manager"
        run.started = anyio.current_time() if started is None else started
        run.deadline = run.started + timeout_ms / 1000
        self._tasks.start_soon(self._watchdog, run)

    async def _deliver(self, run: _Run, spec: RunSpec, key: PoolKey) -> None:
        """Send the run to a waiting runner; the wall clock starts now."""
        assert run.nonce is not None
        message = frame(delivery(spec, run_env(spec, key.deps_volume), run.nonce))
        started = anyio.current_time()
        await docker_call("deliver the run", run.stream.write_in(message))
        self._start_clock(run, spec.timeout_ms, started)

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
            data = message.data if run.ends is None else run.ends.feed(message.stream, message.data)
            passed_cap = run.count(message.stream, len(data))
            text = decoders[message.stream].decode(data)
            if text:
                yield Output(STREAMS[message.stream], run.note(message.stream, text))
            if passed_cap:
                run.capped = True
                await run.stop()
                break
            if run.ends is not None and run.ends.complete:
                run.ended_at = anyio.current_time()
                break
        for number, decoder in decoders.items():
            held = b"" if run.ends is None else run.ends.leftover(number)
            tail = decoder.decode(held, final=True)
            if tail:
                yield Output(STREAMS[number], run.note(number, tail))

    async def _exited(self, run: _Run) -> Exited:
        """The run's end: from the runner's end lines (warm), else from Docker."""
        end = run.ends.verdict() if run.ends is not None else None
        if end is not None and run.ended_at is not None and not (run.timed_out or run.capped):
            run.watchdog.cancel()
            oom = end.oom_killed
            if oom is None:
                info = await docker_call("inspect the sandbox", run.container.show())
                oom = bool(info.get("State", {}).get("OOMKilled"))
            return Exited(
                exit_code=end.exit_code,
                timed_out=False,
                oom_killed=oom,
                duration_ms=int((run.ended_at - run.started) * 1000),
                pids_limited=run.pids_limited,
            )
        # Wait for the container to stop (the watchdog bounds that), then read its state.
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

    # -- warm sandboxes ---------------------------------------------------------------

    async def _fill(self, key: PoolKey, preload: bool = True) -> _Warm:
        """Create, attach and start a sandbox for ``key``; return once its runner waits.

        With ``preload``, a sandbox with dependencies imports them first (when
        that is clean; a set whose import is not is never preloaded again).
        """
        volume = key.deps_volume
        names = self._set_names.get(volume) if preload and volume is not None else None
        if volume in self._no_preload:
            names = None
        if volume is not None and not await self.deps.exists(volume):
            # Removed since it was checked (Docker would make an empty one in its place).
            raise SandboxUnavailable("the dependency set was removed meanwhile; try again")
        if key.network == "bridge":
            await ensure_network(self._docker)
        container = await create_container(self._docker, self.warm_config(key, names))
        self._adopt(container, volume)
        stream = container.attach(stdin=True, stdout=True, stderr=True, logs=False)
        try:
            await docker_call("attach to the sandbox", stream.__aenter__())
            await docker_call("start the sandbox", container.start())
            await docker_call("load the runner", stream.write_in(frame(RUNNER)))
            report = await docker_call("wait for the sandbox", _ready(stream), READY_TIMEOUT)
        except BaseException as exc:
            if names and volume is not None and isinstance(exc, SandboxError):
                self._no_preload.add(volume)  # e.g. importing it passed the memory limit
            with anyio.CancelScope(shield=True), contextlib.suppress(*ENGINE_ERRORS):
                await stream.close()
            await self._remove(container)
            raise
        if report.refused and volume is not None:
            log.info("not preloading %s: %s", self._set_names.get(volume), report.refused)
            self._no_preload.add(volume)
            await self._discard(_Warm(container, stream, key, None))
            return await self._fill(key, preload=False)
        reads = frozenset(report.env) if report.modules else None
        return _Warm(container, stream, key, reads)

    async def _discard(self, warm: _Warm) -> None:
        """Destroy a warm sandbox that was never used."""
        with anyio.CancelScope(shield=True), contextlib.suppress(*ENGINE_ERRORS):
            await warm.stream.close()
        await self._remove(warm.container)

    # -- containers -------------------------------------------------------------------

    def _adopt(self, container: DockerContainer, deps_volume: str | None) -> None:
        """Track a new container (and the dependency volume it mounts) until it is removed."""
        self._containers.add(container)
        if deps_volume is not None:
            self._holds[container.id] = deps_volume
            self.deps.hold(deps_volume)

    def _dispose(self, container: DockerContainer, stream: Stream | None) -> None:
        """Remove a used container in the background: the answer does not wait for it."""

        async def dispose() -> None:
            if stream is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(*ENGINE_ERRORS):
                    await stream.close()
            await self._remove(container)

        if self._tasks is not None:
            self._tasks.start_soon(dispose)
        # else: shutting down; aclose removes every container it still tracks

    async def _remove(self, container: DockerContainer) -> None:
        """Remove a container we track (once: a second caller finds it claimed)."""
        if container not in self._containers:
            return
        self._containers.discard(container)
        volume = self._holds.pop(container.id, None)
        if volume is not None:
            self.deps.release(volume)
        if not await remove_container(container):
            log.warning("could not remove sandbox %s; will retry", container.id[:12])
            self._unremoved = True

    # -- the container -------------------------------------------------------------

    def container_config(self, spec: RunSpec, deps_volume: str | None) -> dict[str, Any]:
        """The engine's create request for a cold run (``sandbox_config.cold_config``)."""
        return sandbox_config.cold_config(self._settings, self._owner, spec, deps_volume)

    def warm_config(self, key: PoolKey, preload: list[str] | None = None) -> dict[str, Any]:
        """The engine's create request for a warm sandbox (``sandbox_config.warm_config``)."""
        return sandbox_config.warm_config(self._settings, self._owner, key, preload)


class _Run:
    """One started sandbox: its container, its output stream, and why it stopped."""

    def __init__(
        self, container: DockerContainer, stream: Stream, cap: int, nonce: str | None = None
    ) -> None:
        self.container = container
        self.stream = stream
        self.cap = cap
        #: Warm runs: the runner's end lines carry this nonce.
        self.nonce = nonce
        self.ends = EndLines(nonce) if nonce is not None else None
        self.ended_at: float | None = None
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
            raise SandboxUnavailable("lost the connection to the Docker engine") from exc
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
    return tar_bytes({name: text.encode() for name, text in bundle_files(spec).items()})


def _needs_cold(env: dict[str, str]) -> bool:
    """Whether ``env`` sets something the interpreter reads only at start-up."""
    return any(name.startswith(COLD_ENV_PREFIXES) or name in COLD_ENV_NAMES for name in env)


async def _ready(stream: Stream) -> ReadyReport:
    """Wait for a new warm sandbox's runner to say it is ready; anything else is a failure."""
    message = await stream.read_out()
    data = message.data if message is not None and message.stream == 1 else b""
    report = ready_report(data)
    if report is not None:
        return report
    raise SandboxFailed("a new sandbox did not start its runner")


async def _watch(warm: _Warm) -> None:
    """Return when an idle warm sandbox says anything at all: it has ended, or gone wrong."""
    await warm.stream.read_out()
