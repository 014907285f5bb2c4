"""The shapes of /v1's chunks: a stream cleaned for OpenAI's clients, and the merged answer.

``StreamCleaner`` fixes each upstream chunk in place (Azure's extras dropped or folded);
``CompletionBuilder`` merges a stream into the ``chat.completion`` Azure answers unstreamed.
The rule: plain JSON objects in and out, no HTTP; the per-chunk path stays a few lookups.
"""

from __future__ import annotations

from typing import Any

from streamsvc.chat.types import JsonObject, UpstreamChunk

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
        if not isinstance(index, int) or not 0 <= index < len(current):
            index = len(current)  # a new call (an index past the end starts no gap)
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
