"""POST /v1/chat/completions: OpenAI's chat-completions API, passed through.

Only the core of the body is checked; every other field goes upstream untouched, and the
upstream's chunks come back untouched. Errors are OpenAI's shape with our stable codes.
Design notes: docs/architecture.md ("Module notes").
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from streamsvc.chat.endpoint import configured_provider, deployments_for, token_limits
from streamsvc.chat.openai_errors import error_envelope
from streamsvc.chat.types import ChatProvider, JsonObject, UpstreamBody, UpstreamChunk, Usage
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


# ---- the clean stream ---------------------------------------------------------------------------

#: The request header that keeps Azure's extras in a /v1 stream (``1`` or ``true``).
AZURE_EXTRAS_HEADER = "x-streamsvc-azure-extras"


class StreamCleaner:
    """Shapes each upstream chunk the way every OpenAI client parses it.

    No chunk with empty ``choices`` goes out (Azure's prompt-filter chunk is dropped, or
    with ``extras`` its ``prompt_filter_results`` ride on the first real chunk), except the
    usage chunk a client asked for (OpenAI's own shape); every choice has a ``delta``
    (annotation-only choices are dropped, or with ``extras`` get ``delta: {}``); ``id``,
    ``model``, ``created`` and ``object`` are the first real chunk's all along. Chunks
    are fixed in place (they are ours): the usual chunk costs a few dict lookups.
    """

    __slots__ = ("created", "extras", "held", "id", "model")

    def __init__(self, extras: bool) -> None:
        self.extras = extras
        self.held: Any = None  # prompt_filter_results waiting for the first real chunk
        self.id: Any = None
        self.model: Any = None
        self.created: Any = None

    def clean(self, chunk: UpstreamChunk) -> UpstreamChunk | None:
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            if chunk.get("usage") is None:  # Azure's prompt-filter chunk, or nothing at all
                if self.extras and chunk.get("prompt_filter_results") is not None:
                    self.held = chunk["prompt_filter_results"]
                return None
            chunk["choices"] = []  # the usage chunk the client asked for
        else:
            for choice in choices:
                if not isinstance(choice, dict) or "delta" not in choice:
                    if not self._fix(chunk, choices):
                        return None
                    break
        if self.id is None:
            self.id = chunk.get("id")
            self.model = chunk.get("model")
            self.created = chunk.get("created")
        elif (
            chunk.get("id") != self.id
            or chunk.get("model") != self.model
            or chunk.get("created") != self.created
        ):
            chunk["id"], chunk["model"], chunk["created"] = self.id, self.model, self.created
        if chunk.get("object") != "chat.completion.chunk":
            chunk["object"] = "chat.completion.chunk"
        if self.held is not None:
            chunk["prompt_filter_results"] = self.held
            self.held = None
        return chunk

    def _fix(self, chunk: UpstreamChunk, choices: list[Any]) -> bool:
        """Give choices without a ``delta`` one, or drop them; False: nothing is left."""
        kept = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if "delta" not in choice:
                if not (self.extras or choice.get("finish_reason")):
                    continue  # an annotation (content_filter_offsets): Azure's extra
                choice["delta"] = {}
            kept.append(choice)
        chunk["choices"] = kept
        return bool(kept) or chunk.get("usage") is not None


# ---- the JSON answer ----------------------------------------------------------------------------

#: Top-level keys a chunk has that a ``chat.completion`` does not.
_STREAM_ONLY = frozenset({"object", "obfuscation", "choices"})
#: Message keys whose streamed pieces are concatenated (text); every other key keeps the
#: latest value. Tool calls' (and the legacy function call's) ``arguments`` and audio's
#: ``transcript`` and ``data`` are text too (``_merge_call``, ``_merge_audio``).
_TEXT = frozenset({"content", "refusal"})
#: Choice keys that only say where a streamed annotation applies.
_CHOICE_STREAM_ONLY = frozenset({"index", "delta", "content_filter_offsets"})


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _concat(target: JsonObject, key: str, value: Any) -> None:
    """Text: appended to what is there; ``None`` only fills a key that is missing."""
    current = target.get(key)
    if isinstance(value, str) and isinstance(current, str):
        target[key] = current + value
    elif value is not None or key not in target:
        target[key] = value


def _merge_call(target: JsonObject, delta: JsonObject) -> None:
    """One tool call (or ``function_call``): ``arguments`` concatenate, the rest is latest."""
    for key, value in delta.items():
        if key == "index":
            continue
        if key == "function" and isinstance(value, dict):
            function = target.get("function")
            if not isinstance(function, dict):
                function = target["function"] = {}
            _merge_call(function, value)
        elif key == "arguments":
            _concat(target, key, value)
        elif value is not None:
            target[key] = value


def _merge_tool_calls(target: JsonObject, calls: list[Any]) -> None:
    current = target.get("tool_calls")
    if not isinstance(current, list):
        current = target["tool_calls"] = []
    for call in calls:
        if not isinstance(call, dict):
            continue
        index = call.get("index")
        if not isinstance(index, int) or index < 0:
            index = len(current)
        while len(current) <= index:
            current.append({})
        _merge_call(current[index], call)


def _merge_message(message: JsonObject, delta: JsonObject) -> None:
    for key, value in delta.items():
        if key in _TEXT:
            _concat(message, key, value)
        elif key == "tool_calls" and isinstance(value, list):
            _merge_tool_calls(message, value)
        elif key == "function_call" and isinstance(value, dict):
            call = message.get(key)
            _merge_call(call if isinstance(call, dict) else message.setdefault(key, {}), value)
        elif key == "audio" and isinstance(value, dict):
            audio = message.get(key)
            if not isinstance(audio, dict):
                audio = message[key] = {}
            for part, piece in value.items():
                if part in ("data", "transcript"):
                    _concat(audio, part, piece)
                elif piece is not None:
                    audio[part] = piece
        elif value is not None:
            message[key] = value


def _merge_logprobs(target: JsonObject, logprobs: JsonObject) -> None:
    """Token logprobs are a sequence, like the text they describe: the lists extend."""
    current = target.get("logprobs")
    if not isinstance(current, dict):
        current = target["logprobs"] = {}
    for key, value in logprobs.items():
        if isinstance(value, list) and isinstance(current.get(key), list):
            current[key] = current[key] + value
        elif value is not None or key not in current:
            current[key] = value


class CompletionBuilder:
    """Merges streamed chunks into the ``chat.completion`` a non-streaming call answers.

    Only text is concatenated (``content``, ``refusal``, tool-call ``arguments``, audio's
    transcript and data; logprobs' token lists extend); every other value is the latest
    one present, so Azure's per-chunk ``content_filter_results`` end as its final verdict.
    The message starts as OpenAI's does (``refusal`` null, ``annotations`` empty).
    """

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
            target = self.choices.get(index)
            if target is None:
                target = self.choices[index] = {
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "refusal": None,
                        "annotations": [],
                    },
                    "finish_reason": None,
                    "logprobs": None,
                }
            delta = choice.get("delta")
            if isinstance(delta, dict):
                _merge_message(target["message"], delta)
            for key, value in choice.items():
                if key in _CHOICE_STREAM_ONLY or not _present(value):
                    continue
                if key == "logprobs" and isinstance(value, dict):
                    _merge_logprobs(target, value)
                else:
                    target[key] = value

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
