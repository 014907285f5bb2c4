"""The chat providers on the official ``openai`` SDK: Azure OpenAI or any OpenAI-compatible API.

The rule: the one module that imports ``openai``; SDK errors become ``streamsvc.errors`` here.
Over 400 lines because the whole SDK boundary (client, retries, fallback, SSE reading) is one
concern; design notes in docs/architecture.md ("Module notes").
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import ssl
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import aiohttp
import anyio
import httpx2
import msgspec
import openai
from openai import AsyncAzureOpenAI, AsyncOpenAI, AsyncStream

from streamsvc.chat.types import UpstreamBody, UpstreamChunk, has_token
from streamsvc.errors import (
    ContentFiltered,
    RequestError,
    ServiceError,
    UpstreamAuth,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from streamsvc.settings import ChatSettings, SettingsError

log = logging.getLogger("streamsvc.providers")

TokenProvider = Callable[[], Awaitable[str]]


class UpstreamObserver(Protocol):
    """Told of each retry and each fallback, with the code of the error that caused it."""

    def upstream_retry(self, reason: str) -> None: ...

    def upstream_fallback(self, reason: str) -> None: ...


ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"
_BACKOFF_BASE = 0.5
_LATE = "no first token from the chat upstream in time"
_SILENT = "the chat upstream went silent mid-stream"
_NO_KEY = "unused"  # the SDK insists on a key; servers such as Ollama ignore it


_NO_IDENTITY = (
    "invalid setting AZURE_OPENAI_AUTH: entra needs the azure-identity package "
    "(pip install 'streamsvc[entra]')"
)


def check_settings(settings: ChatSettings) -> None:
    """Fail start-up, naming the setting, when Entra ID auth lacks its optional package."""
    entra = settings.provider == "azure" and settings.azure_auth == "entra"
    if entra and not has_azure_identity():
        raise SettingsError(_NO_IDENTITY)


def has_azure_identity() -> bool:
    try:
        return importlib.util.find_spec("azure.identity") is not None
    except ModuleNotFoundError:  # no "azure" package at all
        return False


def create_provider(
    settings: ChatSettings,
    token_provider: TokenProvider | None = None,
    observer: UpstreamObserver | None = None,
) -> Provider:
    """The configured provider; ``token_provider`` replaces Entra ID's (for tests),
    ``observer`` counts retries and fallbacks (the app's metrics)."""
    backstop = max(settings.first_token_timeout_seconds, settings.idle_timeout_seconds)
    timeout = openai.Timeout(backstop + 5, connect=settings.connect_timeout_seconds)
    http_client = _http_client(settings, timeout)
    if settings.provider == "openai":
        client: AsyncOpenAI = AsyncOpenAI(
            api_key=settings.openai_api_key or _NO_KEY,
            base_url=settings.openai_base_url,
            max_retries=0,
            timeout=timeout,
            http_client=http_client,
        )
        return Provider(client, settings, observer=observer)
    closers: list[Callable[[], object]] = []
    if settings.azure_auth == "entra" and token_provider is None:
        token_provider, close = _entra_token_provider()
        closers.append(close)
    client = AsyncAzureOpenAI(
        api_key=settings.azure_api_key if token_provider is None else None,
        azure_ad_token_provider=token_provider,
        azure_endpoint=settings.azure_endpoint or "",
        api_version=settings.azure_api_version,
        max_retries=0,
        timeout=timeout,
        http_client=http_client,
    )
    return Provider(client, settings, closers, observer)


def _http_client(settings: ChatSettings, timeout: openai.Timeout) -> httpx2.AsyncClient:
    """The SDK's HTTP client: its aiohttp flavour by default, with room for every stream.

    Every open stream holds a connection, so the pool keeps as many as it may
    open; httpx's pool also scans all of them on each request and release,
    which is why aiohttp (a dict-keyed pool and a C HTTP parser) is the default.
    """
    most = settings.max_connections
    limits = httpx2.Limits(max_connections=most, max_keepalive_connections=most)
    if settings.http_client == "aiohttp":
        return openai.DefaultAioHttpClient(timeout=timeout, limits=limits)
    return openai.DefaultAsyncHttpxClient(timeout=timeout, limits=limits)


def _entra_token_provider() -> tuple[TokenProvider, Callable[[], object]]:
    """azure-identity's bearer-token provider, run in a worker thread (it may do network I/O)."""
    try:
        identity = importlib.import_module("azure.identity")
    except ImportError:
        raise SettingsError(_NO_IDENTITY) from None
    credential = identity.DefaultAzureCredential()
    fetch = identity.get_bearer_token_provider(credential, ENTRA_SCOPE)

    async def token() -> str:
        value: str = await anyio.to_thread.run_sync(fetch, abandon_on_cancel=True)
        return value

    return token, credential.close


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms``, else ``retry-after`` (seconds)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None


def translate(exc: Exception) -> ServiceError:
    """Map an SDK error to ours; never copies request headers (the key) anywhere."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        error = _error_body(exc)
        message = str(error.get("message") or f"upstream answered {status}")
        if status in (401, 403):
            return UpstreamAuth(f"the chat upstream refused our credentials ({status})")
        if status == 429:
            return UpstreamRateLimited(
                "the chat upstream is rate limiting us",
                retry_after=retry_after(exc.response.headers),
            )
        if status == 400 and error.get("code") == "content_filter":
            inner = error.get("innererror") or {}
            return ContentFiltered(
                message,
                details={"content_filter_result": inner.get("content_filter_result")},
            )
        if 400 <= status < 500:
            return UpstreamRejected(message, details=_rejection_details(status, error))
        return UpstreamError(f"the chat upstream failed ({status})")
    if isinstance(exc, openai.APITimeoutError) and timed_out(exc):
        return UpstreamTimeout("the chat upstream did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamUnreachable("the chat upstream is unreachable")
    return UpstreamError("the chat upstream failed")


def _error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
    return {}


def _rejection_details(status: int, error: dict[str, Any]) -> dict[str, Any]:
    """The upstream's status, and its error ``code``/``type``/``param`` when they are strings."""
    details: dict[str, Any] = {"upstream_status": status}
    for field in ("code", "type", "param"):
        if isinstance(error.get(field), str):
            details[f"upstream_{field}"] = error[field]
    return details


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError) and not (
        isinstance(exc, openai.APITimeoutError) and timed_out(exc)
    )


