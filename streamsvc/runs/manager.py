"""The run lifecycle: each run's events are pumped into the store by a task the manager owns.

Responses only read (``reader``); a run outlives them by a grace, then is cancelled as abandoned.
Cancel, graceful stop, start-up recovery and retention live here. Over 400 lines: one run's
whole life, for the embedded path and the executor alike (docs/architecture.md, "Runs").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import anyio
import msgspec
from anyio.abc import TaskGroup

from streamsvc.errors import (
    ErrorEnvelope,
    RunCancelled,
    RunInterrupted,
    RunLogFull,
    SandboxFailed,
    ServiceError,
)
from streamsvc.runs.live import Held
from streamsvc.runs.store import (
    FILES_EVENT,
    RunKind,
    RunRecord,
    RunStatus,
    RunStore,
    StoredEvent,
    executor_alive,
    executor_name,
)
from streamsvc.settings import RunSettings
from streamsvc.web import observability, sse

log = logging.getLogger("streamsvc.runs")

_encoder = msgspec.json.Encoder()
Reason = Literal["cancelled", "abandoned", "interrupted"]
_ENDINGS: dict[Reason, tuple[RunStatus, type[ServiceError], str]] = {
    "cancelled": ("cancelled", RunCancelled, "the run was cancelled"),
    "abandoned": ("cancelled", RunCancelled, "the run was abandoned: no reader came back in time"),
    "interrupted": ("interrupted", RunInterrupted, "the server stopped during the run"),
}
#: Most events one run's log holds (its bytes are bounded by the output caps; this bounds
#: the count, e.g. of one-character lines); past it the run is stopped with ``run_log_full``.
MAX_LOG_EVENTS = 100_000
#: Longest wait, on shutdown, for the runs to record their end.
STOP_TIMEOUT = 10.0
#: How long a cancel heard for a run not here yet is kept for its ``adopt``.
EARLY_CANCEL_SECONDS = 30.0


def new_run_id() -> str:
    """A random run id (128 bits, URL-safe) that does not begin with ``-``, so that
    ``streamsvc runs show ID`` does not take it for an option."""
    while (run_id := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return run_id


class StoredFrame(sse.Event, frozen=True):
    """An event read back from the store: ``data`` is its encoded JSON, ``id`` its stored id."""

    id: int = 0


def encode_frame(event: sse.Event) -> bytes:
    """SSE framing for readers: the stored id; a reader's own failure (shutdown) has none,
    so a client's ``Last-Event-ID`` always names a stored event."""
    if isinstance(event, StoredFrame):
        return sse.frame(event.data, event.name, event.id)
    return sse.frame(event.data, event.name)


@dataclass(eq=False)
class Run:
    """A run this process executes."""

    id: str
    kind: RunKind
    background: bool
    grace: float
    owner: str | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: Set once the first event is stored, or the run failed before it.
    first: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    early: ServiceError | None = None
    failure: ServiceError | None = None
    reason: Reason | None = None
    readers: int = 0
    timer: anyio.CancelScope | None = None

    def stop(self, reason: Reason) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()


