"""POST /execute-connector: validate, run in the sandbox, stream or answer.

Events: ``status`` per phase, ``stdout``/``stderr`` in order, then ``done`` (the
``ExecutionResult``) or one ``error``. The run is pumped by ``runs.manager``; the response reads
it, and a client that hangs up leaves it to its grace period (``runs.respond``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.connectors.redact import secret_values
from streamsvc.connectors.request import ExecuteRequest, decode_request, plan_off_loop
from streamsvc.connectors.transcript import Transcript
from streamsvc.errors import SandboxFailed, SandboxUnavailable
from streamsvc.runs.respond import manager_of, respond
from streamsvc.runs.store import FILES_EVENT, RunFile
from streamsvc.sandbox.types import Exited, Output, OutputFile, SandboxEvent, Status
from streamsvc.web import observability, sse
from streamsvc.web.auth import request_owner
from streamsvc.web.bodies import read_body, wants_stream
from streamsvc.web.services import services

log = logging.getLogger("streamsvc.execute")

_encoder = msgspec.json.Encoder()
#: Output chunks (and secrets) larger than this are redacted in a worker thread.
REDACT_INLINE_CHARS = 4096


async def _events(
    runs: AsyncIterator[SandboxEvent], transcript: Transcript, run_id: str
) -> AsyncIterator[sse.Event]:
    """Sandbox events as SSE events, ending with ``done``. The sandbox's first event is
    pulled before anything is yielded, so an engine that is down is a real status. Files
    past the inline cap go to the run's store first (``FILES_EVENT``, never in the log)."""
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
                listed = {item.name: item for item in event.files}
                kept = [(listed[d.name], d.data) for d in event.downloads if d.name in listed]
                event.downloads = []
                result = transcript.result(event)  # may mask a secret in a name, in place
                if kept:
                    yield sse.Event(
                        FILES_EVENT, [_stored(item, data, run_id) for item, data in kept]
                    )
                error = result.error.code if result.error is not None else None
                observability.current().execution(result.exit_code, result.ok, error)
                yield sse.Event("done", result)
                return
    finally:
        with anyio.CancelScope(shield=True):
            await runs.aclose()  # type: ignore[attr-defined]


def _stored(item: OutputFile, data: bytes, run_id: str) -> RunFile:
    """The file for the run's store; its listing gets the url and no content."""
    item.url = f"/runs/{run_id}/files/{quote(item.name, safe='/')}"
    item.content_base64 = None
    return RunFile(item.name, item.media_type or "application/octet-stream", data)


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
    manager = manager_of(found)
    run = await manager.create(
        "connector",
        owner=request_owner(request.scope, settings.server.api_keys),
        background=body.background,
        request=stored_request(body),
    )
    events = _events(sandbox.run(spec), transcript, run.id)
    stream = wants_stream(request, body.stream)
    return await respond(request, found, run, events, background=body.background, stream=stream)
