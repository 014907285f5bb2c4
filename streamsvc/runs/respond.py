"""How POST /chat and POST /execute-connector answer for their run: 202, an SSE reader, or JSON.

The run is pumped by the manager; the response only reads it. Every answer carries ``X-Run-ID``;
a failure before the first event is a real status (the run is then ``failed`` with it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import anyio
import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from streamsvc.errors import (
    Busy,
    NotConfigured,
    RunStoreUnavailable,
    SandboxFailed,
    ServiceError,
    ShuttingDown,
)
from streamsvc.runs.manager import Run, RunManager, encode_frame
from streamsvc.runs.queue import RunQueue
from streamsvc.runs.store import RunStatus
from streamsvc.web import sse
from streamsvc.web.rendering import error_response
from streamsvc.web.services import Services

_encoder = msgspec.json.Encoder()
GONE = "the client left before the run's first event"


class Accepted(msgspec.Struct):
    """The answer to ``"background": true`` (202, with ``Location: /runs/{id}``)."""

    id: str
    status: RunStatus
    url: str
    #: The run's events (SSE), with a read-only token for this run alone (``EventSource``).
    events_url: str


def manager_of(found: Services) -> RunManager:
    if found.runs is None:
        raise NotConfigured("runs are not available on this server")
    return found.runs


def accepted(manager: RunManager, run: Run | str) -> Response:
    run_id = run if isinstance(run, str) else run.id
    url = f"/runs/{run_id}"
    body = Accepted(run_id, "queued", url, f"{url}/events?token={manager.token(run_id)}")
    return Response(
        _encoder.encode(body),
        status_code=202,
        media_type="application/json",
        headers={"Location": url, "X-Run-ID": run_id},
    )


def _classes(base: type[ServiceError]) -> list[type[ServiceError]]:
    found = [base]
    for sub in base.__subclasses__():
        found += _classes(sub)
    return found


def stored_error(data: bytes) -> ServiceError:
    """A stored ``error`` event (``{"error": {code, message, ...}}``) as the error it was,
    with its class's HTTP status (a run executed on another node failed before its start)."""
    body: dict[str, Any] = msgspec.json.decode(data).get("error") or {}
    code = str(body.get("code", "internal_error"))
    # The most specific class that defines the code (SandboxUnavailable, not SandboxError).
    defining = [c for c in _classes(ServiceError) if c.__dict__.get("code") == code]
    kind = defining[-1] if defining else ServiceError
    return kind(
        str(body.get("message", "the run failed")),
        code=code,
        path=body.get("path"),
        details=body.get("details"),
    )


async def _stop_queued(found: Services, run_id: str) -> None:
    """Withdraw a run still queued, else ask its executor to cancel it."""
    queue, store = found.queue, manager_of(found).store
    if queue is None or await queue.withdraw(run_id, {"code": "cancelled", "message": GONE}):
        return
    record = await store.get(run_id)
    request_cancel = getattr(store, "request_cancel", None)
    if record is not None and record.executor is not None and request_cancel is not None:
        await request_cancel(run_id, record.executor)


async def untaken(queue: RunQueue, waited: float) -> str:
    """Why a foreground run waited ``waited`` s untaken (its ``busy`` message): no executor
    heartbeats on this prefix (a misconfiguration), or they were all busy."""
    head = f"no executor took the run within {waited:g} s (STREAMSVC_QUEUE_TIMEOUT_SECONDS)"
    try:
        seen = await queue.executors(2 * queue.lease_ms / 1000)
    except RunStoreUnavailable:
        return f"{head}; try again shortly"
    if not seen:
        return f"{head}: none heartbeats under the key prefix {queue.prefix!r} (/health: queue)"
    return f"{head}: {len(seen)} executor(s) seen, all busy; try again shortly"


async def respond_queued(
    request: Request, found: Services, run_id: str, *, background: bool, stream: bool
) -> Response:
    """Answer for a run queued for an executor (Redis store): its events come from Redis."""
    manager = manager_of(found)
    if background:
        return accepted(manager, run_id)
    server = found.settings.server
    headers = {"X-Run-ID": run_id}
    wait = found.settings.sandbox.queue_timeout_seconds
    Following = tuple[sse.Event, AsyncIterator[sse.Event]]

    async def first_event() -> Following:
        """The run's first event and its reader; past the queue's timeout with no executor
        having taken the run: ``busy`` (the run ends so; an executor skips it)."""
        while True:
            events = manager.reader(run_id, 0)
            with anyio.move_on_after(wait):
                first = await anext(events, None)
                if first is None:
                    raise SandboxFailed("the run ended without an answer")
                if first.name == "error":
                    raise stored_error(first.data)
                return first, events
            if found.queue is not None:
                message = await untaken(found.queue, wait)
                if await found.queue.withdraw(run_id, {"code": Busy.code, "message": message}):
                    raise Busy(message, retry_after=1)
            # taken meanwhile: it runs, bounded by its own timeout

    try:
        if stream:
            first, events = await sse.before_headers(request, found.streams, first_event())
            return sse.event_response(
                first,
                events,
                found.streams,
                keepalive=server.keepalive_seconds,
                headers=headers,
                send_timeout=server.send_timeout_seconds,
                encode=encode_frame,
            )

        async def outcome() -> bytes:
            event, events = await first_event()
            while event.name != "done":
                following = await anext(events, None)
                if following is None:
                    raise SandboxFailed("the run ended without an answer")
                if following.name == "error":
                    raise stored_error(following.data)
                event = following
            return bytes(event.data)

        final = await sse.before_headers(request, found.streams, outcome())
    except ClientDisconnect:  # the client never learnt the run's id: stop it, as here
        with anyio.CancelScope(shield=True), anyio.move_on_after(5), suppress(ServiceError):
            await _stop_queued(found, run_id)
        return Response(status_code=499, headers=headers)
    except ServiceError as exc:
        response = error_response(exc, request.url.path)
        response.headers.update(headers)
        return response
    answer = sse.JsonAnswer(final, server.send_timeout_seconds)
    answer.headers.update(headers)
    return answer


async def respond(
    request: Request,
    found: Services,
    run: Run,
    source: AsyncIterator[sse.Event],
    *,
    background: bool,
    stream: bool,
) -> Response:
    """Start ``run`` on ``source`` and answer for it."""
    manager = manager_of(found)
    manager.start(run, source)
    if background:
        return accepted(manager, run)
    server = found.settings.server
    headers = {"X-Run-ID": run.id}
    try:
        # Engine down, busy, upstream refusing: a real status before any header. A hang-up
        # or a shutdown meanwhile stops the run (the client never learnt its id).
        await sse.before_headers(request, found.streams, manager.started(run))
        if stream:
            manager.unattended(run)  # until the response's reader attaches
            return sse.event_response(
                None,
                manager.reader(run.id, 0),
                found.streams,
                keepalive=server.keepalive_seconds,
                headers=headers,
                send_timeout=server.send_timeout_seconds,
                encode=encode_frame,
            )
        final = await sse.before_headers(request, found.streams, manager.outcome(run))
    except ClientDisconnect:
        run.stop("cancelled")
        return Response(status_code=499, headers=headers)  # nobody is listening; for the log
    except ServiceError as exc:
        if exc is not run.early and exc is not run.failure:
            run.stop("interrupted" if isinstance(exc, ShuttingDown) else "cancelled")
        response = error_response(exc, request.url.path)
        response.headers.update(headers)
        return response
    answer = sse.JsonAnswer(final, server.send_timeout_seconds)
    answer.headers.update(headers)
    return answer
