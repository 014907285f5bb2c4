"""Rendering answers: every ``ServiceError`` as its JSON error, and plain JSON bodies.

Errors render as ``{"error": {...}}`` with their status, in OpenAI's shape under
/v1/ (``streamsvc.chat.openai_errors``). The app's handlers and the pure-ASGI
middlewares (``web.auth``, ``web.hosts``) all answer through ``error_response``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from streamsvc.chat import openai_errors
from streamsvc.errors import ErrorEnvelope, ServiceError
from streamsvc.web import observability

_encoder = msgspec.json.Encoder()


def error_response(exc: ServiceError, path: str = "") -> Response:
    """The error's answer; its code (ours, even where /v1 shows the upstream's) is
    recorded on the request's facts for the access log and the metrics."""
    observability.current().failed(exc.code)
    if path.startswith(openai_errors.PREFIX):
        return openai_errors.error_response(exc)
    return Response(
        _encoder.encode(ErrorEnvelope(exc.body())),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers(),
    )


def json_response(payload: Any, status_code: int = 200) -> Response:
    return Response(
        _encoder.encode(payload), status_code=status_code, media_type="application/json"
    )
