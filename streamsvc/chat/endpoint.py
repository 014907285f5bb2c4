"""POST /chat: the contract, the chat provider protocol, and the endpoint.

The body is the original contract's (``messages``, ``model``, ``temperature``,
``max_tokens``) plus ``stream``. The answer is one ``ChatResult``; the stream is
one ``delta`` event per content delta, then a ``done`` event whose data is
exactly that ``ChatResult``. Failures after the headers end the stream with one
``error`` event.

Every upstream (``streamsvc.chat.provider``: Azure OpenAI, any OpenAI-compatible
base URL) is a ``ChatProvider``: it streams the upstream's chunks as JSON
objects, holding them back until the first token. This module also holds what
both chat endpoints (this one and ``streamsvc.chat.openai_compat``) share: the
deployments to try (``deployments_for``), the reasoning-model rule
(``token_limits``) and what counts as a token (``has_token``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Annotated, Any, Literal, Protocol

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from streamsvc.errors import ChatNotConfigured, ValidationFailed
from streamsvc.settings import Settings
from streamsvc.web import observability, sse
from streamsvc.web.bodies import JsonDecoder, read_body, wants_stream

MAX_MESSAGES = 512
MAX_TOTAL_CHARS = 1_000_000

Role = Literal["system", "user", "assistant", "tool", "developer"]


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: Annotated[str, msgspec.Meta(max_length=MAX_TOTAL_CHARS)]


class Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: Role
    content: (
        Annotated[str, msgspec.Meta(max_length=MAX_TOTAL_CHARS)]
        | Annotated[list[TextPart], msgspec.Meta(max_length=256)]
    )
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    tool_call_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    stream: bool | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResult(msgspec.Struct):
    """The JSON answer, and the data of the stream's final ``done`` event."""

    id: str
    model: str
    content: str
    finish_reason: str | None
    usage: Usage | None


class ChatDelta(msgspec.Struct):
    content: str


class ChatParams(msgspec.Struct, frozen=True):
    """What a /chat answer needs, with the settings' defaults already applied."""

    deployment: str
    messages: list[Message]
    temperature: float
    max_tokens: int


Chunk = dict[str, Any]


class ChatProvider(Protocol):
    """One upstream chat-completions API.

    ``completion`` streams one completion as the upstream's chunks (the JSON
    object of each SSE ``data:``, untouched). ``attempts`` are whole request
    bodies, one per deployment, tried in order: a 429, 5xx, unreachable
    upstream or timeout before the first token moves on to the next one, each
    attempt with its own retries and first-token deadline. Nothing is yielded
    before the first token (``has_token``): earlier chunks are held and come
    with it, so the first ``anext`` returns at the first token, and failures
    before it are ``ServiceError``s raised from there (real HTTP statuses).
    """

    def completion(self, attempts: Sequence[Chunk]) -> AsyncGenerator[Chunk, None]: ...

    async def aclose(self) -> None: ...


def deployments_for(requested: str, settings: Settings) -> list[str]:
    """The deployments to try, in order.

    The configured ones (the default deployment, then
    STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS) back each other up: a request for any
    of them tries the others next. A request for any other deployment gets
    no fallback (another model family is never substituted unasked).
    """
    group = [settings.chat_deployment, *settings.streamsvc_chat_fallback_deployments]
    configured = list(dict.fromkeys(name for name in group if name))
    if requested not in configured:
        return [requested]
    return [requested, *(name for name in configured if name != requested)]


def token_limits(
    deployment: str, max_tokens: int, temperature: float, settings: Settings
) -> dict[str, Any]:
    """``max_tokens`` and ``temperature``; only ``max_completion_tokens`` for reasoning models."""
    if deployment.lower().startswith(settings.openai_reasoning_models):
        return {"max_completion_tokens": max_tokens}
    return {"max_tokens": max_tokens, "temperature": temperature}


def has_token(chunk: Chunk) -> bool:
    """Whether a chunk carries output: a delta with more than a role, or a finish reason.

    Azure's prompt-filter chunk, the role-only first chunk and content-filter
    annotations (a choice with no ``delta``) carry none.
    """
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role"):
            return True
    return False


# ---- POST /chat ---------------------------------------------------------------------------------

_decoder = JsonDecoder(ChatRequest)


