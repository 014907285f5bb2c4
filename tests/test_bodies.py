"""Request bodies: malformed JSON (400 with a position) and the size cap (413).

The 400s are checked on the app in-process; the 413s on a real server from a
raw socket (answered before the body is all sent); the decoder's error
translation directly, on the cases that are awkward to send over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest

from streamsvc.errors import RequestError, ValidationFailed
from streamsvc.web.bodies import JsonDecoder
from tests.fake_azure import FakeAzure
from tests.harness import ServerProcess, asgi_client, server_env

HEADERS = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("raw", "position"),
    [
        (b'{"messages": [}', 14),
        (b'{"messages": [', 14),  # truncated: wrong at its end
        (b"", 0),
        (b'{"messages": [{"role": "user", "content": "x"}]} and more', 50),
        (b"\xff", 0),
    ],
    ids=["bad-character", "truncated", "empty", "trailing", "not-utf8"],
)
async def test_malformed_json_is_400_with_the_byte_position(
    azure: FakeAzure, raw: bytes, position: int
) -> None:
    async with asgi_client(server_env(azure)) as app:
        response = await app.post("/chat", content=raw, headers=HEADERS)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "malformed_json"
    assert error["path"] == "$"
    assert error["details"] == {"position": position}
    assert azure.requests == []


_POST = b"POST /chat HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
_OPENING = b'{"messages": [{"role": "user", "content": "'


async def answer_to_unfinished_body(port: int, head: bytes, pieces: list[bytes]) -> Any:
    """Send a request head and part of a body from a raw socket, never the rest.

    Returns the JSON of the answer, which must be a 413: it proves the server
    answered without waiting for the rest of the body.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_POST + head + b"\r\n")
        for piece in pieces:
            writer.write(piece)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.startswith(b"HTTP/1.1 413 ")
        length = re.search(rb"content-length: (\d+)", answer.lower())
        assert length is not None
        return json.loads(await asyncio.wait_for(reader.readexactly(int(length[1])), 10))
    finally:
        writer.close()


async def test_a_declared_length_over_the_cap_is_413_before_the_body_is_sent(
    server: ServerProcess, azure: FakeAzure
) -> None:
    # Announce 5 MB (the default cap is 4 MiB) and send a few bytes of it.
    body = await answer_to_unfinished_body(server.port, b"content-length: 5000000\r\n", [_OPENING])
    assert body["error"]["code"] == "payload_too_large"
    assert azure.requests == []


async def test_a_chunked_body_over_the_cap_is_413_before_it_is_all_read(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, client: httpx.AsyncClient
) -> None:
    # A chunked body (no Content-Length) that passes the cap, then nothing more:
    # 1244 bytes of a body that never ends (a client still writing would race the close).
    server = start_server(STREAMSVC_MAX_BODY_BYTES="1000")
    pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in (_OPENING, b"y" * 600, b"y" * 600)]
    body = await answer_to_unfinished_body(server.port, b"transfer-encoding: chunked\r\n", pieces)
    assert body["error"]["code"] == "payload_too_large"
    small = {"messages": [{"role": "user", "content": "y" * 900}]}
    assert (await client.post(server.url + "/chat", json=small)).status_code == 200
    assert len(azure.requests) == 1


def test_decoder_translates_errors_into_ours() -> None:
    class Body(msgspec.Struct, forbid_unknown_fields=True):
        items: list[int]

    decoder = JsonDecoder(Body)
    assert decoder.decode_body(b'{"items": [1, 2]}') == Body([1, 2])
    with pytest.raises(ValidationFailed) as wrong:
        decoder.decode_body(b'{"items": [1, "2"]}')
    assert (wrong.value.status, wrong.value.path) == (422, "$.items[1]")
    with pytest.raises(ValidationFailed) as unknown:
        decoder.decode_body(b'{"items": [], "other": 1}')
    assert unknown.value.path == "$.other"
    with pytest.raises(RequestError) as malformed:
        decoder.decode_body(b'{"items": [1,,]}')
    assert not isinstance(malformed.value, ValidationFailed)
    assert (malformed.value.status, malformed.value.code) == (400, "malformed_json")
    assert malformed.value.details == {"position": 13}
