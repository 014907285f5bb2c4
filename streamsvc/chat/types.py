"""What the chat endpoints and the providers share: JSON shapes and the provider protocol.

``UpstreamBody`` is one request body sent upstream, ``UpstreamChunk`` one chunk the
upstream streams back (the JSON of an SSE ``data:``); both stay plain JSON objects.
The rule: this module imports no endpoint and no SDK, so providers depend only on it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import msgspec

#: Any JSON object (a completion being merged, an ``error`` envelope, ...).
JsonObject = dict[str, Any]
#: One chat-completions request body, as posted upstream for one deployment.
UpstreamBody = dict[str, Any]
#: One streamed chunk from the upstream, untouched.
UpstreamChunk = dict[str, Any]


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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

    def completion(
        self, attempts: Sequence[UpstreamBody]
    ) -> AsyncGenerator[UpstreamChunk, None]: ...

    async def aclose(self) -> None: ...


def has_token(chunk: UpstreamChunk) -> bool:
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
