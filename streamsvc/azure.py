"""The Azure OpenAI chat backend, on the official ``openai`` SDK.

This is the one place that imports ``openai``: SDK errors are translated here
into ``streamsvc.errors``. The SDK's own retries are off; we retry 429 and 5xx
ourselves within a bounded total wait, honouring ``retry-after-ms`` and then
``retry-after``. The upstream is always asked to stream with usage, and the
non-streaming mode aggregates the same stream, so both modes behave alike.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import openai
from openai import AsyncAzureOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk

from .chat import ChatDelta, ChatParams, ChatResult, Usage
from .errors import (
    ServiceError,
    UpstreamAuth,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from .settings import Settings

log = logging.getLogger("streamsvc.azure")

_BACKOFF_BASE = 0.5


def create_client(settings: Settings) -> AsyncAzureOpenAI:
    """The SDK client; created and closed by the app's lifespan."""
    backstop = max(
        settings.streamsvc_first_token_timeout_seconds, settings.streamsvc_idle_timeout_seconds
    )
    return AsyncAzureOpenAI(
        api_key=settings.azure_openai_api_key,
        azure_endpoint=settings.azure_openai_endpoint or "",
        api_version=settings.azure_openai_api_version,
        max_retries=0,
        timeout=openai.Timeout(backstop + 5, connect=settings.streamsvc_connect_timeout_seconds),
    )


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


def translate(exc: Exception, *, streaming: bool = False) -> ServiceError:
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
            return UpstreamRejected(
                message,
                code="content_filter",
                details={"content_filter_result": inner.get("content_filter_result")},
            )
        if 400 <= status < 500:
            return UpstreamRejected(message, details={"upstream_status": status})
        return UpstreamError(f"the chat upstream failed ({status})")
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamTimeout("the chat upstream did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        if streaming:  # the SDK wraps a connection lost mid-body the same way
            return UpstreamError("the chat upstream broke off the stream")
        return UpstreamError("the chat upstream is unreachable", code="upstream_unreachable")
    return UpstreamError("the chat upstream failed")


def _error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
    return {}


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError) and not isinstance(
        exc, openai.APITimeoutError
    )


class AzureChatBackend:
    """``ChatBackend`` over ``AsyncAzureOpenAI`` (or any ``AsyncOpenAI``)."""

    def __init__(self, client: AsyncAzureOpenAI, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    async def aclose(self) -> None:
        await self._client.close()

    def _arguments(self, params: ChatParams) -> dict[str, Any]:
        messages = [
            {"role": m.role, "content": m.text()}
            | ({"name": m.name} if m.name else {})
            | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})
            for m in params.messages
        ]
        arguments: dict[str, Any] = {
            "model": params.deployment,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.deployment.lower().startswith(self._settings.openai_reasoning_models):
            arguments["max_completion_tokens"] = params.max_tokens
        else:
            arguments["max_tokens"] = params.max_tokens
            arguments["temperature"] = params.temperature
        return arguments

    async def _open(
        self, arguments: dict[str, Any], deadline: float
    ) -> AsyncStream[ChatCompletionChunk]:
        """Open the upstream stream, retrying 429/5xx/connection errors within the budget."""
        waited, attempt = 0.0, 0
        while True:
            try:
                stream: AsyncStream[
                    ChatCompletionChunk
                ] = await self._client.chat.completions.create(**arguments)
                return stream
            except openai.APIError as exc:
                error = translate(exc)
                wait = self._retry_wait(exc, error, attempt, waited, deadline)
                if wait is None:
                    raise error from exc
                log.info("upstream %s; retrying in %.2fs", error.code, wait)
                await anyio.sleep(wait)
                waited, attempt = waited + wait, attempt + 1

    def _retry_wait(
        self, exc: Exception, error: ServiceError, attempt: int, waited: float, deadline: float
    ) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up with ``error``."""
        if not _retryable(exc) or attempt >= self._settings.streamsvc_max_retries:
            return None
        wait = error.retry_after
        if wait is None:
            wait = _BACKOFF_BASE * 2**attempt
        over_budget = waited + wait > self._settings.streamsvc_retry_max_wait_seconds
        if over_budget or anyio.current_time() + wait >= deadline:
            if isinstance(error, UpstreamRateLimited) and error.retry_after is None:
                error.retry_after = wait  # tell the client what we would have waited
            return None
        return wait

    async def stream(self, params: ChatParams) -> AsyncIterator[ChatDelta | ChatResult]:
        settings = self._settings
        deadline = anyio.current_time() + settings.streamsvc_first_token_timeout_seconds
        with anyio.CancelScope(deadline=deadline) as scope:
            upstream = await self._open(self._arguments(params), deadline)
        if scope.cancelled_caught:
            raise UpstreamTimeout(_LATE)
        result = ChatResult(
            id="", model=params.deployment, content="", finish_reason=None, usage=None
        )
        parts: list[str] = []
        chunks = upstream.__aiter__()
        try:
            while True:
                if parts or result.finish_reason:  # past the first token: idle timeout
                    deadline = anyio.current_time() + settings.streamsvc_idle_timeout_seconds
                    silent = _SILENT
                else:
                    silent = _LATE
                chunk = await _next_chunk(chunks, deadline, silent)
                if chunk is None:
                    break
                for content in _absorb(chunk, result):
                    parts.append(content)
                    yield ChatDelta(content)
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.close()
        result.content = "".join(parts)
        yield result


_LATE = "no first token from the chat upstream in time"
_SILENT = "the chat upstream went silent mid-stream"


async def _next_chunk(
    chunks: AsyncIterator[ChatCompletionChunk], deadline: float, timeout_message: str
) -> ChatCompletionChunk | None:
    """The next upstream chunk, ``None`` at the end; errors and the deadline become ours."""
    with anyio.CancelScope(deadline=deadline):
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            return None
        except openai.APIError as exc:
            raise translate(exc, streaming=True) from exc
    raise UpstreamTimeout(timeout_message)


def _absorb(chunk: ChatCompletionChunk, result: ChatResult) -> list[str]:
    """Fold one chunk into ``result``; return its content deltas.

    Azure sends chunks with empty ``choices`` (prompt filter results, usage)
    and annotation chunks whose choice has no ``delta``; all are tolerated.
    """
    if chunk.id and not result.id:
        result.id = chunk.id
    if chunk.model:
        result.model = chunk.model
    if chunk.usage is not None:
        result.usage = Usage(
            prompt_tokens=chunk.usage.prompt_tokens,
            completion_tokens=chunk.usage.completion_tokens,
            total_tokens=chunk.usage.total_tokens,
        )
    contents: list[str] = []
    for choice in chunk.choices or ():
        if choice.finish_reason:
            result.finish_reason = choice.finish_reason
        delta = getattr(choice, "delta", None)
        content = getattr(delta, "content", None) if delta is not None else None
        if content:
            contents.append(content)
    return contents
