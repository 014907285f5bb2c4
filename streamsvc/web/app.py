"""The Starlette application: factory, lifespan, routes, middlewares, error handlers.

The lifespan opens the I/O clients into ``web.services``; every ``ServiceError`` renders as
its JSON error (``web.rendering``), anything else as a 500 ``internal_error``.
The rule: the only module that imports the endpoints to route them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from streamsvc.chat import openai_compat
from streamsvc.chat.endpoint import chat_endpoint
from streamsvc.chat.types import ChatProvider
from streamsvc.connectors.endpoint import execute_endpoint
from streamsvc.errors import (
    BodiesBusy,
    BodyTimeout,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from streamsvc.runs import endpoint as runs_endpoint
from streamsvc.runs.backends import load_secret, open_store
from streamsvc.runs.manager import RunManager
from streamsvc.runs.queue import RunQueue
from streamsvc.runs.redis import RedisRunStore
from streamsvc.runs.sqlite import SqliteStore
from streamsvc.runs.store import executor_name
from streamsvc.sandbox.types import Sandbox
from streamsvc.settings import RunSettings, SandboxSettings, Settings
from streamsvc.web.auth import ApiKeyMiddleware
from streamsvc.web.budget import BodyBudget
from streamsvc.web.examples import examples_endpoint
from streamsvc.web.health import health, live, ready
from streamsvc.web.hosts import HostOriginMiddleware, allowed_hosts
from streamsvc.web.limits import KeyLimits
from streamsvc.web.observability import Metrics, ObservabilityMiddleware, printable
from streamsvc.web.openapi import openapi_endpoint
from streamsvc.web.pages import docs, playground, static_files
from streamsvc.web.rendering import error_response
from streamsvc.web.services import Services, install, installed, services
from streamsvc.web.sse import StreamRegistry

log = logging.getLogger("streamsvc")

#: What a browser page of an allowed origin (``STREAMSVC_CORS_ORIGINS``) may send and read.
CORS_REQUEST_HEADERS = [
    "authorization",
    "content-type",
    "x-api-key",
    "x-request-id",
    "accept",
    "x-streamsvc-azure-extras",
    "last-event-id",
]
CORS_EXPOSED_HEADERS = ["x-request-id", "retry-after", "x-run-id", "location"]

#: Errors answered before the body was all read: the connection cannot be reused.
_BODY_LEFT_UNREAD = (PayloadTooLarge, BodyTimeout, UnsupportedMediaType, BodiesBusy)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    response = error_response(exc, request.url.path)
    if isinstance(exc, _BODY_LEFT_UNREAD):
        response.headers["Connection"] = "close"
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    error = ServiceError(str(exc.detail), code=code, status=exc.status_code)
    return error_response(error, request.url.path)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up while sending its body: one line, no traceback."""
    log.info("client disconnected during %s %s", request.method, printable(request.url.path))
    return Response(status_code=499)  # nobody is listening; for the access log


async def _internal_error(request: Request, exc: Exception) -> Response:
    path = printable(request.url.path)
    log.error("unhandled error on %s %s", request.method, path, exc_info=exc)
    return error_response(ServiceError("internal error"), request.url.path)


async def metrics_endpoint(request: Request) -> Response:
    metrics = services(request).metrics
    metrics.refresh()
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


#: How often a worker writes its gauges for the others' scrapes (``STREAMSVC_WORKERS`` > 1).
GAUGE_REFRESH_SECONDS = 1.0


async def _refresh_gauges(metrics: Metrics) -> None:
    while True:
        metrics.refresh()
        await anyio.sleep(GAUGE_REFRESH_SECONDS)


