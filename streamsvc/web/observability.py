"""``ObservabilityMiddleware`` (pure ASGI, streams unbuffered) logs one record per request;
endpoints record what only they know on ``RequestFacts``. The rule: the middleware never reads
the bytes it sends, no message content or secret is logged, and text lines have their control
characters escaped. Notes: docs/architecture.md. Over 400 lines: the request's facts, the
metrics and the log lines they feed are one concern (``web.multiproc`` sums workers' files).
"""

from __future__ import annotations

import copy
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamsvc.settings import ServerSettings
from streamsvc.web.multiproc import collect_workers

access_log = logging.getLogger("streamsvc.access")
content_log = logging.getLogger("streamsvc.content")

T = TypeVar("T")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with control characters (CR, LF, ESC, ...) as ``\\xNN``/``\\uNNNN`` escapes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_INSTALL_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)

#: Run outcomes counted by ``streamsvc_run_outcomes_total`` (kind: ``chat`` or ``connector``).
OUTCOMES = (
    "completed",
    "program_error",
    "timeout",
    "oom",
    "output_limit",
    "cancelled",
    "refused",
    "failed",
)
#: A connector answer's error code -> its outcome (others: ``program_error``).
_PROGRAM_OUTCOMES = {"timeout": "timeout", "out_of_memory": "oom", "output_limit": "output_limit"}
#: Error codes that mean the request was stopped, not failed -> the cancel reason.
_CANCELLED = {"send_timeout": "send_timeout", "shutting_down": "shutdown"}
#: The routes whose requests are runs, by kind.
RUN_KINDS = {"/chat": "chat", "/v1/chat/completions": "chat", "/execute-connector": "connector"}


def outcome_of(status: int, facts: RequestFacts, streamed: bool) -> str:
    """A finished run request's outcome (and, when cancelled, ``facts.cancel_reason``)."""
    error = facts.error
    if facts.cancel_reason is None:
        if status == 499:
            facts.cancel_reason = "client_disconnected"
        elif error in _CANCELLED:
            facts.cancel_reason = _CANCELLED[error]
        elif error == "cancelled":
            facts.cancel_reason = "cancelled"
    if facts.cancel_reason is not None:
        return "cancelled"
    if facts.outcome is not None:
        return facts.outcome
    if error == "upstream_timeout" or status == 504:
        return "timeout"
    if error == "busy" or 400 <= status < 500 or status == 503:
        return "refused"
    if error is not None or status >= 500:
        return "failed"
    if streamed and not facts.finished:  # the client went away mid-stream
        facts.cancel_reason = "client_disconnected"
        return "cancelled"
    return "completed"


class RequestFacts(msgspec.Struct):
    """What one request's endpoint learned, for the access log and the metrics."""

    request_id: str = ""
    started: float = 0.0  # time.perf_counter() when the request arrived
    log_content: bool = False
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    exit_code: int | None = None
    ok: bool | None = None
    error: str | None = None  # our code, where the answer shows another (an upstream's)
    key_id: str | None = None  # web.auth.key_id of the request's API key
    limited: str | None = None  # "requests" or "tokens": refused by the key's limit
    model: str | None = None  # the chat deployment asked for
    entry_point: str | None = None  # the connector's entry point
    outcome: str | None = None  # a run's outcome, when its endpoint knows it (see OUTCOMES)
    cancel_reason: str | None = None
    finished: bool = False  # a stream reached its normal end (its last frame was produced)

    def first_token(self) -> None:
        """Mark the first token's arrival (only the first call counts)."""
        if self.ttft_ms is None:
            self.ttft_ms = round((time.perf_counter() - self.started) * 1000, 3)

    def tokens(self, usage: Any) -> None:
        """Record token counts from anything with ``prompt_tokens`` etc. attributes."""
        self.prompt_tokens = getattr(usage, "prompt_tokens", None)
        self.completion_tokens = getattr(usage, "completion_tokens", None)
        self.total_tokens = getattr(usage, "total_tokens", None)

    def failed(self, code: str) -> None:
        """Record our error code: an error answer, or a stream that failed after its headers."""
        self.error = code

    def answered(self, answer: Any) -> None:
        """Log a whole chat answer at debug level, only with ``STREAMSVC_LOG_CONTENT``."""
        if self.log_content:
            content_log.debug(
                "chat answer", extra={"fields": {"request_id": self.request_id, "content": answer}}
            )

    def execution(self, exit_code: int | None, ok: bool, error_code: str | None = None) -> None:
        """A connector run's end: its exit code, ``ok`` and the answer's error code."""
        self.exit_code = exit_code
        self.ok = ok
        self.outcome = (
            "completed" if ok else _PROGRAM_OUTCOMES.get(error_code or "", "program_error")
        )

    def cancelled(self, reason: str) -> None:
        """The run was stopped before its end (``client_disconnected``, ``send_timeout``,
        ``shutdown``, or an explicit cancel's reason): its outcome is ``cancelled``."""
        self.cancel_reason = reason