class RunManager:
    """Starts, follows, cancels and ends runs; entered in the app's lifespan."""

    def __init__(
        self, store: RunStore, settings: RunSettings, secret: bytes, name: str | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.executor = name or executor_name()
        self._secret = secret
        self._runs: dict[str, Run] = {}
        self._held = Held(settings.max_active_runs, settings.max_active_runs_per_key)
        self._tasks: TaskGroup | None = None
        self._pruning = anyio.CancelScope()
        #: Cancels heard for runs not here (yet), oldest first: run id -> when.
        self._early_cancels: dict[str, float] = {}

    async def __aenter__(self) -> RunManager:
        interrupted = await self.store.interrupt_unfinished(executor_alive)
        if interrupted:
            log.info("%d run(s) a stopped process left are now interrupted", len(interrupted))
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._prune_loop)
        # Cancels asked through another process (a worker, or an API node on Redis).
        self._tasks.start_soon(self._listen_cancels)
        return self

    async def _listen_cancels(self) -> None:
        async for run_id in self.store.cancels(self.executor):
            run = self._runs.get(run_id)
            if run is not None:
                run.stop("cancelled")
            else:  # an executor may hear it between its take and its adopt: kept a while
                now = time.monotonic()
                self._early_cancels[run_id] = now
                for seen, at in list(self._early_cancels.items()):
                    if now - at > EARLY_CANCEL_SECONDS or len(self._early_cancels) > 1024:
                        del self._early_cancels[seen]

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tasks is not None
        self._pruning.cancel()
        for run in list(self._runs.values()):
            run.stop("interrupted")
        with anyio.move_on_after(STOP_TIMEOUT, shield=True):
            for run in list(self._runs.values()):
                await run.done.wait()
        self._tasks.cancel_scope.cancel()  # grace timers; a pump still going records its end
        return await self._tasks.__aexit__(kind, exc, tb)

    # -- tokens ------------------------------------------------------------------------------

    def token(self, run_id: str) -> str:
        """A read-only token for one run's events (for ``EventSource``, which sends no key)."""
        digest = hmac.new(self._secret, b"run-events:" + run_id.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()[:24]).decode()

    def token_valid(self, run_id: str, token: str) -> bool:
        return hmac.compare_digest(self.token(run_id).encode(), token.encode())

    # -- starting ----------------------------------------------------------------------------

    async def create(
        self, kind: RunKind, *, owner: str | None, background: bool, request: Any
    ) -> Run:
        self._held.admit(owner)  # else background or dropped runs could pile up without end
        run_id = new_run_id()
        grace = (
            self.settings.connector_grace_seconds
            if kind == "connector"
            else (self.settings.chat_grace_seconds)
        )
        record = RunRecord(
            id=run_id, kind=kind, status="queued", created_at=time.time(), owner=owner,
            background=background, request=request, executor=self.executor,
        )  # fmt: skip
        run = Run(run_id, kind, background, grace, owner)
        self._runs[run_id] = run
        self._held.hold(owner)
        try:
            await self.store.create(record)
        except BaseException:
            self._release(run)
            raise
        return run

    def _release(self, run: Run) -> None:
        if self._runs.pop(run.id, None) is not None:
            self._held.release(run.owner)

    @staticmethod
    def queued_record(
        kind: RunKind, *, owner: str | None, background: bool, request: Any
    ) -> RunRecord:
        """A new run's record for an executor to take (no executor named yet; the queue
        stores it with the run's entry)."""
        return RunRecord(
            id=new_run_id(), kind=kind, status="queued", created_at=time.time(),
            owner=owner, background=background, request=request, executor=None,
        )  # fmt: skip

    def adopt(self, record: RunRecord) -> Run:
        """A queued run created by another node, executed here (``runs.executor``)."""
        self.store.adopt(msgspec.structs.replace(record, executor=self.executor))
        grace = self.settings.connector_grace_seconds
        run = Run(record.id, record.kind, record.background, grace, record.owner)
        self._held.hold(record.owner)  # released with the run (its slots bound how many)
        self._runs[record.id] = run
        if self._early_cancels.pop(record.id, None) is not None:
            run.stop("cancelled")  # heard before it was ours: it ends before it starts
        return run

    def start(self, run: Run, source: AsyncIterator[sse.Event]) -> None:
        """Pump ``source`` into the store in the manager's task group (the caller's context
        variables go with it, so the request's facts still see the run)."""
        assert self._tasks is not None, "the manager is not entered"
        self._tasks.start_soon(self._guarded_pump, run, source, name=f"run {run.id}")

    async def started(self, run: Run) -> None:
        """Return once the first event is stored; raise the error that came instead."""
        await run.first.wait()
        if run.early is not None:
            raise run.early

    # -- the pump ----------------------------------------------------------------------------

    async def _guarded_pump(self, run: Run, source: AsyncIterator[sse.Event]) -> None:
        """A pump never takes the task group (and every other run) down with it."""
        try:
            await self._pump(run, source)
        except Exception:
            log.exception("run %s: the pump failed", run.id)

    async def _pump(self, run: Run, source: AsyncIterator[sse.Event]) -> None:
        next_id = 0
        ended = False

        async def put(name: str, data: Any) -> None:
            nonlocal next_id
            next_id += 1
            await self.store.append(run.id, [StoredEvent(next_id, name, data)])

        async def end(status: RunStatus, exc: ServiceError) -> None:
            nonlocal ended
            body = exc.body()
            envelope = _encoder.encode(ErrorEnvelope(body))
            await put("error", envelope)
            ended = True  # the terminal event is in: nothing may end the run a second time
            with anyio.CancelScope(shield=True):
                await self.store.finish(run.id, status, error=msgspec.Raw(_encoder.encode(body)))

        try:
            with run.scope:
                try:
                    event = await anext(source, None)
                    if event is None:
                        raise SandboxFailed("the run produced nothing")
                except ServiceError as exc:
                    run.early = exc
                    observability.current().failed(exc.code)
                    await end("failed", exc)
                    return
                await self.store.mark_running(run.id)
                while event is not None:
                    if event.name == FILES_EVENT:  # kept with the run, not logged
                        for item in event.data:
                            await self.store.put_file(run.id, item.name, item.data, item.media_type)
                        event = await anext(source, None)
                        continue
                    if next_id >= MAX_LOG_EVENTS and event.name != "done":
                        raise RunLogFull(f"the run's log reached {MAX_LOG_EVENTS} events")
                    data = event.data
                    if event.name == "done" and "run_id" in getattr(data, "__struct_fields__", ()):
                        data = msgspec.structs.replace(data, run_id=run.id)
                        if "executor" in data.__struct_fields__:
                            data = msgspec.structs.replace(data, executor=self.executor)
                    encoded = _encoder.encode(data)
                    await put(event.name, encoded)
                    run.first.set()
                    if event.name == "done":
                        ended = True
                        with anyio.CancelScope(shield=True):
                            result = msgspec.Raw(encoded)
                            await self.store.finish(run.id, "completed", result=result)
                        return
                    event = await anext(source, None)
                raise SandboxFailed("the run ended without an answer")
        except ServiceError as exc:
            run.failure = exc
            observability.current().failed(exc.code)
            with anyio.CancelScope(shield=True):
                await end("failed", exc)
        except Exception:
            log.exception("run %s failed", run.id)
            run.failure = ServiceError("internal error")
            with anyio.CancelScope(shield=True):
                await end("failed", run.failure)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()  # the container is removed / the upstream call closed
                if not ended:  # cancelled: by a client, as abandoned, or by shutdown
                    status, kind, message = _ENDINGS[run.reason or "cancelled"]
                    failure = kind(message)
                    run.failure = run.failure or failure
                    if not run.first.is_set():
                        run.early = failure
                    try:
                        await end(status, failure)
                    except Exception:
                        log.exception("run %s: its end could not be recorded", run.id)
                run.first.set()
                run.done.set()
                self._release(run)
                if run.timer is not None:
                    run.timer.cancel()

    # -- readers -----------------------------------------------------------------------------

    async def reader(self, run_id: str, after: int) -> AsyncGenerator[sse.Event, None]:
        """The run's events after ``after`` as ``StoredFrame``s, ending with the terminal one.

        While a reader is attached, the run never counts as abandoned; when the last one of a
        foreground run leaves before the end, the grace period starts."""
        run = self._runs.get(run_id)
        if run is not None:
            run.readers += 1
            if run.timer is not None:
                run.timer.cancel()
                run.timer = None
        try:
            async for event in self.store.follow(run_id, after):
                yield StoredFrame(event.name, event.data, event.id)
        finally:
            if run is not None:
                run.readers -= 1
                if run.readers == 0 and not run.background and not run.done.is_set():
                    self._abandon_later(run)

    def unattended(self, run: Run) -> None:
        """Start the grace period now unless a reader is attached: the response that will
        read the run may never start iterating (its client gone right after the headers)."""
        if run.readers == 0 and not run.background and not run.done.is_set():
            self._abandon_later(run)

    def _abandon_later(self, run: Run) -> None:
        if run.timer is not None:
            run.timer.cancel()
        timer = anyio.CancelScope()
        run.timer = timer

        async def wait() -> None:
            with timer:
                while True:
                    await anyio.sleep(run.grace)
                    if run.readers:
                        return  # a reader came back: its leaving starts a new timer
                    if not await self.store.read_elsewhere(run.id):
                        break  # else read through another node: not abandoned
                log.info("run %s: no reader for %g s; cancelled as abandoned", run.id, run.grace)
                run.stop("abandoned")

        assert self._tasks is not None
        self._tasks.start_soon(wait)

    async def outcome(self, run: Run) -> bytes:
        """Follow ``run`` to its end (as a reader); the final object, or its error raised."""
        final = b""
        async for event in self.reader(run.id, 0):
            if event.name == "done":
                final = event.data
        if run.failure is not None:
            raise run.failure
        if not final:
            raise SandboxFailed("the run ended without an answer")
        return final

    # -- control -----------------------------------------------------------------------------

    def running(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    async def cancel(self, run_id: str) -> None:
        """Stop a run this process executes and wait (bounded) until its end is recorded."""
        run = self._runs.get(run_id)
        if run is None:
            return
        run.stop("cancelled")
        with anyio.move_on_after(STOP_TIMEOUT):
            await run.done.wait()

    async def _prune_loop(self) -> None:
        retention = self.settings.retention_seconds
        with self._pruning:
            while True:
                now = time.time()
                try:
                    pruned = await self.store.prune(now - retention, now - 2 * retention)
                except Exception:
                    log.exception("pruning the run store failed")
                else:
                    if pruned:
                        log.info("retention: %d run(s) pruned", pruned)
                await anyio.sleep(min(600.0, max(0.05, retention / 4)))
