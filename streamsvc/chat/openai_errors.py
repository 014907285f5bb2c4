"""Errors in OpenAI's shape, for every answer under /v1/.

``error_envelope`` fills OpenAI's ``type`` and ``param`` from the status and the path, and
keeps our stable ``code`` (or the upstream's). The rule: the status is ours, except that an
upstream's 404 stays a 404 and a body of the wrong shape is a 400 (OpenAI's), not a 422.
"""

from __future__ import annotations

import msgspec
from starlette.responses import Response

from streamsvc.errors import ServiceError, UpstreamRejected, ValidationFailed

PREFIX = "/v1/"


class OpenAIError(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorEnvelope(msgspec.Struct):
    """Every error of /v1/*, in OpenAI's shape; ``code`` is our stable code."""

    error: OpenAIError


# ---- errors -------------------------------------------------------------------------------------

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_encoder = msgspec.json.Encoder()


def error_status(exc: ServiceError) -> int:
    """Our status, except that an upstream's 404 (no such model) stays a 404 and a body
    of the wrong shape is a 400, as OpenAI answers it."""
    details = exc.details if isinstance(exc.details, dict) else {}
    if isinstance(exc, UpstreamRejected) and details.get("upstream_status") == 404:
        return 404
    if isinstance(exc, ValidationFailed):
        return 400
    return exc.status


def error_envelope(exc: ServiceError) -> OpenAIErrorEnvelope:
    details = exc.details if isinstance(exc.details, dict) else {}
    status = error_status(exc)
    default_type = "invalid_request_error" if status < 500 else "server_error"
    path = exc.path[2:] if exc.path and exc.path.startswith("$.") else None
    return OpenAIErrorEnvelope(
        OpenAIError(
            message=exc.message,
            type=details.get("upstream_type") or _TYPES.get(status, default_type),
            param=details.get("upstream_param") or path,
            code=details.get("upstream_code") or exc.code,
        )
    )


def error_response(exc: ServiceError) -> Response:
    return Response(
        _encoder.encode(error_envelope(exc)),
        status_code=error_status(exc),
        media_type="application/json",
        headers=exc.headers(),
    )
