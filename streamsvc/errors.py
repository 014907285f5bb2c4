"""The exception tree.

Every error the service reports is a ``ServiceError``. Each subclass fixes an
HTTP status; each instance carries a stable machine-readable ``code``, a human
message, the offending ``path`` in the request (when there is one) and optional
structured ``details``. SDK and Docker errors are translated into this tree at
one boundary each (``streamsvc.chat.provider``, ``streamsvc.sandbox.docker.api``).

    ServiceError                      500  internal_error
    ├── RequestError                  400  invalid_request (or a connector problem's code)
    │   ├── MalformedJson             400  malformed_json (with details.position)
    │   ├── TooDeeplyNested           400  too_deeply_nested
    │   ├── ConnectorTooComplex       400  connector_too_complex: validation ran out of time
    │   └── ValidationFailed          422  validation_error: well-formed JSON of the wrong shape
    ├── Unauthorized                  401  unauthorized
    ├── Forbidden                     403  origin_not_allowed: a browser page of another origin
    ├── ModelNotFound                 404  model_not_found: not a configured deployment
    ├── RunNotFound                   404  not_found: no such run (or not this key's)
    ├── RunFileNotFound               404  file_not_found: the run kept no file of that name
    ├── RunNotFinished                409  run_not_finished: a running run cannot be deleted
    ├── RunCancelled                  409  cancelled: cancelled, or abandoned by its readers
    ├── RunElsewhere                  409  run_elsewhere: executed by another server process
    ├── EventsExpired                 410  events_expired: the run's events were pruned
    ├── BodyTimeout                   408  body_timeout: the body did not arrive in time
    ├── PayloadTooLarge               413  payload_too_large
    ├── UnsupportedMediaType          415  unsupported_media_type: a POST that is not JSON
    ├── MisdirectedRequest            421  host_not_allowed: a Host header not allowed
    ├── Busy                          429  busy (with retry_after)
    │   ├── BodiesBusy                429  busy: request bodies in flight at their budget
    │   └── TooManyRuns               429  too_many_runs: unfinished runs at their cap
    ├── KeyRateLimited                429  rate_limited: an API key over its per-minute limit
    ├── UpstreamError                 502  upstream_error: the chat upstream failed
    │   ├── UpstreamAuth              502  upstream_auth
    │   ├── UpstreamRateLimited       429  upstream_rate_limited (with retry_after)
    │   ├── UpstreamRejected          400  upstream_rejected
    │   │   └── ContentFiltered       400  content_filter: the prompt was filtered
    │   ├── UpstreamTimeout           504  upstream_timeout
    │   └── UpstreamUnreachable       502  upstream_unreachable
    ├── NotConfigured                 503  not_configured
    │   └── ChatNotConfigured         503  chat_not_configured
    ├── RunLogFull                    500  run_log_full: a run's log reached its event cap
    ├── ShuttingDown                  503  shutting_down
    ├── RunInterrupted                503  interrupted: the server stopped during the run
    ├── QueueTimeout                  503  queue_timeout: no executor took the queued run in time
    ├── RunStoreUnavailable           503  run_store_unavailable: Redis did not answer
    └── SandboxError                       (raised only as one of these)
        ├── SandboxUnavailable        503  sandbox_unavailable: not ready now, try again
        │   └── EngineUnreachable     503  the engine did not answer, or was lost mid-run
        ├── SandboxFailed             500  sandbox_failed: the sandbox broke
        │   └── EngineRefused         500  the engine answered an error (its ``engine_status``)
        ├── BridgeUnprotected         503  bridge_unprotected: the bridge's firewall rules missing
        └── DependencyInstallFailed   400  dependency_install_failed

``code=`` and ``status=`` on an instance are for facts that arrive as data: a
connector problem's code, and the status of an HTTP error starlette raises.
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


class MalformedJson(RequestError):
    code = "malformed_json"


class TooDeeplyNested(RequestError):
    code = "too_deeply_nested"


class ConnectorTooComplex(RequestError):
    """Validating the connector (its code's analysis) went past its time limit."""

    code = "connector_too_complex"


class ValidationFailed(RequestError):
    status = 422
    code = "validation_error"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status = 403
    code = "origin_not_allowed"


class ModelNotFound(ServiceError):
    """GET /v1/models/{id} for a model that is not one of the configured deployments."""

    status = 404
    code = "model_not_found"


class RunNotFound(ServiceError):
    status = 404
    code = "not_found"


class RunFileNotFound(ServiceError):
    status = 404
    code = "file_not_found"


class RunNotFinished(ServiceError):
    status = 409
    code = "run_not_finished"


class RunCancelled(ServiceError):
    status = 409
    code = "cancelled"


class RunElsewhere(ServiceError):
    status = 409
    code = "run_elsewhere"


class RunLogFull(ServiceError):
    status = 500
    code = "run_log_full"


class RunInterrupted(ServiceError):
    status = 503
    code = "interrupted"


class QueueTimeout(ServiceError):
    """A queued run waited ``STREAMSVC_QUEUE_WAIT_SECONDS`` and no executor took it."""

    status = 503
    code = "queue_timeout"


class EventsExpired(ServiceError):
    """The run's record is kept, but retention pruned its events."""

    status = 410
    code = "events_expired"


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


class BodiesBusy(Busy):
    """The body would take the bytes in flight past their budget; it is left unread."""


class TooManyRuns(Busy):
    """This process (or this key) holds as many unfinished runs as it may; none is created."""

    code = "too_many_runs"


class KeyRateLimited(ServiceError):
    """An API key over its requests- or tokens-per-minute limit (with retry_after)."""

    status = 429
    code = "rate_limited"


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


class ContentFiltered(UpstreamRejected):
    code = "content_filter"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class NotConfigured(ServiceError):
    status = 503
    code = "not_configured"


class ChatNotConfigured(NotConfigured):
    code = "chat_not_configured"


class ShuttingDown(ServiceError):
    status = 503
    code = "shutting_down"


class RunStoreUnavailable(ServiceError):
    """The shared run store did not answer in time (``streamsvc.runs.redis``)."""

    status = 503
    code = "run_store_unavailable"


class SandboxError(ServiceError):
    """Base of the sandbox's failures; raised only as one of its subclasses."""

    status = 503
    code = "sandbox_unavailable"


class SandboxUnavailable(SandboxError):
    status = 503
    code = "sandbox_unavailable"


class EngineUnreachable(SandboxUnavailable):
    """The Docker engine did not answer, or the connection to it was lost."""


class SandboxFailed(SandboxError):
    status = 500
    code = "sandbox_failed"


class EngineRefused(SandboxFailed):
    """The Docker engine answered a call with an error; its HTTP status is ``engine_status``."""

    def __init__(self, message: str, *, engine_status: int) -> None:
        super().__init__(message)
        self.engine_status = engine_status


class BridgeUnprotected(SandboxError):
    """Bridge networking while the sandbox network's firewall rules are not all in place."""

    status = 503
    code = "bridge_unprotected"


class DependencyInstallFailed(SandboxError):
    status = 400
    code = "dependency_install_failed"
