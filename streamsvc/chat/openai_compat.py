"""/v1: OpenAI's chat-completions API passed through, and the deployments as /v1/models.

Only the core of the body is checked; every other field goes upstream untouched. Streams are
cleaned so OpenAI's clients parse them (``StreamCleaner``); the JSON answer merges the chunks
as Azure answers without streaming. Design notes: docs/architecture.md ("Module notes").
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from streamsvc.chat.endpoint import configured_provider, deployments_for, token_limits
from streamsvc.chat.openai_chunks import AZURE_EXTRAS_HEADER, CompletionBuilder, StreamCleaner
from streamsvc.chat.openai_errors import error_envelope
from streamsvc.chat.types import ChatProvider, JsonObject, UpstreamBody, Usage
from streamsvc.errors import ModelNotFound, ServiceError
from streamsvc.settings import ChatSettings
from streamsvc.web import observability, sse
from streamsvc.web.bodies import JsonDecoder, read_body
from streamsvc.web.services import services


class CoreMessage(msgspec.Struct):
    """A message: only ``role`` is checked; content, tool_calls, name, ... pass through."""

    role: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Model(msgspec.Struct):
    """One configured deployment, in OpenAI's shape (``created`` is unknown: 0)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    #: The provider that serves it: ``azure`` or ``openai`` (STREAMSVC_CHAT_PROVIDER).
    owned_by: str = "azure"


class ModelList(msgspec.Struct):
    """GET /v1/models: the default deployment, then STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS."""

    data: list[Model]
    object: Literal["list"] = "list"


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class CompletionRequest(msgspec.Struct):
    """The part of OpenAI's body checked here; every other field goes upstream untouched."""

    messages: Annotated[list[CoreMessage], msgspec.Meta(min_length=1)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


# ---- the request --------------------------------------------------------------------------------

_TOKEN_FIELDS = frozenset({"max_tokens", "max_completion_tokens"})
_decoder = JsonDecoder(CompletionRequest)
_encoder = msgspec.json.Encoder()
_object_decoder = msgspec.json.Decoder(dict[str, Any])


def upstream_bodies(
    body: JsonObject, request: CompletionRequest, settings: ChatSettings
) -> list[UpstreamBody]:
    """The client's body for each deployment to try, streamed with usage, defaults filled in."""
    requested = request.model or settings.deployment
    assert requested is not None  # chat.configured checked it
    options = body.get("stream_options") if request.stream else None
    stream_options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    attempts = []
    for deployment in deployments_for(requested, settings):
        defaults = token_limits(deployment, settings.max_tokens, settings.temperature, settings)
        if _TOKEN_FIELDS & body.keys():
            defaults = {k: v for k, v in defaults.items() if k not in _TOKEN_FIELDS}
        fixed = {"model": deployment, "stream": True, "stream_options": stream_options}
        attempts.append(defaults | body | fixed)
    return attempts


async def _chunks(
    provider: ChatProvider,
    attempts: list[UpstreamBody],
    include_usage: bool,
    cleaner: StreamCleaner | None = None,
) -> AsyncGenerator[sse.Event, None]:
    """The upstream's chunks for the client, observed as /chat's answer is: the first
    token, the usage (dropped for the client unless asked for) and, only with
    ``STREAMSVC_LOG_CONTENT``, the whole answer (merged as the JSON answer is). A stream's
    chunks go through ``cleaner``; the JSON answer merges them as the upstream sent them."""
    facts = observability.current()
    whole = CompletionBuilder() if facts.log_content else None
    source = provider.completion(attempts)
    try:
        async for chunk in source:
            facts.first_token()
            if whole is not None:
                whole.add(chunk)
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                with contextlib.suppress(msgspec.ValidationError):
                    facts.tokens(msgspec.convert(usage, Usage))
            if "usage" in chunk and not include_usage:
                if not chunk.get("choices"):
                    continue  # the usage chunk, which the client did not ask for
                del chunk["usage"]  # the chunk is ours: no copy
            if cleaner is not None:
                cleaned = cleaner.clean(chunk)
                if cleaned is None:
                    continue
                chunk = cleaned
            yield sse.Event("chunk", chunk)
    finally:
        await source.aclose()
    if whole is not None:
        facts.answered(whole.completion())


async def _whole(chunks: AsyncGenerator[sse.Event, None]) -> JsonObject:
    builder = CompletionBuilder()
    try:
        async for event in chunks:
            builder.add(event.data)
    finally:
        await chunks.aclose()
    return builder.completion()


# ---- the stream ---------------------------------------------------------------------------------

_DONE = sse.frame(b"[DONE]")


def _data_frame(event: sse.Event) -> bytes:
    """``data:`` only: no ``event:`` or ``id:`` (what OpenAI's clients read)."""
    return sse.frame(event.data)


def _error_event(exc: ServiceError) -> sse.Event:
    return sse.Event("error", error_envelope(exc))


# ---- the endpoint -------------------------------------------------------------------------------


async def completions_endpoint(request: Request) -> Response:
    found = services(request)
    settings = found.settings
    raw = await read_body(request, settings.server)
    core = _decoder.decode_body(raw)
    body = _object_decoder.decode(raw)
    provider = configured_provider(found)
    attempts = upstream_bodies(body, core, settings.chat)
    observability.current().model = attempts[0].get("model")
    streaming = core.stream is True
    asked = core.stream_options is not None and core.stream_options.include_usage is True
    extras = request.headers.get(AZURE_EXTRAS_HEADER, "").lower() in ("1", "true")
    cleaner = StreamCleaner(extras) if streaming else None
    chunks = _chunks(provider, attempts, include_usage=asked or not streaming, cleaner=cleaner)
    try:
        if not streaming:
            completion = await sse.before_headers(request, found.streams, _whole(chunks))
            encoded = _encoder.encode(completion)
            return sse.JsonAnswer(encoded, settings.server.send_timeout_seconds)
        first = await sse.before_headers(request, found.streams, sse.start(chunks))
    except ClientDisconnect:
        return Response(status_code=499)  # nobody is listening any more
    return sse.event_response(
        first,
        chunks,
        found.streams,
        keepalive=settings.server.keepalive_seconds,
        send_timeout=settings.server.send_timeout_seconds,
        encode=_data_frame,
        failure=_error_event,
        end=_DONE,
    )


def _models(request: Request) -> list[Model]:
    """The configured deployments (503 while chat is not configured)."""
    found = services(request)
    configured_provider(found)
    settings = found.settings.chat
    names = dict.fromkeys(n for n in (settings.deployment, *settings.fallback_deployments) if n)
    return [Model(id=name, owned_by=settings.provider) for name in names]


async def models_endpoint(request: Request) -> Response:
    listing = ModelList(data=_models(request))
    return Response(_encoder.encode(listing), media_type="application/json")


async def model_endpoint(request: Request) -> Response:
    wanted = request.path_params["model"]
    for model in _models(request):
        if model.id == wanted:
            return Response(_encoder.encode(model), media_type="application/json")
    raise ModelNotFound(
        f"the model {wanted!r} is not one of this server's deployments (GET /v1/models)"
    )
