"""The upstream SSE parser (providers.UpstreamChunks) on bodies split at any byte."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsvc.chat.provider import UpstreamChunks
from streamsvc.errors import ServiceError

CHUNKS = [
    {"choices": [], "prompt_filter_results": [{"prompt_index": 0}]},
    {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"choices": [{"index": 0, "delta": {"content": "lo\nthere"}}]},
    {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
]


def body(newline: str = "\n", done: bool = True, final_blank: bool = True) -> bytes:
    events = [f": keep-alive{newline}"]
    events += [f"data: {json.dumps(chunk)}{newline}{newline}" for chunk in CHUNKS]
    if done:
        events.append(f"data: [DONE]{newline}{newline}")
    text = "".join(events)
    if not final_blank:
        text = text.removesuffix(newline)
    return text.encode()


async def read_all(data: bytes, cuts: list[int]) -> list[object]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})

    async def pieces() -> AsyncIterator[bytes]:
        for start, end in itertools.pairwise(points):
            yield data[start:end]

    parser = UpstreamChunks(httpx2.Response(200, content=pieces()))
    found: list[object] = []
    while (chunk := await parser.next()) is not None:
        found.append(chunk)
    await parser.aclose()
    return found


@settings(max_examples=150, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    newline=st.sampled_from(["\n", "\r\n"]),
    done=st.booleans(),
)
async def test_any_split_of_the_body_gives_the_same_chunks(
    cuts: list[int], newline: str, done: bool
) -> None:
    assert await read_all(body(newline, done), cuts) == CHUNKS


async def test_a_body_that_ends_without_a_blank_line_still_yields_its_last_event() -> None:
    assert await read_all(body(done=False, final_blank=False), []) == CHUNKS


async def test_an_error_object_in_the_stream_fails_it() -> None:
    data = b'data: {"choices": []}\n\ndata: {"error": {"message": "boom"}}\n\n'
    with pytest.raises(ServiceError):
        await read_all(data, [7])