def create_app(settings: Settings, metrics_dir: str | None = None) -> Starlette:
    """The app; ``metrics_dir``: a worker of several, its metrics summed there (``multiproc``)."""
    if settings.chat.configured:
        from streamsvc.chat.provider import check_settings

        check_settings(settings.chat)  # e.g. Entra ID auth without azure-identity: a start-up error

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            provider: ChatProvider | None = None
            if settings.chat.configured:
                from streamsvc.chat.provider import create_provider

                provider = create_provider(settings.chat, observer=metrics)
                stack.push_async_callback(provider.aclose)
            store = open_store(settings.runs.store, settings.runs.retention_seconds)
            if isinstance(store, SqliteStore | RedisRunStore):
                await store.open()
            stack.push_async_callback(store.aclose)
            if isinstance(store, RedisRunStore):  # its write-behind task, flushed before aclose
                await stack.enter_async_context(store.writer())
            queue = await _open_queue(store, settings.runs, stack)
            sandbox = None if queue else await _start_sandbox(settings.sandbox, stack, metrics)
            secret = await load_secret(settings.runs, store)
            # Entered last, so it ends first: running runs are interrupted (their containers
            # removed, upstream calls closed) while the sandbox and the store are still open.
            runs = await stack.enter_async_context(RunManager(store, settings.runs, secret))
            found = dataclasses.replace(base, chat=provider, sandbox=sandbox, runs=runs)
            install(app, dataclasses.replace(found, queue=queue))
            if metrics_dir is None:
                yield
                return
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_refresh_gauges, metrics)
                yield
                tasks.cancel_scope.cancel()

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/health/live", live, methods=["GET"]),
            Route("/health/ready", ready, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/chat", chat_endpoint, methods=["POST"]),
            Route("/v1/chat/completions", openai_compat.completions_endpoint, methods=["POST"]),
            Route("/v1/models", openai_compat.models_endpoint, methods=["GET"]),
            Route("/v1/models/{model:path}", openai_compat.model_endpoint, methods=["GET"]),
            Route("/execute-connector", execute_endpoint, methods=["POST"]),
            Route("/runs", runs_endpoint.list_runs, methods=["GET"]),
            Route("/runs/{run_id}", runs_endpoint.show_run, methods=["GET"]),
            Route("/runs/{run_id}", runs_endpoint.delete_run, methods=["DELETE"]),
            Route("/runs/{run_id}/events", runs_endpoint.run_events, methods=["GET"]),
            Route("/runs/{run_id}/cancel", runs_endpoint.cancel_run, methods=["POST"]),
            Route("/runs/{run_id}/files/{name:path}", runs_endpoint.run_file, methods=["GET"]),
            Route("/", playground, methods=["GET"]),
            Route("/docs", docs, methods=["GET"]),
            Route("/playground/examples", examples_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi_endpoint, methods=["GET"]),
            Mount("/static", app=static_files(), name="static"),
        ],
        exception_handlers={
            ServiceError: _service_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    streams = StreamRegistry()

    def admission() -> object | None:
        return getattr(installed(app).sandbox, "admission", None)

    metrics = Metrics(lambda: streams.active, admission, metrics_dir)
    # Without I/O clients until the lifespan opens them (an app served without one, as
    # in-process tests do, still answers, with chat and runs unavailable).
    bodies = BodyBudget(settings.server.max_body_bytes_in_flight)
    base = Services(settings, streams, metrics, bodies)
    install(app, base)
    server = settings.server
    app.add_middleware(
        ApiKeyMiddleware,
        keys=server.api_keys,
        protected=("/chat", "/execute-connector", "/v1/"),
        limits=KeyLimits(server.key_requests_per_minute, server.key_tokens_per_minute),
    )
    if server.cors_origins:
        # Outside the key check: a browser's preflight carries no key. Pure ASGI, so
        # streams pass through unbuffered.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=server.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=600,
        )
    # Before CORS and keys: a foreign Host (DNS rebinding) or Origin does no work at all.
    app.add_middleware(
        HostOriginMiddleware,
        hosts=allowed_hosts(server.host, server.allowed_hosts),
        cors_origins=server.cors_origins,
    )
    # Outermost of ours: 401s, 403s and 421s get a request id and an access-log line too.
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, log_content=server.log_content)
    return app


async def _open_queue(
    store: object, settings: RunSettings, stack: contextlib.AsyncExitStack
) -> RunQueue | None:
    """With the Redis store, connector runs go to executors through its queue (issue 16);
    this node reaps lapsed leases. None with the embedded stores (this process runs them)."""
    if not isinstance(store, RedisRunStore):
        return None
    store.queued_kinds = frozenset({"connector"})
    queue = RunQueue(
        store,
        capacity=settings.queue_capacity,
        per_key=settings.max_active_runs_per_key,
        lease_seconds=settings.lease_seconds,
        wait_seconds=settings.queue_wait_seconds,
    )
    await queue.open()
    await stack.enter_async_context(queue.reaper(executor_name(), settings.heartbeat_seconds))
    return queue


async def _start_sandbox(
    settings: SandboxSettings, stack: contextlib.AsyncExitStack, metrics: Metrics
) -> Sandbox:
    """The Docker sandbox; an engine that is down now is reported by /health."""
    from streamsvc.sandbox.docker.api import connect
    from streamsvc.sandbox.docker.sandbox import DockerSandbox

    # Entered, not just started: it owns the task group that enforces run deadlines.
    sandbox = DockerSandbox(connect(settings.docker_host), settings, metrics.timing)
    return await stack.enter_async_context(sandbox)
