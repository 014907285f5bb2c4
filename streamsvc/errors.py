"""The exception tree.

Every error the service reports is a ``ServiceError``. Each subclass fixes an
HTTP status; each instance carries a stable machine-readable ``code``, a human
message, the offending ``path`` in the request (when there is one) and optional
structured ``details``. SDK and Docker errors are translated into this tree at
one boundary each (``streamsvc.chat.provider`` and ``streamsvc.sandbox.docker.sandbox``).

    ServiceError
    ├── RequestError            400  malformed JSON, invalid connector, ...
    │   └── ValidationFailed    422  well-formed JSON of the wrong shape
    ├── Unauthorized            401
    ├── Forbidden               403  origin_not_allowed
    ├── BodyTimeout             408  the body did not arrive in time
    ├── PayloadTooLarge         413
    ├── UnsupportedMediaType    415  a POST body that is not application/json
    ├── MisdirectedRequest      421  host_not_allowed
    ├── Busy                    429  (with retry_after)
    ├── UpstreamError           502  chat upstream failed
    │   ├── UpstreamAuth        502
    │   ├── UpstreamRateLimited 429  (with retry_after)
    │   ├── UpstreamRejected    400  e.g. content_filter on the prompt
    │   └── UpstreamTimeout     504
    ├── NotConfigured           503
    └── SandboxError            503  sandbox_unavailable / 500 sandbox_failed
"""

from __future__ import annotations

from typing import Any

import msgspec


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    path: str | None = None
    details: Any = None


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a request; validators return lists of these."""

    code: str
    path: str
    message: str


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        path: str | None = None,
        details: Any = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.path = path
        self.details = details
        self.retry_after = retry_after

    def body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, path=self.path, details=self.details)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class RequestError(ServiceError):
    status = 400
    code = "invalid_request"


class ValidationFailed(RequestError):
    status = 422
    code = "validation_error"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status = 403
    code = "origin_not_allowed"


class BodyTimeout(ServiceError):
    status = 408
    code = "body_timeout"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class MisdirectedRequest(ServiceError):
    status = 421
    code = "host_not_allowed"


class Busy(ServiceError):
    status = 429
    code = "busy"


class UpstreamError(ServiceError):
    status = 502
    code = "upstream_error"


class UpstreamAuth(UpstreamError):
    code = "upstream_auth"


class UpstreamRateLimited(UpstreamError):
    status = 429
    code = "upstream_rate_limited"


class UpstreamRejected(UpstreamError):
    status = 400
    code = "upstream_rejected"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class NotConfigured(ServiceError):
    status = 503
    code = "not_configured"


class SandboxError(ServiceError):
    status = 503
    code = "sandbox_unavailable"
