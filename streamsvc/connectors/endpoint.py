"""POST /execute-connector: validate, run in the sandbox (or queue for an executor), answer.

Events: ``status`` per phase, ``stdout``/``stderr`` in order, then ``done`` (the
``ExecutionResult``) or one ``error`` (``connectors.events``). The run is pumped by
``runs.manager`` here, or by an executor with the Redis store; the response reads it.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.connectors.events import connector_events, transcript_for
from streamsvc.connectors.request import ExecuteRequest, decode_request, plan_off_loop
from streamsvc.errors import SandboxUnavailable
from streamsvc.runs.queue import RunQueue
from streamsvc.runs.respond import manager_of, respond, respond_queued
from streamsvc.web import observability
from streamsvc.web.auth import request_owner
from streamsvc.web.bodies import read_body, wants_stream
from streamsvc.web.services import services

log = logging.getLogger("streamsvc.execute")

_encoder = msgspec.json.Encoder()


def stored_request(body: ExecuteRequest) -> dict[str, Any]:
    """The request as a run record keeps it: ``env`` names only, their values dropped."""
    kept: dict[str, Any] = msgspec.to_builtins(body)
    kept["env"] = dict.fromkeys(body.env)
    return kept


def queue_payload(raw: bytes) -> tuple[bytes, bytes]:
    """The request as queued (``env`` names only) and its env values apart (JSON, b"" for
    none): the values leave Redis when an executor takes the run (README, Scaling out)."""
    whole: dict[str, Any] = msgspec.json.decode(raw)
    env = whole.get("env") or {}
    whole["env"] = dict.fromkeys(env)
    return _encoder.encode(whole), (_encoder.encode(env) if env else b"")


async def execute_endpoint(request: Request) -> Response:
    found = services(request)
    settings = found.settings
    raw = await read_body(request, settings.server)
    body = decode_request(raw)
    spec = await plan_off_loop(body, raw, settings.sandbox, settings.server.max_body_bytes)
    observability.current().entry_point = spec.entry_point
    stream = wants_stream(request, body.stream)
    owner = request_owner(request.scope, settings.server.api_keys)
    if found.queue is not None:
        return await _enqueue(request, found.queue, body, raw, owner, stream)
    sandbox = found.sandbox
    if sandbox is None:
        raise SandboxUnavailable("connector execution is not available on this server")
    transcript = await transcript_for(body, settings.sandbox.output_cap_bytes)
    manager = manager_of(found)
    run = await manager.create(
        "connector", owner=owner, background=body.background, request=stored_request(body)
    )
    events = connector_events(sandbox.run(spec), transcript, run.id)
    return await respond(request, found, run, events, background=body.background, stream=stream)


async def _enqueue(
    request: Request,
    queue: RunQueue,
    body: ExecuteRequest,
    raw: bytes,
    owner: str | None,
    stream: bool,
) -> Response:
    """Create the run and queue it for an executor (429 ``busy`` past the queue's capacity)."""
    found = services(request)
    manager = manager_of(found)
    record = manager.queued_record(
        "connector", owner=owner, background=body.background, request=stored_request(body)
    )
    payload, env = queue_payload(raw)
    await queue.enqueue(record, payload, env, followed=not body.background)
    return await respond_queued(
        request, found, record.id, background=body.background, stream=stream
    )
