"""POST /chat: the contract, the backend protocol, and the endpoint.

The body is the original contract's (``messages``, ``model``, ``temperature``,
``max_tokens``) plus ``stream``. The answer is one ``ChatResult``; the stream is
one ``delta`` event per content delta, then a ``done`` event whose data is
exactly that ``ChatResult``. Failures after the headers end the stream with one
``error`` event. Backends (``streamsvc.azure``) yield our own structs only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal, Protocol

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from . import observability, sse
from .bodies import JsonDecoder, read_body, wants_stream
from .errors import NotConfigured, ValidationFailed
from .settings import Settings

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
    """What a backend needs, with the settings' defaults already applied."""

    deployment: str
    messages: list[Message]
    temperature: float
    max_tokens: int


class ChatBackend(Protocol):
    """Streams one completion: ``ChatDelta`` items, then exactly one ``ChatResult``.

    The first item is produced only once the upstream answered with its first
    token, so errors before it (auth, rate limits, timeouts) surface as
    exceptions from the first ``anext`` and become real HTTP statuses.
    """

    def stream(self, params: ChatParams) -> AsyncIterator[ChatDelta | ChatResult]: ...

    async def aclose(self) -> None: ...


_decoder = JsonDecoder(ChatRequest)


def params_for(request: ChatRequest, settings: Settings) -> ChatParams:
    total = sum(len(message.text()) for message in request.messages)
    if total > MAX_TOTAL_CHARS:
        raise ValidationFailed(
            f"messages hold {total} characters; the limit is {MAX_TOTAL_CHARS}",
            path="$.messages",
        )
    deployment = request.model or settings.azure_openai_deployment
    assert deployment is not None  # chat_configured checked it
    return ChatParams(
        deployment=deployment,
        messages=request.messages,
        temperature=(
            settings.openai_temperature if request.temperature is None else request.temperature
        ),
        max_tokens=settings.openai_max_tokens if request.max_tokens is None else request.max_tokens,
    )


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
    """Drain a backend stream into its final result (the non-streaming mode)."""
    try:
        async for item in source:
            if isinstance(item, ChatResult):
                return item
    finally:
        await source.aclose()  # type: ignore[attr-defined]
    raise RuntimeError("chat backend ended without a result")


_result_encoder = msgspec.json.Encoder()


async def chat_endpoint(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    body = _decoder.decode_body(await read_body(request, settings.streamsvc_max_body_bytes))
    backend: ChatBackend | None = state.chat_backend
    if backend is None:
        raise NotConfigured(
            "chat is not configured: set AZURE_OPENAI_API_KEY, AZURE_OPENAI_ENDPOINT "
            "and AZURE_OPENAI_DEPLOYMENT",
            code="chat_not_configured",
        )
    params = params_for(body, settings)
    try:
        if not wants_stream(request, body.stream):
            answer = collect(observability.observe_chat(backend.stream(params)))
            result = await sse.before_headers(request, state.streams, answer)
            return Response(_result_encoder.encode(result), media_type="application/json")
        events = _events(observability.observe_chat(backend.stream(params)))
        first = await sse.before_headers(request, state.streams, sse.start(events))
    except ClientDisconnect:
        return Response(status_code=499)  # nobody is listening any more
    return sse.event_response(
        first, events, state.streams, keepalive=settings.streamsvc_keepalive_seconds
    )