def timed_out(exc: BaseException) -> bool:
    """Whether a timeout-shaped transport error really was a timeout.

    The SDK's aiohttp transport maps every aiohttp connection error (refused,
    server disconnected) to httpx's ``ConnectTimeout``; the aiohttp error it
    came from says what happened.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ClientError):
            return isinstance(cause, TimeoutError)
        cause = cause.__cause__ or cause.__context__
    return True


def _falls_back(error: ServiceError) -> bool:
    """429, 5xx, unreachable, broken off or late: another deployment may do better."""
    return isinstance(error, UpstreamError) and not isinstance(
        error, UpstreamAuth | UpstreamRejected
    )


class UpstreamChunks:
    """The chunks of one streamed upstream answer, read off its HTTP body.

    Splits the body into SSE lines (LF or CRLF endings), joins each event's
    ``data:`` lines and decodes them with msgspec; other fields and comments
    are ignored. ``[DONE]`` ends the chunks, and the rest of the body is read so
    the connection goes back to the pool. A ``data:`` object with an
    ``error`` fails the stream, as in the SDK's own decoder.
    """

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        self._body: AsyncIterator[bytes] = response.aiter_bytes()
        self._ready: deque[UpstreamChunk] = deque()
        self._partial = b""
        self._data: list[bytes] = []
        self._done = False

    async def next(self) -> UpstreamChunk | None:
        """The next chunk, ``None`` at the end of the stream."""
        while not self._ready:
            try:
                piece = await anext(self._body)
            except StopAsyncIteration:
                if not self._done:
                    self._feed(b"\n\n")  # an event the body ended without a blank line after
                    self._done = True
                return self._ready.popleft() if self._ready else None
            except (httpx2.TimeoutException, TimeoutError) as exc:
                if timed_out(exc):
                    raise UpstreamTimeout("the chat upstream did not answer in time") from exc
                raise UpstreamError("the chat upstream broke off the stream") from exc
            except (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream) as exc:
                raise UpstreamError("the chat upstream broke off the stream") from exc
            if not self._done:
                self._feed(piece)
        return self._ready.popleft()

    def _feed(self, piece: bytes) -> None:
        lines = (self._partial + piece).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif not line and self._data:
                data = b"\n".join(self._data)
                self._data.clear()
                if data.startswith(b"[DONE]"):
                    self._done = True  # the rest of the body is read, and ignored
                    return
                self._ready.append(_decode_chunk(data))

    async def aclose(self) -> None:
        await self._response.aclose()


_chunk_decoder = msgspec.json.Decoder()


def _decode_chunk(data: bytes) -> UpstreamChunk:
    try:
        chunk = _chunk_decoder.decode(data)
    except msgspec.DecodeError:
        chunk = None
    if not isinstance(chunk, dict):
        raise UpstreamError("the chat upstream sent a malformed chunk")
    if chunk.get("error"):
        raise UpstreamError("the chat upstream failed")
    return chunk


Opened = tuple[UpstreamChunks, list[UpstreamChunk], bool]


class Provider:
    """``chat.types.ChatProvider`` over an ``AsyncOpenAI`` or ``AsyncAzureOpenAI`` client."""

    def __init__(
        self,
        client: AsyncOpenAI,
        settings: ChatSettings,
        closers: Sequence[Callable[[], object]] = (),
        observer: UpstreamObserver | None = None,
    ) -> None:
        self._client = client
        self._settings = settings
        self._closers = closers
        self._observer = observer

    async def aclose(self) -> None:
        await self._client.close()
        for close in self._closers:
            close()

    async def completion(
        self, attempts: Sequence[UpstreamBody]
    ) -> AsyncGenerator[UpstreamChunk, None]:
        upstream, held, ended = await self._first_token(attempts)
        try:
            for chunk in held:
                yield chunk
            idle = self._settings.idle_timeout_seconds
            while not ended:
                following = await _next_chunk(upstream, anyio.current_time() + idle, _SILENT)
                if following is None:
                    break
                yield following
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()

    async def _first_token(self, attempts: Sequence[UpstreamBody]) -> Opened:
        """The first attempt (deployment) that reaches its first token, in order."""
        for number, body in enumerate(attempts, 1):
            try:
                return await self._start(body)
            except ServiceError as error:
                if number == len(attempts) or not _falls_back(error):
                    raise
                if self._observer is not None:
                    self._observer.upstream_fallback(error.code)
                log.warning(
                    "deployment %s failed (%s); falling back to %s",
                    body.get("model"),
                    error.code,
                    attempts[number].get("model"),
                )
        raise ValueError("no attempts")

    async def _start(self, body: UpstreamBody) -> Opened:
        """Open one attempt and read up to its first token, all within the first-token deadline.

        Returns the open stream, the chunks read so far (the last one carries
        the token) and whether the stream already ended (no token at all).
        """
        deadline = anyio.current_time() + self._settings.first_token_timeout_seconds
        with anyio.CancelScope(deadline=deadline) as scope:
            upstream = await self._open(body, deadline)
        if scope.cancelled_caught:
            raise UpstreamTimeout(_LATE)
        held: list[UpstreamChunk] = []
        try:
            while (first := await _next_chunk(upstream, deadline, _LATE)) is not None:
                held.append(first)
                if has_token(first):
                    return upstream, held, False
        except BaseException:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
            raise
        return upstream, held, True

    async def _open(self, body: UpstreamBody, deadline: float) -> UpstreamChunks:
        """Open the upstream stream, retrying 429/5xx/connection errors within the budget."""
        waited, attempt = 0.0, 0
        while True:
            try:
                stream = await self._client.post(
                    "/chat/completions",
                    body=body,
                    cast_to=object,
                    stream=True,
                    stream_cls=AsyncStream[object],
                )
                return UpstreamChunks(stream.response)  # its body is read by us, not the SDK
            except openai.APIError as exc:
                error = translate(exc)
                wait = self._retry_wait(exc, error, attempt, waited, deadline)
                if wait is None:
                    raise error from exc
                log.info("upstream %s; retrying in %.2fs", error.code, wait)
                if self._observer is not None:
                    self._observer.upstream_retry(error.code)
                await anyio.sleep(wait)
                waited, attempt = waited + wait, attempt + 1
            except ValueError as exc:  # e.g. a deployment named ".." cannot be a URL path
                raise RequestError(
                    f"{body.get('model')!r} cannot name a deployment", path="$.model"
                ) from exc

    def _retry_wait(
        self, exc: Exception, error: ServiceError, attempt: int, waited: float, deadline: float
    ) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up with ``error``."""
        if not _retryable(exc) or attempt >= self._settings.max_retries:
            return None
        wait = error.retry_after
        if wait is None:
            wait = _BACKOFF_BASE * 2**attempt
        over_budget = waited + wait > self._settings.retry_max_wait_seconds
        if over_budget or anyio.current_time() + wait >= deadline:
            if isinstance(error, UpstreamRateLimited) and error.retry_after is None:
                error.retry_after = wait  # tell the client what we would have waited
            return None
        return wait


async def _next_chunk(
    upstream: UpstreamChunks, deadline: float, timeout_message: str
) -> UpstreamChunk | None:
    """The next upstream chunk, ``None`` at the end; the deadline becomes ``UpstreamTimeout``."""
    with anyio.CancelScope(deadline=deadline):
        return await upstream.next()
    raise UpstreamTimeout(timeout_message)
