"""How POST /chat and POST /execute-connector answer for their run: 202, an SSE reader, or JSON.

The run is pumped by the manager; the response only reads it. Every answer carries ``X-Run-ID``;
a failure before the first event is a real status (the run is then ``failed`` with it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from streamsvc.errors import NotConfigured, ServiceError, ShuttingDown
from streamsvc.runs.manager import Run, RunManager, encode_frame
from streamsvc.runs.store import RunStatus
from streamsvc.web import sse
from streamsvc.web.rendering import error_response
from streamsvc.web.services import Services

_encoder = msgspec.json.Encoder()


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


def accepted(manager: RunManager, run: Run) -> Response:
    url = f"/runs/{run.id}"
    body = Accepted(run.id, "queued", url, f"{url}/events?token={manager.token(run.id)}")
    return Response(
        _encoder.encode(body),
        status_code=202,
        media_type="application/json",
        headers={"Location": url, "X-Run-ID": run.id},
    )


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
