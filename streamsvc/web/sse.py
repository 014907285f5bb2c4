"""Server-Sent Events plumbing shared by the streaming routes.

``before_headers`` pulls the first event so early failures are real statuses; ``event_response``
adds ids, keep-alives and the terminal ``error``, and drops a client that takes nothing within
``send_timeout``. The rule: exactly one terminal event per stream, written here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import msgspec
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from streamsvc.errors import ErrorEnvelope, ServiceError, ShuttingDown
from streamsvc.web import observability

log = logging.getLogger("streamsvc.sse")

T = TypeVar("T")

_encoder = msgspec.json.Encoder()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SEP = "\n"


class Event(msgspec.Struct, frozen=True):
    """One SSE event: its ``event:`` name and the JSON payload of ``data:``."""

    name: str
    data: Any


class StreamRegistry:
    """The open streams, so a shutting-down server can end each one cleanly."""

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self._drained = anyio.Event()
        self.active = 0
        self.closing = False
        #: Set when shutdown begins (before ``closing``): /health/ready answers 503.
        self.draining = False

    def opened(self, scope: anyio.CancelScope | None = None) -> None:
        """Count a stream; ``close_all`` cancels ``scope`` (at once when already closing)."""
        self.active += 1
        if scope is not None:
            self._scopes.add(scope)
            if self.closing:
                scope.cancel()

    def closed(self, scope: anyio.CancelScope | None = None) -> None:
        if scope is not None:
            self._scopes.discard(scope)
        self.active -= 1
        if self.active == 0:
            self._drained.set()
            self._drained = anyio.Event()

    async def drained(self) -> None:
        """Return once no stream is open."""
        if self.active:
            await self._drained.wait()

    def close_all(self) -> None:
        self.closing = True
        for scope in list(self._scopes):
            scope.cancel()

    async def next(self, source: AsyncIterator[Event]) -> Event | None:
        """The next event, or ``None`` when the source ends or shutdown interrupts it."""
        if self.closing:
            return None
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                return await anext(source)
            except StopAsyncIteration:
                return None
            finally:
                self._scopes.discard(scope)
        return None  # cancelled by close_all


def shutting_down() -> ServiceError:
    return ShuttingDown("server is shutting down")


def error_event(exc: ServiceError) -> Event:
    return Event("error", ErrorEnvelope(exc.body()))


def frame(data: Any, name: str | None = None, event_id: int | None = None) -> bytes:
    """One SSE frame, assembled as bytes (sse-starlette sends bytes as they are).

    msgspec's JSON has no raw newline, so ``data`` is always one ``data:`` line.
    """
    head = b"" if event_id is None else b"id: %d\n" % event_id
    if name is not None:
        head += b"event: " + name.encode() + b"\n"
    body = data if isinstance(data, bytes) else _encoder.encode(data)
    return head + b"data: " + body + b"\n\n"


def numbered() -> Callable[[Event], bytes]:
    """The default framing: the event's name and increasing ids from 1."""
    event_id = 0

    def encode(event: Event) -> bytes:
        nonlocal event_id
        event_id += 1
        return frame(event.data, event.name, event_id)

    return encode


async def _pump(
    first: Event | None,
    source: AsyncIterator[Event],
    registry: StreamRegistry,
    encode: Callable[[Event], bytes],
    failure: Callable[[ServiceError], Event],
    end: bytes,
) -> AsyncIterator[bytes]:
    """Each event as one ``encode``d frame, then ``end``; a failure or shutdown
    ends the stream with the ``failure`` event of its error instead, its code
    recorded on the request's facts (the access log and metrics read it there)."""

    def failed(exc: ServiceError) -> bytes:
        observability.current().failed(exc.code)
        return encode(failure(exc))

    registry.opened()
    try:
        if first is not None:
            yield encode(first)
        while True:
            try:
                event = await registry.next(source)
            except ServiceError as exc:
                yield failed(exc)
                return
            except Exception:
                log.exception("stream failed")
                yield failed(ServiceError("internal error"))
                return
            if event is None:
                if registry.closing:
                    yield failed(shutting_down())
                    return
                observability.current().finished = True  # not cut short: its outcome
                if end:
                    yield end
                return
            yield encode(event)
    finally:
        registry.closed()
        with anyio.CancelScope(shield=True):
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()


async def start(source: AsyncIterator[T]) -> T | None:
    """Pull the first event before any header is sent, so early failures are real statuses."""
    try:
        return await anext(source)
    except StopAsyncIteration:
        return None
    except BaseException:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()
        raise


async def before_headers(request: Request, registry: StreamRegistry, work: Awaitable[T]) -> T:
    """Await ``work`` (the first event, or a whole JSON answer) before any header is sent.

    Nothing else listens to the client then, so this does: a hang-up cancels
    ``work`` at once (its upstream call or container is released) and raises
    ``ClientDisconnect``. Shutdown counts it as an open stream: it gets the
    drain window, then is interrupted with a 503 ``shutting_down``. The request
    body must have been read already.
    """
    done: list[T] = []
    failure: Exception | None = None
    with anyio.CancelScope() as interruptible:
        registry.opened(interruptible)
        try:
            async with anyio.create_task_group() as tasks:

                async def watch() -> None:
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(watch)
                try:
                    done.append(await work)
                except Exception as exc:  # re-raised below as itself, not in an ExceptionGroup
                    failure = exc
                tasks.cancel_scope.cancel()
        finally:
            registry.closed(interruptible)
    if failure is not None:
        raise failure
    if done:
        return done[0]
    if interruptible.cancelled_caught:
        raise shutting_down()
    raise ClientDisconnect()


def _dropped(timeout: float) -> None:
    """One line for a client that stopped reading (no traceback: it is not our fault)."""
    observability.current().failed("send_timeout")
    log.info("the client took nothing for %g seconds; it was dropped", timeout)


class _EventStream(EventSourceResponse):
    """sse-starlette's response, ending quietly when its ``send_timeout`` drops the client.

    The body iterator has been closed by then (its run or upstream call stopped).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            _dropped(self.send_timeout or 0.0)


class JsonAnswer(Response):
    """A JSON answer whose client must take it within ``send_timeout`` seconds, or is dropped."""

    media_type = "application/json"

    def __init__(self, content: bytes, send_timeout: float) -> None:
        super().__init__(content)
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded(message: Message) -> None:
            with anyio.fail_after(self.send_timeout):
                await send(message)

        try:
            await super().__call__(scope, receive, bounded)
        except TimeoutError:
            _dropped(self.send_timeout)


def event_response(
    first: Event | None,
    source: AsyncIterator[Event],
    registry: StreamRegistry,
    keepalive: float,
    headers: dict[str, str] | None = None,
    *,
    send_timeout: float,
    encode: Callable[[Event], bytes] | None = None,
    failure: Callable[[ServiceError], Event] = error_event,
    end: bytes = b"",
) -> EventSourceResponse:
    """The SSE response; ``encode``, ``failure`` and ``end`` change the framing
    (default: ``numbered`` frames, ``error_event``, nothing after the last event).
    A client that takes no frame (or ping) for ``send_timeout`` seconds is dropped."""
    return _EventStream(
        _pump(first, source, registry, encode or numbered(), failure, end),
        headers={**SSE_HEADERS, **(headers or {})},
        ping=keepalive,
        sep=_SEP,
        send_timeout=send_timeout,
    )
