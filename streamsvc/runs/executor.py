"""``streamsvc executor``: takes queued connector runs from Redis and runs them on its engine.

Own slots, warm pool and dependency cache (a ``DockerSandbox``); heartbeats its leases, pumps
each run through a ``RunManager``, acks at the end, hears cancels over Pub/Sub. SIGTERM: no new
runs, its own finish (past the grace: interrupted). docs/architecture.md, "Executors".
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator

import anyio
import msgspec
from anyio.abc import TaskGroup

from streamsvc.connectors.events import connector_events, transcript_for
from streamsvc.connectors.request import decode_request, plan_off_loop
from streamsvc.errors import RunStoreUnavailable, SandboxError, SandboxFailed
from streamsvc.runs.backends import load_secret, open_store, queue_for
from streamsvc.runs.manager import STOP_TIMEOUT, Run, RunManager
from streamsvc.runs.queue import RunQueue, Taken
from streamsvc.runs.redis import SETTING, RedisRunStore
from streamsvc.runs.store import FINISHED
from streamsvc.sandbox.docker.api import connect, ping
from streamsvc.sandbox.docker.sandbox import DockerSandbox
from streamsvc.settings import Settings, SettingsError
from streamsvc.web import sse

log = logging.getLogger("streamsvc.executor")


async def open_queue(settings: Settings) -> tuple[RedisRunStore, RunQueue]:
    """The Redis store and its queue, checked (a ``SettingsError`` naming the setting)."""
    url = settings.runs.store
    if not url.startswith(("redis://", "rediss://")):
        raise SettingsError(f"{SETTING}={url}: an executor needs a redis:// or rediss:// store")
    store = open_store(url, settings.runs.retention_seconds)
    await store.open()
    queue = queue_for(store, settings.runs)
    assert isinstance(store, RedisRunStore) and queue is not None
    await queue.open()
    return store, queue


async def serve_executor(settings: Settings) -> None:
    """Run an executor until SIGTERM/SIGINT (then drain); bad settings raise ``SettingsError``."""
    store, queue = await open_queue(settings)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.aclose)
        host = settings.sandbox.docker_host
        docker = connect(host)
        try:
            await ping(docker)
        except SandboxError as exc:
            await docker.close()
            name = f"DOCKER_HOST={host}" if host else "DOCKER_HOST (unset: the local engine)"
            raise SettingsError(f"{name}: the Docker engine does not answer ({exc})") from None
        await stack.enter_async_context(store.writer())
        sandbox = await stack.enter_async_context(DockerSandbox(docker, settings.sandbox))
        secret = await load_secret(settings.runs, store)
        manager = await stack.enter_async_context(RunManager(store, settings.runs, secret))
        await Executor(settings, queue, manager, sandbox).serve()


class Executor:
    """The take loop, the heartbeat (and reaping) loop and the drain on SIGTERM."""

    def __init__(
        self, settings: Settings, queue: RunQueue, manager: RunManager, sandbox: DockerSandbox
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.manager = manager
        self.sandbox = sandbox
        self.name = manager.executor
        self.slots = settings.sandbox.max_concurrent_runs
        #: Queue entry -> the run taken with it.
        self.running: dict[str, Run] = {}
        self.stopping = anyio.Event()
        self._freed = anyio.Event()

    async def serve(self) -> None:
        reaped = await self.queue.reap(self.name)
        if reaped:
            log.info("%d run(s) of a lost executor ended executor_lost", len(reaped))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._heartbeats)
            tasks.start_soon(self._signals)
            log.info("executor %s ready: %d slot(s)", self.name, self.slots)
            await self._take_loop(tasks)
            log.info("executor %s draining %d run(s)", self.name, len(self.running))
            with anyio.move_on_after(self.settings.server.shutdown_grace_seconds):
                while self.running:
                    await self._wait_freed()
            for run in list(self.running.values()):
                run.stop("interrupted")
            with anyio.move_on_after(STOP_TIMEOUT):
                while self.running:
                    await self._wait_freed()
            tasks.cancel_scope.cancel()
        with anyio.CancelScope(shield=True), contextlib.suppress(RunStoreUnavailable):
            await self.queue.leave(self.name)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.stopping.set()
                self._freed.set()

    async def _wait_freed(self) -> None:
        await self._freed.wait()
        self._freed = anyio.Event()

    async def _take_loop(self, tasks: TaskGroup) -> None:
        engine_ok = True
        while not self.stopping.is_set():
            if len(self.running) >= self.slots:
                await self._wait_freed()
                continue
            # An engine that does not answer would fail every run taken (and, failing fast,
            # this executor would take most of the cluster's): leave them to the others.
            if not await self.sandbox.engine_answers():
                if engine_ok:
                    log.warning("the Docker engine does not answer: taking no run until it does")
                engine_ok = False
                with anyio.move_on_after(1.0):
                    await self.stopping.wait()
                continue
            if not engine_ok:
                log.info("the Docker engine answers again: taking runs")
            engine_ok = True
            try:
                taken = await self.queue.take(self.name, block_seconds=0.5)
                if taken is not None:
                    await self._begin(taken, tasks)
            except RunStoreUnavailable as exc:  # a taken run not begun: its lease lapses
                log.warning("the queue is unavailable (%s); trying again", exc)
                await anyio.sleep(1.0)

    async def _begin(self, taken: Taken, tasks: TaskGroup) -> None:
        record = taken.record
        if record is None or record.status in FINISHED:  # cancelled or deleted while queued
            await self.queue.ack(taken.entry)
            return
        run = self.manager.adopt(record)
        self.running[taken.entry] = run
        self.manager.start(run, self._source(run.id, taken.payload, taken.env))
        self.manager.unattended(run)  # a foreground run nobody follows (anywhere) is abandoned
        tasks.start_soon(self._finish, taken.entry, run)

    async def _source(
        self, run_id: str, payload: bytes, env: bytes | None
    ) -> AsyncIterator[sse.Event]:
        """The run's events: its request rebuilt with the env values, planned, then run."""
        body = msgspec.json.decode(payload)
        names = body.get("env") or {}
        values = msgspec.json.decode(env) if env else {}
        if set(names) - set(values):
            raise SandboxFailed("the run's env values expired before an executor took it")
        body["env"] = {name: values[name] for name in names}
        raw = msgspec.json.encode(body)
        request = decode_request(raw)
        config = self.settings
        spec = await plan_off_loop(request, raw, config.sandbox, config.server.max_body_bytes)
        transcript = await transcript_for(request, config.sandbox.output_cap_bytes)
        async for event in connector_events(self.sandbox.run(spec), transcript, run_id):
            yield event

    async def _finish(self, entry: str, run: Run) -> None:
        try:
            await run.done.wait()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    # Its end not stored (Redis away too long): left to lapse, so that a
                    # reaper ends it executor_lost rather than it staying running.
                    record = await self.manager.store.get(run.id)
                    if record is None or record.status in FINISHED:
                        await self.queue.ack(entry)
                    else:
                        log.warning("run %s: its end was not stored; its lease lapses", run.id)
                except RunStoreUnavailable:
                    log.warning("run %s: not acknowledged (Redis away); its lease lapses", run.id)
                self.running.pop(entry, None)
                self._freed.set()

    async def _heartbeats(self) -> None:
        every = self.settings.runs.heartbeat_seconds
        while True:
            try:
                entries = list(self.running)
                engine = "ready" if await self.sandbox.engine_answers() else "unavailable"
                lost = await self.queue.heartbeat(
                    self.name, entries, slots=self.slots, running=len(entries), engine=engine
                )
                for entry in lost:
                    run = self.running.get(entry)
                    if run is not None:
                        log.warning("run %s: lease lost; stopping it", run.id)
                        run.stop("interrupted")
                await self.queue.reap(self.name)
            except RunStoreUnavailable as exc:
                log.warning("heartbeat failed (%s)", exc)
            except Exception:  # e.g. Redis restarted empty: the group is made again
                log.exception("heartbeat failed")
                with contextlib.suppress(Exception):
                    await self.queue.open()
            await anyio.sleep(every)
