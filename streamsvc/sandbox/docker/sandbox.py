"""The Docker sandbox: one fresh, locked-down container per run (an async context manager).

``DockerSandbox`` is a thin front: lifecycle, health, admission, dependencies and the choice of
a cold or warm start (``runs``); ``warm``, ``containers`` and ``deps_cache`` do the rest.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Any

import aiodocker
import anyio
from anyio.abc import TaskGroup

from streamsvc.errors import (
    DependencyInstallFailed,
    EngineUnreachable,
    SandboxError,
    SandboxFailed,
)
from streamsvc.sandbox.admission import Admission
from streamsvc.sandbox.docker.api import ENGINE_ERRORS, docker_call, owner_label, ping
from streamsvc.sandbox.docker.config import PoolKey
from streamsvc.sandbox.docker.containers import Containers
from streamsvc.sandbox.docker.deps_cache import DependencyCache
from streamsvc.sandbox.docker.firewall import BridgeIsolation
from streamsvc.sandbox.docker.runs import ColdStart, Start, WarmStart, execute
from streamsvc.sandbox.docker.warm import WarmMaker, WarmSandbox, watch
from streamsvc.sandbox.types import RunSpec, SandboxEvent, Status
from streamsvc.sandbox.warm_pool import WarmPool
from streamsvc.settings import SandboxSettings

log = logging.getLogger("streamsvc.sandbox")

#: Env names the interpreter reads at start-up: a request setting one runs cold.
COLD_ENV_PREFIXES = ("PYTHON", "LC_")
COLD_ENV_NAMES = frozenset({"LANG", "LANGUAGE"})
#: How often an install in progress is reported (its elapsed time).
PROGRESS_SECONDS = 2.0
#: How long a run that goes away waits for its dependency step to stop.
CLEANUP_WAIT = 10.0
#: How long /health trusts its last look at the engine before refreshing it.
ENGINE_LOOK_SECONDS = 2.0


class DockerSandbox:
    """``Sandbox`` on a Docker engine."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        settings: SandboxSettings,
        timings: Callable[[str, float], None] | None = None,
    ) -> None:
        """``timings`` is told ``("queue_wait", seconds)`` per admitted run and
        ``("install", seconds)`` per dependency install (the app's metrics)."""
        self._docker = docker
        self._settings = settings
        self._timings = timings
        self._owner = owner_label()
        self._tasks: TaskGroup | None = None
        self.admission = Admission(
            settings.max_concurrent_runs,
            settings.queue_size,
            max_wait=settings.queue_timeout_seconds,
        )
        self.bridge = BridgeIsolation(docker, settings.network)
        on_install = None if timings is None else lambda seconds: timings("install", seconds)
        self.deps = DependencyCache(docker, settings, self._owner, self.bridge, on_install)
        self.containers = Containers(docker, self._owner, self.deps)
        self.warm = WarmMaker(
            docker, settings, self._owner, self.deps, self.containers, self.bridge
        )
        self.pool: WarmPool[PoolKey, WarmSandbox] = WarmPool(
            settings.warm_pool_size,
            settings.warm_pool_keys,
            fill=self.warm.make,
            discard=self.warm.discard,
            watch=watch,
        )
        self.image_id: str | None = None
        # What /health reports of the engine: None until the first look.
        self._engine_ok: bool | None = None
        self._engine_seen_at = 0.0
        self._engine_looking = False

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> DockerSandbox:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self.pool.start(self._tasks)
        self.deps.start(self._tasks)
        self.containers.start(self._tasks)
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
            await self.containers.remove_leftovers()
            if self._settings.allow_bridge and await self.bridge.current() != "protected":
                log.warning("bridge runs refused: %s", self.bridge.reason)
        except SandboxError as exc:
            log.warning("sandbox not ready at start-up: %s", exc.message)

    async def _prepare(self) -> None:
        image = await docker_call(
            "inspect the sandbox image",
            self._docker.images.inspect(self._settings.image),
        )
        self.image_id = image["Id"]
        self.deps.use_image(image["Id"])

    async def engine_answers(self) -> bool:
        """The last look at the engine (and the bridge firewall), refreshed in the background
        once stale: a caller never waits on a slow engine (only the very first look does)."""
        stale = anyio.current_time() - self._engine_seen_at > ENGINE_LOOK_SECONDS
        if self._engine_ok is None or self._tasks is None:
            await self._look()
        elif stale and not self._engine_looking:
            self._engine_looking = True
            self._tasks.start_soon(self._look)
        return bool(self._engine_ok)

    async def health(self) -> dict[str, Any]:
        """``/health``'s ``sandbox`` component, from the last look (``engine_answers``)."""
        if not await self.engine_answers():
            return {"state": "unavailable", "image": self._settings.image}
        return {
            "state": "ready",
            "image": self._settings.image,
            "running": self.admission.running,
            "queued": len(self.admission.queue),
            "warm": self.pool.stats(),
            "deps": self.deps.stats(),
            "bridge": self.bridge.report()
            if self._settings.allow_bridge
            else {"state": "disabled"},
        }

    async def _look(self) -> None:
        """Look at the engine (and, when it answers, the bridge firewall: cached a few seconds)."""
        try:
            with anyio.fail_after(3):
                await self._docker.version()
                if self.image_id is None:
                    await self._prepare()
            self._engine_ok = True
        except (*ENGINE_ERRORS, TimeoutError, SandboxError):
            self._engine_ok = False
        finally:
            self._engine_seen_at = anyio.current_time()
            self._engine_looking = False
        if self._engine_ok and self._settings.allow_bridge:
            with contextlib.suppress(SandboxError), anyio.move_on_after(2):
                await self.bridge.current()

    async def aclose(self) -> None:
        """Kill and remove every sandbox (running, warm, finished), stop the tasks, close."""
        await self.pool.close()
        await self.containers.remove_all()
        tasks, self._tasks = self._tasks, None
        self.containers.stop()
        if tasks is not None:
            tasks.cancel_scope.cancel()
            await tasks.__aexit__(None, None, None)
        await self.containers.remove_all()  # a fill may have created one meanwhile
        with anyio.CancelScope(shield=True):
            await self._docker.close()

    # -- one run -----------------------------------------------------------------

    async def run(self, spec: RunSpec) -> AsyncIterator[SandboxEvent]:
        try:
            async with contextlib.aclosing(self._run(spec)) as events:
                async for event in events:
                    yield event
        except EngineUnreachable:
            self._engine_ok = False  # /health says so now, not at its next look
            raise

    async def _run(self, spec: RunSpec) -> AsyncGenerator[SandboxEvent, None]:
        await ping(self._docker)
        if self.image_id is None:
            await self._prepare()
        if self.containers.unremoved:
            await self.containers.remove_leftovers()
        if spec.network == "bridge":
            await self.bridge.ensure()  # refused (bridge_unprotected) unless firewalled
        entered = anyio.current_time()
        ticket = self.admission.enter()
        try:
            async for position in ticket.positions():
                yield Status("queued", f"waiting for a free slot (position {position})", position)
            if self._timings is not None:
                self._timings("queue_wait", anyio.current_time() - entered)
            prepared: list[tuple[str, WarmSandbox | None]] = []
            if spec.dependencies:
                try:
                    steps = self._prepare_dependencies(spec, prepared)
                    async with contextlib.aclosing(steps):
                        async for step in steps:
                            yield step
                except BaseException:  # gone while told the set is ready: let it go
                    if prepared:
                        await self._let_go(prepared.pop())
                    raise
            deps_volume, early = prepared[0] if prepared else (None, None)
            try:
                events = execute(
                    self._start(spec, deps_volume, early),
                    spec,
                    self._settings,
                    self._running_tasks(),
                )
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield event
            finally:
                if deps_volume is not None:
                    self.deps.release(deps_volume)
        finally:
            ticket.release()

    async def _prepare_dependencies(
        self, spec: RunSpec, prepared: list[tuple[str, WarmSandbox | None]]
    ) -> AsyncGenerator[Status, None]:
        """``_dependencies`` (its answer into ``prepared``), saying what happens: a cache hit,
        or an install and its elapsed time. A caller that leaves stops it (the set released)."""
        requirements = ", ".join(dep.requirement for dep in spec.dependencies)
        requested = len(spec.dependencies)
        started = anyio.current_time()

        def installing(elapsed: float | None = None) -> Status:
            took = "" if elapsed is None else f" ({elapsed:.0f} s)"
            message = f"installing {_plural(requested, 'package')}: {requirements}{took}"
            elapsed_ms = None if elapsed is None else int(elapsed * 1000)
            return Status("installing_dependencies", message, cache="miss",
                          requested=requested, elapsed_ms=elapsed_ms)  # fmt: skip

        cached = await self.deps.lookup(spec.dependencies)
        if cached is None:
            yield installing()
        done, scope = anyio.Event(), anyio.CancelScope()
        answers: list[tuple[str, WarmSandbox | None] | Exception] = []
        owner: list[str] = []  # who owns the answer's volume hold (and early sandbox)

        async def work() -> None:
            try:
                with scope:
                    answers.append(await self._dependencies(spec))
            except Exception as exc:  # raised to the caller below
                answers.append(exc)
            finally:
                done.set()
                if owner == ["gone"]:  # the caller left before this answer: let it go
                    await self._abandon(answers, owner)

        self._running_tasks().start_soon(work)
        try:
            while not done.is_set():
                with anyio.move_on_after(PROGRESS_SECONDS):
                    await done.wait()
                if not done.is_set():
                    yield installing(anyio.current_time() - started)
        except BaseException:  # gone: stop the work, or let go of what it prepared
            owner.append("gone")
            scope.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_WAIT):
                await done.wait()
            await self._abandon(answers, owner)
            raise
        if not answers:
            raise SandboxFailed("preparing the dependencies ended without an answer")
        if isinstance(answers[0], Exception):
            raise answers[0]
        owner.append("caller")
        prepared.append(answers[0])
        entry = await self.deps.lookup(spec.dependencies)
        size_kb = entry.size_kb if entry is not None else None
        packages = (entry.packages or None) if entry is not None else None
        held = f"{_plural(packages, 'package')} installed" if packages else requirements
        held += f", {size_kb / 1024:.1f} MB" if size_kb else ""
        elapsed = anyio.current_time() - started
        how = "cached" if cached is not None else f"installed in {elapsed:.1f} s"
        yield Status(
            "dependencies_ready", f"dependencies {how}: {requirements} ({held})",
            cache="hit" if cached is not None else "miss", requested=requested,
            packages=packages, size_kb=size_kb,
            elapsed_ms=None if cached is not None else int(elapsed * 1000),
        )  # fmt: skip

    async def _abandon(
        self, answers: list[tuple[str, WarmSandbox | None] | Exception], owner: list[str]
    ) -> None:
        """Let go of a prepared answer nobody will take (once, whoever gets here first)."""
        if answers and not isinstance(answers[0], Exception) and "released" not in owner:
            owner.append("released")
            await self._let_go(answers[0])

    async def _let_go(self, prepared: tuple[str, WarmSandbox | None]) -> None:
        """Release a set (and discard a sandbox) prepared for a run that went away."""
        self.deps.release(prepared[0])
        if prepared[1] is not None:
            with anyio.CancelScope(shield=True):
                await self.warm.discard(prepared[1])

    def _start(self, spec: RunSpec, deps_volume: str | None, early: WarmSandbox | None) -> Start:
        """Warm when the pool is on and the request allows it, else cold."""
        key = self.pool_key(spec, deps_volume)
        if key is None:
            image = self.image_id or self._settings.image
            cold = PoolKey(image, spec.network, deps_volume, spec.memory_mb)
            return ColdStart(self.warm, self.containers, cold, spec)
        return WarmStart(self.warm, self.pool, self.containers, key, spec.env, early)

    def _running_tasks(self) -> TaskGroup:
        assert self._tasks is not None, "use DockerSandbox as an async context manager"
        return self._tasks

    async def _dependencies(self, spec: RunSpec) -> tuple[str, WarmSandbox | None]:
        """The set's volume; when it must be installed first, also a sandbox made meanwhile.

        A new set's install (network, seconds) and the making of the sandbox that
        will run it (a container start) overlap: the sandbox mounts the volume as soon as it
        exists and imports nothing from it before the delivery.
        """
        names = [dep.name for dep in spec.dependencies]
        key = self.pool_key(spec, await self.deps.known(spec.dependencies))
        if key is None or key.deps_volume is not None:  # cold, or installed already
            ready = key is not None and self.pool.ready(key) > 0
            volume = await self.deps.ensure(spec.dependencies, mounted=ready)
            self.warm.remember(volume, names)
            return volume, None
        created = anyio.Event()
        early: list[WarmSandbox] = []

        async def make_early() -> None:
            await created.wait()
            key = self.pool_key(spec, self.deps.name_of(spec.dependencies))
            assert key is not None
            try:
                early.append(await self.warm.make(key, preload=False))
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
                await self.warm.discard(warm)
            if isinstance(failure, DependencyInstallFailed):
                with anyio.CancelScope(shield=True):  # the sandbox above kept it in use
                    await self.deps.remove(self.deps.name_of(spec.dependencies))
            raise
        self.warm.remember(volume, names)
        return volume, (early[0] if early else None)

    def pool_key(self, spec: RunSpec, deps_volume: str | None) -> PoolKey | None:
        """The warm pool's key for ``spec``; ``None`` when it must run cold."""
        if not self.pool.enabled or self.image_id is None or _needs_cold(spec.env):
            return None
        return PoolKey(self.image_id, spec.network, deps_volume, spec.memory_mb)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _needs_cold(env: dict[str, str]) -> bool:
    """Whether ``env`` sets something the interpreter reads only at start-up."""
    return any(name.startswith(COLD_ENV_PREFIXES) or name in COLD_ENV_NAMES for name in env)
