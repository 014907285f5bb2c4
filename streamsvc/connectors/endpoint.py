"""POST /execute-connector: validate, run in the sandbox, stream or answer.

Events: ``status`` per phase, ``stdout``/``stderr`` in order, then ``done`` (the
``ExecutionResult``) or one ``error``. The run is pumped by ``runs.manager``; the response reads
it, and a client that hangs up leaves it to its grace period (``runs.respond``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.connectors.redact import MIN_SECRET_LENGTH
from streamsvc.connectors.request import ExecuteRequest, decode_request, plan_off_loop
from streamsvc.connectors.transcript import Transcript
from streamsvc.errors import SandboxFailed, SandboxUnavailable
from streamsvc.runs.respond import manager_of, respond
from streamsvc.sandbox.types import Exited, Output, SandboxEvent, Status
from streamsvc.web import observability, sse
from streamsvc.web.auth import request_owner
from streamsvc.web.bodies import read_body, wants_stream
from streamsvc.web.services import services

log = logging.getLogger("streamsvc.execute")

_encoder = msgspec.json.Encoder()
#: Output chunks (and secrets) larger than this are redacted in a worker thread.
REDACT_INLINE_CHARS = 4096


async def _events(
    runs: AsyncIterator[SandboxEvent], transcript: Transcript
) -> AsyncIterator[sse.Event]:
    """Sandbox events as SSE events, ending with ``done``. The sandbox's first event is
    pulled before anything is yielded, so an engine that is down is a real status."""
    try:
        pending = await anext(runs, None)
        if pending is None:
            raise SandboxFailed("the sandbox produced nothing")
        yield sse.Event("status", Status("validated", "the connector is valid"))
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
                observability.current().execution(result.exit_code, result.ok)
                yield sse.Event("done", result)
                return
    finally:
        with anyio.CancelScope(shield=True):
            await runs.aclose()  # type: ignore[attr-defined]


def stored_request(body: ExecuteRequest) -> dict[str, Any]:
    """The request as a run record keeps it: ``env`` names only, their values dropped."""
    kept: dict[str, Any] = msgspec.to_builtins(body)
    kept["env"] = dict.fromkeys(body.env)
    return kept


async def execute_endpoint(request: Request) -> Response:
    found = services(request)
    settings = found.settings
    raw = await read_body(request, settings.server)
    body = decode_request(raw)
    spec = await plan_off_loop(body, raw, settings.sandbox, settings.server.max_body_bytes)
    sandbox = found.sandbox
    if sandbox is None:
        raise SandboxUnavailable("connector execution is not available on this server")
    secrets = [value for value in spec.env.values() if len(value) >= MIN_SECRET_LENGTH]
    cap = settings.sandbox.output_cap_bytes
    if sum(map(len, secrets)) > REDACT_INLINE_CHARS:  # building the scanner is CPU-bound too
        transcript = await anyio.to_thread.run_sync(Transcript, secrets, cap)
    else:
        transcript = Transcript(secrets, cap)
    manager = manager_of(found)
    run = await manager.create(
        "connector",
        owner=request_owner(request.scope, settings.server.api_keys),
        background=body.background,
        request=stored_request(body),
    )
    events = _events(sandbox.run(spec), transcript)
    stream = wants_stream(request, body.stream)
    return await respond(request, found, run, events, background=body.background, stream=stream)
