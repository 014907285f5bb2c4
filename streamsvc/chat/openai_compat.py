"""POST /v1/chat/completions: OpenAI's chat-completions API, passed through.

Only the core of the body is checked; every other field goes upstream untouched, and the
upstream's chunks come back untouched. Errors are OpenAI's shape with our stable codes.
Design notes: docs/architecture.md ("Module notes").
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Annotated, Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from streamsvc.chat.endpoint import configured_provider, deployments_for, token_limits
from streamsvc.chat.openai_errors import error_envelope
from streamsvc.chat.types import ChatProvider, JsonObject, UpstreamBody, Usage
from streamsvc.errors import ServiceError
from streamsvc.settings import ChatSettings
from streamsvc.web import observability, sse
from streamsvc.web.bodies import JsonDecoder, read_body
from streamsvc.web.services import services


class CoreMessage(msgspec.Struct):
    """A message: only ``role`` is checked; content, tool_calls, name, ... pass through."""

    role: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


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
    provider: ChatProvider, attempts: list[UpstreamBody], include_usage: bool
) -> AsyncGenerator[sse.Event, None]:
    """The upstream's chunks for the client, observed as /chat's answer is: the first
    token, the usage (dropped for the client unless asked for) and, only with
    ``STREAMSVC_LOG_CONTENT``, the whole answer (merged as the JSON answer is)."""
    facts = observability.current()
    whole = CompletionBuilder() if facts.log_content else None
    source = provider.completion(attempts)
    try:
        async for chunk in source:
            facts.first_token()
            if whole is not None:
                whole.add(chunk)
            if isinstance(chunk.get("usage"), dict):
                with contextlib.suppress(msgspec.ValidationError):
                    facts.tokens(msgspec.convert(chunk["usage"], Usage))
            if "usage" in chunk and not include_usage:
                if not chunk.get("choices"):
                    continue  # the usage chunk, which the client did not ask for
                chunk = {key: value for key, value in chunk.items() if key != "usage"}
            yield sse.Event("chunk", chunk)
    finally:
        await source.aclose()
    if whole is not None:
        facts.answered(whole.completion())


# ---- the JSON answer ----------------------------------------------------------------------------

_REPLACED = frozenset({"role", "id", "type", "finish_reason"})  # whole values, never continued
_STREAM_ONLY = frozenset({"object", "obfuscation", "choices"})


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _merge(target: JsonObject, delta: JsonObject) -> None:
    """Fold a delta into what it continues: strings concatenate, objects merge, lists
    extend, and list items with an ``index`` (tool calls) merge into that item."""
    for key, value in delta.items():
        current = target.get(key)
        if value is None:
            continue
        if isinstance(value, str) and isinstance(current, str) and key not in _REPLACED:
            target[key] = current + value
        elif isinstance(value, dict):
            if not isinstance(current, dict):
                current = target[key] = {}
            _merge(current, value)
        elif isinstance(value, list):
            if not isinstance(current, list):
                current = target[key] = []
            _extend(current, value)
        else:
            target[key] = value


def _extend(target: list[Any], items: list[Any]) -> None:
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        if isinstance(index, int) and 0 <= index < len(target):
            _merge(target[index], {k: v for k, v in item.items() if k != "index"})
        elif isinstance(index, int):
            fresh: JsonObject = {}
            _merge(fresh, {k: v for k, v in item.items() if k != "index"})
            target.append(fresh)
        else:
            target.append(item)


class CompletionBuilder:
    """Merges streamed chunks into the ``chat.completion`` a non-streaming call answers."""

    def __init__(self) -> None:
        self.top: JsonObject = {"id": "", "object": "chat.completion", "created": 0, "model": ""}
        self.choices: dict[int, JsonObject] = {}

    def add(self, chunk: JsonObject) -> None:
        for key, value in chunk.items():
            if key not in _STREAM_ONLY and _present(value):
                self.top[key] = value
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = choice["index"] if isinstance(choice.get("index"), int) else 0
            target = self.choices.setdefault(
                index,
                {
                    "index": index,
                    "message": {"role": "assistant", "content": None},
                    "finish_reason": None,
                    "logprobs": None,
                },
            )
            delta = choice.get("delta")
            if isinstance(delta, dict):
                _merge(target["message"], delta)
            rest = {k: v for k, v in choice.items() if k not in ("index", "delta")}
            rest.pop("content_filter_offsets", None)  # where a streamed annotation applies
            _merge(target, {k: v for k, v in rest.items() if _present(v)})

    def completion(self) -> JsonObject:
        return {**self.top, "choices": [self.choices[i] for i in sorted(self.choices)]}


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
    chunks = _chunks(provider, attempts, include_usage=asked or not streaming)
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