def params_for(request: ChatRequest, settings: Settings) -> ChatParams:
    total = sum(len(message.text()) for message in request.messages)
    if total > MAX_TOTAL_CHARS:
        raise ValidationFailed(
            f"messages hold {total} characters; the limit is {MAX_TOTAL_CHARS}",
            path="$.messages",
        )
    deployment = request.model or settings.chat_deployment
    assert deployment is not None  # chat_configured checked it
    return ChatParams(
        deployment=deployment,
        messages=request.messages,
        temperature=(
            settings.openai_temperature if request.temperature is None else request.temperature
        ),
        max_tokens=settings.openai_max_tokens if request.max_tokens is None else request.max_tokens,
    )


def upstream_body(params: ChatParams, deployment: str, settings: Settings) -> Chunk:
    """The upstream request for one deployment: always streamed, with usage."""
    messages = [
        {"role": m.role, "content": m.text()}
        | ({"name": m.name} if m.name else {})
        | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})
        for m in params.messages
    ]
    body: Chunk = {
        "model": deployment,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return body | token_limits(deployment, params.max_tokens, params.temperature, settings)


async def answer(
    provider: ChatProvider, params: ChatParams, settings: Settings
) -> AsyncIterator[ChatDelta | ChatResult]:
    """One completion as ``ChatDelta`` items, then exactly one ``ChatResult``."""
    attempts = [
        upstream_body(params, deployment, settings)
        for deployment in deployments_for(params.deployment, settings)
    ]
    result = ChatResult(id="", model=params.deployment, content="", finish_reason=None, usage=None)
    parts: list[str] = []
    chunks = provider.completion(attempts)
    try:
        async for chunk in chunks:
            for content in _absorb(chunk, result):
                parts.append(content)
                yield ChatDelta(content)
    finally:
        await chunks.aclose()
    result.content = "".join(parts)
    yield result


def _absorb(chunk: Chunk, result: ChatResult) -> list[str]:
    """Fold one chunk into ``result``; return its content deltas.

    Azure sends chunks with empty ``choices`` (prompt filter results, usage)
    and annotation chunks whose choice has no ``delta``; all are tolerated.
    """
    if isinstance(chunk.get("id"), str) and chunk["id"] and not result.id:
        result.id = chunk["id"]
    if isinstance(chunk.get("model"), str) and chunk["model"]:
        result.model = chunk["model"]
    if isinstance(chunk.get("usage"), dict):  # an odd one is no reason to fail the answer
        with contextlib.suppress(msgspec.ValidationError):
            result.usage = msgspec.convert(chunk["usage"], Usage)
    contents: list[str] = []
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("finish_reason"), str):
            result.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and content:
            contents.append(content)
    return contents


async def _events(source: AsyncIterator[ChatDelta | ChatResult]) -> AsyncIterator[sse.Event]:
    try:
        async for item in source:
            if isinstance(item, ChatDelta):
                yield sse.Event("delta", item)
            else:
                yield sse.Event("done", item)
    finally:
        await source.aclose()  # type: ignore[attr-defined]


async def collect(source: AsyncIterator[ChatDelta | ChatResult]) -> ChatResult:
    """Drain an answer into its final result (the non-streaming mode)."""
    try:
        async for item in source:
            if isinstance(item, ChatResult):
                return item
    finally:
        await source.aclose()  # type: ignore[attr-defined]
    raise RuntimeError("the chat answer ended without a result")


_result_encoder = msgspec.json.Encoder()


def configured_provider(request: Request) -> ChatProvider:
    """The app's chat provider, or a 503 naming the settings it still needs."""
    provider: ChatProvider | None = request.app.state.chat_provider
    if provider is None:
        missing = request.app.state.settings.chat_missing
        raise ChatNotConfigured(f"chat is not configured: set {', '.join(missing)}")
    return provider


async def chat_endpoint(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    body = _decoder.decode_body(await read_body(request, settings.streamsvc_max_body_bytes))
    provider = configured_provider(request)
    params = params_for(body, settings)
    try:
        if not wants_stream(request, body.stream):
            whole = collect(observability.observe_chat(answer(provider, params, settings)))
            result = await sse.before_headers(request, state.streams, whole)
            return Response(_result_encoder.encode(result), media_type="application/json")
        events = _events(observability.observe_chat(answer(provider, params, settings)))
        first = await sse.before_headers(request, state.streams, sse.start(events))
    except ClientDisconnect:
        return Response(status_code=499)  # nobody is listening any more
    return sse.event_response(
        first, events, state.streams, keepalive=settings.streamsvc_keepalive_seconds
    )