_current: ContextVar[RequestFacts | None] = ContextVar("streamsvc_request_facts", default=None)


def current() -> RequestFacts:
    """This request's facts; a detached throwaway outside a request."""
    facts = _current.get()
    return facts if facts is not None else RequestFacts(started=time.perf_counter())


async def observe_chat(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pass a /chat answer (``chat.answer``) through, recording first token and usage.

    A ``ChatProvider`` yields nothing before the upstream's first token, so the
    first item marks it; the final ``ChatResult`` (the item with a ``usage``
    attribute) carries the counts and is the answer ``answered`` logs.
    """
    facts = current()
    try:
        async for item in source:
            facts.first_token()
            if hasattr(item, "usage"):
                if item.usage is not None:
                    facts.tokens(item.usage)
                facts.answered(item)
            yield item
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


# ---- metrics ----------------------------------------------------------------------------------


class Metrics:
    """The app's Prometheus metrics: in its own registry (one per app, no process-wide state),
    or, with ``multiprocess_dir`` (``STREAMSVC_WORKERS`` > 1), in prometheus_client's
    multiprocess files, which every worker's scrape sums (``web.multiproc``)."""

    def __init__(
        self,
        open_streams: Callable[[], int],
        admission: Callable[[], object | None],
        multiprocess_dir: str | None = None,
    ) -> None:
        """``open_streams`` counts the open SSE streams; ``admission`` is the sandbox's
        admission control (``running``, ``queue``), None while there is none."""
        self.registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        # Multiprocess: the metrics write to their files, and the scrape reads all of them.
        registry = None if multiprocess_dir else self.registry
        self.requests = Counter(
            "streamsvc_requests",
            "HTTP requests by route and status code",
            ["route", "code"],
            registry=registry,
        )
        self.errors = Counter(
            "streamsvc_errors",
            "Failed requests by route, status code and error code (streams that ended "
            "with an error count with their 200)",
            ["route", "code", "error"],
            registry=registry,
        )
        self.duration = Histogram(
            "streamsvc_request_duration_seconds",
            "Time from request to the end of the response (whole stream)",
            ["route"],
            registry=registry,
        )
        self.ttft = Histogram(
            "streamsvc_time_to_first_token_seconds",
            "Time from request to the upstream's first token",
            ["route"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "streamsvc_chat_tokens",
            "Chat tokens reported by the upstream",
            ["kind"],
            registry=registry,
        )
        self.key_tokens = Counter(
            "streamsvc_key_tokens",
            "Chat tokens by API key id (none: no keys configured), model asked for and kind",
            ["key", "model", "kind"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "streamsvc_rate_limited",
            "Requests refused by an API key's per-minute limit, by key id and limit",
            ["key", "limit"],
            registry=registry,
        )
        self.outcomes = Counter(
            "streamsvc_run_outcomes",
            "Chat answers and connector runs by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self.upstream = Counter(
            "streamsvc_upstream_attempts",
            "Upstream retries and fallbacks to the next deployment, by the error that caused them",
            ["action", "reason"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "streamsvc_queue_wait_seconds",
            "Time a connector run waited for a slot (0 when one was free)",
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self.install = Histogram(
            "streamsvc_dependency_install_seconds",
            "Time a dependency set's install took",
            buckets=_INSTALL_BUCKETS,
            registry=registry,
        )
        self._gauges: list[tuple[Gauge, Callable[[], float]]] = []

        def gauge(name: str, documentation: str, read: Callable[[], float]) -> None:
            if multiprocess_dir:  # set by refresh(): a function cannot be read across processes
                metric = Gauge(name, documentation, multiprocess_mode="livesum", registry=None)
                self._gauges.append((metric, read))
            else:
                Gauge(name, documentation, registry=registry).set_function(read)

        def admitted(attribute: str) -> Callable[[], float]:
            def read() -> float:
                control = admission()
                if control is None:
                    return 0.0
                value = getattr(control, attribute)
                return float(len(value) if attribute == "queue" else value)

            return read

        gauge("streamsvc_active_streams", "Open SSE streams", lambda: float(open_streams()))
        gauge("streamsvc_active_runs", "Connector runs executing", admitted("running"))
        gauge("streamsvc_queue_length", "Connector runs waiting for a slot", admitted("queue"))
        if multiprocess_dir:
            collect_workers(self.registry, multiprocess_dir)
        else:
            ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def refresh(self) -> None:
        """Write this process's gauges to its multiprocess file (a no-op otherwise)."""
        for gauge, read in self._gauges:
            gauge.set(read())

    def upstream_retry(self, reason: str) -> None:
        self.upstream.labels("retry", reason).inc()

    def upstream_fallback(self, reason: str) -> None:
        self.upstream.labels("fallback", reason).inc()

    def timing(self, name: str, seconds: float) -> None:
        """A sandbox phase's duration: ``queue_wait`` or ``install``."""
        (self.queue_wait if name == "queue_wait" else self.install).observe(seconds)

    def run_outcome(self, kind: str, outcome: str) -> None:
        """Count a run's outcome (the middleware does for runs answered in their request)."""
        self.outcomes.labels(kind, outcome).inc()

    def observe(
        self,
        route: str,
        status: int,
        error: str | None,
        duration: float,
        facts: RequestFacts,
        streamed: bool = False,
        path: str = "",
    ) -> None:
        """Count one finished request (``path``: its run kind when no route matched, as
        for a request the API-key gate refused)."""
        code = str(status)
        self.requests.labels(route, code).inc()
        if error is not None or status >= 400:
            self.errors.labels(route, code, error or f"http_{status}").inc()
        self.duration.labels(route).observe(duration)
        if facts.ttft_ms is not None:
            self.ttft.labels(route).observe(facts.ttft_ms / 1000)
        key = facts.key_id or "none"
        model = facts.model or "unknown"
        if facts.prompt_tokens:
            self.tokens.labels("prompt").inc(facts.prompt_tokens)
            self.key_tokens.labels(key, model, "prompt").inc(facts.prompt_tokens)
        if facts.completion_tokens:
            self.tokens.labels("completion").inc(facts.completion_tokens)
            self.key_tokens.labels(key, model, "completion").inc(facts.completion_tokens)
        if facts.limited is not None:
            self.rate_limited.labels(key, facts.limited).inc()
        kind = RUN_KINDS.get(route) or RUN_KINDS.get(path)
        if kind is not None and status != 202:  # 202: a background run counts at its end
            facts.outcome = outcome_of(status, facts, streamed)
            self.outcomes.labels(kind, facts.outcome).inc()


# ---- the middleware ---------------------------------------------------------------------------


def request_id_from(scope: Scope) -> str:
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            offered = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(offered):
                return offered
            break
    return uuid.uuid4().hex


class ObservabilityMiddleware:
    """Request id in and out, one access-log record and the metrics per HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_content: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.log_content = log_content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope)
        facts = RequestFacts(request_id=request_id, started=started, log_content=self.log_content)
        scope.setdefault("state", {})["facts"] = facts
        token = _current.set(facts)
        status = 0
        streamed = False
        sent = 0
        header = (b"x-request-id", request_id.encode())

        async def watch(message: Message) -> None:
            nonlocal status, streamed, sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", ()) if h[0] != b"x-request-id"]
                headers.append(header)
                message["headers"] = headers
                streamed = any(
                    name == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in headers
                )
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            _current.reset(token)
            duration = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            final = status or 500  # no response: the app raised; Starlette answers 500
            error = facts.error
            self.metrics.observe(route, final, error, duration, facts, streamed, scope["path"])
            access_log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                final,
                extra={
                    "fields": _access_fields(
                        scope, route, final, duration, facts, sent, streamed, error
                    )
                },
            )


def _access_fields(
    scope: Scope,
    route: str,
    status: int,
    duration: float,
    facts: RequestFacts,
    sent: int,
    streamed: bool,
    error: str | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "method": scope["method"],
        "path": scope["path"],
        "route": route,
        "status": status,
        "duration_ms": round(duration * 1000, 3),
        "request_id": facts.request_id,
        "bytes_sent": sent,
        "streamed": streamed,
    }
    client = scope.get("client")
    if client:
        fields["client"] = client[0]
    if error is not None:
        fields["error"] = error
    for name in _OPTIONAL_FIELDS:
        value = getattr(facts, name)
        if value is not None:
            fields[name] = value
    return fields


#: Access-log fields written when the request has them.
_OPTIONAL_FIELDS = (
    "key_id",
    "model",
    "entry_point",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "exit_code",
    "ok",
    "outcome",
    "cancel_reason",
    "limited",
)


# ---- log formatting ---------------------------------------------------------------------------

_json = msgspec.json.Encoder()
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CHATTY = ("httpx", "httpx2", "httpcore", "httpcore2")
_FRAMES = "sse_starlette"  # logs every frame at debug: content, for STREAMSVC_LOG_CONTENT only


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the ``fields`` extra, exc."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        payload: dict[str, Any] = {
            "ts": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return _json.encode(payload).decode()


class TextFormatter(logging.Formatter):
    """The classic line, with a record's ``fields`` appended as JSON; one line per
    message (its control characters escaped), a traceback's own lines after it."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record = copy.copy(record)
        record.message = printable(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + _json.encode(fields).decode()
        return line


def configure_logging(settings: ServerSettings) -> None:
    """Root logger: level and format from the settings, one stream handler."""
    handler = logging.StreamHandler()
    json_format = settings.log_format == "json"
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    level = logging.getLevelName(settings.log_level.upper())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The HTTP client logs every upstream request at info; the access log says enough.
    for name in _CHATTY:
        logging.getLogger(name).setLevel(
            logging.NOTSET if level <= logging.DEBUG else logging.WARNING
        )
    logging.getLogger(_FRAMES).setLevel(logging.INFO)
