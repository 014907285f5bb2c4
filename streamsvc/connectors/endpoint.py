"""POST /execute-connector: validate, run in the sandbox, stream or answer.

Events: ``status`` per phase, ``stdout``/``stderr`` in order, then ``done`` (the
``ExecutionResult``) or one ``error``. The rule: a client that hangs up stops the run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from streamsvc.connectors.redact import secret_values
from streamsvc.connectors.request import decode_request, plan_off_loop
from streamsvc.connectors.transcript import ExecutionResult, Transcript
from streamsvc.errors import SandboxFailed, SandboxUnavailable
from streamsvc.sandbox.types import Exited, Output, SandboxEvent, Status
from streamsvc.web import observability, sse
from streamsvc.web.bodies import read_body, wants_stream
from streamsvc.web.services import services

log = logging.getLogger("streamsvc.execute")

_encoder = msgspec.json.Encoder()
#: Output chunks (and secrets) larger than this are redacted in a worker thread.
REDACT_INLINE_CHARS = 4096


async def _events(
    first: SandboxEvent, runs: AsyncIterator[SandboxEvent], transcript: Transcript
) -> AsyncIterator[sse.Event]:
    """Sandbox events as SSE events, ending with ``done``."""
    try:
        yield sse.Event("status", Status("validated", "the connector is valid"))
        pending: SandboxEvent | None = first
        while True:
            event = pending if pending is not None else await anext(runs, None)
            pending = None
            if event is None:
                raise SandboxFailed("the sandbox ended without an exit status")
            if isinstance(event, Output):
                if len(event.text) > REDACT_INLINE_CHARS:  # CPU-bound: off the event loop
                    forwarded = await anyio.to_thread.run_sync(transcript.output, event)
                else:
                    forwarded = transcript.output(event)
                if forwarded is not None:
                    yield sse.Event(forwarded.stream, {"text": forwarded.text})
            elif isinstance(event, Status):
                yield sse.Event("status", event)
            elif isinstance(event, Exited):
                for tail in transcript.flush():
                    yield sse.Event(tail.stream, {"text": tail.text})
                result = transcript.result(event)
                error = result.error.code if result.error is not None else None
                observability.current().execution(result.exit_code, result.ok, error)
                yield sse.Event("done", result)
                return
    finally:
        with anyio.CancelScope(shield=True):
            await runs.aclose()  # type: ignore[attr-defined]


async def _collect(events: AsyncIterator[sse.Event]) -> ExecutionResult:
    """Run to the end for a JSON answer."""
    try:
        async for event in events:
            if event.name == "done":
                result: ExecutionResult = event.data
                return result
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]
    raise SandboxFailed("the run ended without an answer")


async def execute_endpoint(request: Request) -> Response:
    found = services(request)
    settings = found.settings
    raw = await read_body(request, settings.server)
    body = decode_request(raw)
    spec = await plan_off_loop(body, raw, settings.sandbox, settings.server.max_body_bytes)
    observability.current().entry_point = spec.entry_point
    sandbox = found.sandbox
    if sandbox is None:
        raise SandboxUnavailable("connector execution is not available on this server")
    secrets = secret_values(body.env, body.secrets)
    cap = settings.sandbox.output_cap_bytes
    if sum(map(len, secrets)) > REDACT_INLINE_CHARS:  # building the scanner is CPU-bound too
        transcript = await anyio.to_thread.run_sync(Transcript, secrets, cap)
    else:
        transcript = Transcript(secrets, cap)
    runs = sandbox.run(spec)
    try:
        # Engine down, busy: a real status before any header. A hang-up or a shutdown
        # while waiting stops the run (sse.before_headers).
        first = await sse.before_headers(request, found.streams, sse.start(runs))
        if first is None:
            raise SandboxFailed("the sandbox produced nothing")
        events = _events(first, runs, transcript)
        if wants_stream(request, body.stream):
            return sse.event_response(
                None,
                events,
                found.streams,
                keepalive=settings.server.keepalive_seconds,
                send_timeout=settings.server.send_timeout_seconds,
            )
        result = await sse.before_headers(request, found.streams, _collect(events))
    except ClientDisconnect:
        log.info("client disconnected before the answer; the run was stopped")
        return Response(status_code=499)  # nobody is listening; for the access log
    return sse.JsonAnswer(_encoder.encode(result), settings.server.send_timeout_seconds)
