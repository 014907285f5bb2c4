"""POST /chat: the contract and the endpoint.

The answer is one ``ChatResult``, streamed as ``delta`` events then ``done`` (or one
``error`` after the headers). The rule: every failure before the first token is a real status.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.chat.types import ChatProvider, UpstreamBody, UpstreamChunk, Usage
from streamsvc.errors import ChatNotConfigured, ValidationFailed
from streamsvc.runs.respond import manager_of, respond
from streamsvc.settings import ChatSettings
from streamsvc.web import observability, sse
from streamsvc.web.auth import request_owner
from streamsvc.web.bodies import JsonDecoder, read_body, wants_stream
from streamsvc.web.services import Services, services

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
    #: Answer 202 at once; the run goes on without a reader (``GET /runs/{id}``).
    background: bool = False


class ChatResult(msgspec.Struct):
    """The JSON answer, and the data of the stream's final ``done`` event."""

    id: str
    model: str
    content: str
    finish_reason: str | None
    usage: Usage | None
    #: The run this answer ends (``GET /runs/{id}``).
    run_id: str | None = None


class ChatDelta(msgspec.Struct):
    content: str


class ChatParams(msgspec.Struct, frozen=True):
    """What a /chat answer needs, with the settings' defaults already applied."""

    deployment: str
    messages: list[Message]
    temperature: float
    max_tokens: int


def deployments_for(requested: str, settings: ChatSettings) -> list[str]:
    """The deployments to try, in order.

    The configured ones (the default deployment, then
    STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS) back each other up: a request for any
    of them tries the others next. A request for any other deployment gets
    no fallback (another model family is never substituted unasked).
    """
    group = [settings.deployment, *settings.fallback_deployments]
    configured = list(dict.fromkeys(name for name in group if name))
    if requested not in configured:
        return [requested]
    return [requested, *(name for name in configured if name != requested)]


def token_limits(
    deployment: str, max_tokens: int, temperature: float, settings: ChatSettings
) -> dict[str, Any]:
    """``max_tokens`` and ``temperature``; only ``max_completion_tokens`` for reasoning models."""
    if deployment.lower().startswith(settings.reasoning_models):
        return {"max_completion_tokens": max_tokens}
    return {"max_tokens": max_tokens, "temperature": temperature}


# ---- POST /chat ---------------------------------------------------------------------------------

_decoder = JsonDecoder(ChatRequest)


def params_for(request: ChatRequest, settings: ChatSettings) -> ChatParams:
    total = sum(len(message.text()) for message in request.messages)
    if total > MAX_TOTAL_CHARS:
        raise ValidationFailed(
            f"messages hold {total} characters; the limit is {MAX_TOTAL_CHARS}",
            path="$.messages",
        )
    deployment = request.model or settings.deployment
    assert deployment is not None  # chat.configured checked it
    return ChatParams(
        deployment=deployment,
        messages=request.messages,
        temperature=(settings.temperature if request.temperature is None else request.temperature),
        max_tokens=settings.max_tokens if request.max_tokens is None else request.max_tokens,
    )


def upstream_body(params: ChatParams, deployment: str, settings: ChatSettings) -> UpstreamBody:
    """The upstream request for one deployment: always streamed, with usage."""
    messages = [
        {"role": m.role, "content": m.text()}
        | ({"name": m.name} if m.name else {})
        | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})
        for m in params.messages
    ]
    body: UpstreamBody = {
        "model": deployment,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return body | token_limits(deployment, params.max_tokens, params.temperature, settings)


async def answer(
    provider: ChatProvider, params: ChatParams, settings: ChatSettings
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


def _absorb(chunk: UpstreamChunk, result: ChatResult) -> list[str]:
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


def configured_provider(found: Services) -> ChatProvider:
    """The app's chat provider, or a 503 naming the settings it still needs."""
    if found.chat is None:
        missing = found.settings.chat.missing
        raise ChatNotConfigured(f"chat is not configured: set {', '.join(missing)}")
    return found.chat


async def chat_endpoint(request: Request) -> Response:
    found = services(request)
    settings = found.settings
    body = _decoder.decode_body(await read_body(request, settings.server))
    provider = configured_provider(found)
    params = params_for(body, settings.chat)
    run = await manager_of(found).create(
        "chat",
        owner=request_owner(request.scope, settings.server.api_keys),
        background=body.background,
        request=msgspec.to_builtins(body),
    )
    events = _events(observability.observe_chat(answer(provider, params, settings.chat)))
    stream = wants_stream(request, body.stream)
    return await respond(request, found, run, events, background=body.background, stream=stream)
