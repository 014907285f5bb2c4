"""Reading request bodies: media type, deadline, size cap, bytes in flight, msgspec decoding.

415 before a body that is not ``application/json`` is read; 413 before one over the cap is
all read; 429 ``busy`` before one past the worker's budget of bytes in flight is; 408 past
the deadline; 400 ``malformed_json`` at a byte position; 422 at a JSON path.
"""

from __future__ import annotations

import re
from typing import Generic, TypeVar

import anyio
import msgspec
from starlette.requests import Request

from streamsvc.errors import (
    BodiesBusy,
    BodyTimeout,
    MalformedJson,
    PayloadTooLarge,
    TooDeeplyNested,
    UnsupportedMediaType,
    ValidationFailed,
)
from streamsvc.settings import ServerSettings
from streamsvc.web.services import services

T = TypeVar("T")

_POSITION = re.compile(r"\(byte (\d+)\)")
_PATH = re.compile(r" - at `(\$[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`")


class JsonDecoder(Generic[T]):
    """A decoder built once per body type, translating errors to ours."""

    def __init__(self, type: type[T]) -> None:
        self._decoder = msgspec.json.Decoder(type)

    def decode_body(self, body: bytes) -> T:
        try:
            return self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise _validation_failed(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise _malformed(str(exc), len(body)) from None
        except RecursionError:  # nesting deeper than the decoder follows
            raise TooDeeplyNested("the JSON body is nested too deeply", path="$") from None


def _validation_failed(message: str) -> ValidationFailed:
    match = _PATH.search(message)
    path = match.group(1) if match else "$"
    text = message[: match.start()] if match else message
    unknown = _UNKNOWN.match(text)
    if unknown:  # point at the field itself, not at the object holding it
        path = f"{path}.{unknown.group(1)}"
    return ValidationFailed(text, path=path)


def _malformed(message: str, size: int) -> MalformedJson:
    """400 with the byte position; truncated input is wrong at its end."""
    match = _POSITION.search(message)
    position = int(match.group(1)) if match else size
    return MalformedJson(message, path="$", details={"position": position})


def is_json(content_type: str) -> bool:
    """``application/json``, with parameters (``; charset=utf-8``) or without."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


async def read_body(request: Request, server: ServerSettings) -> bytes:
    """Read the whole JSON body, at most ``max_body_bytes`` within ``body_timeout_seconds``.

    Only ``application/json`` is read: a browser page of any site may send other
    types (``text/plain``) without asking first (no CORS preflight). Its bytes are
    counted in the app's ``BodyBudget`` as they arrive, and given back at the end.
    """
    if not is_json(request.headers.get("content-type", "")):
        raise UnsupportedMediaType("the request body must be application/json")
    limit, timeout = server.max_body_bytes, server.body_timeout_seconds
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    budget = services(request).bodies
    reserved = 0
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes")
                # Bytes that arrived, not bytes declared: headers alone hold nothing.
                if not budget.reserve(len(chunk)):
                    raise _busy(budget.capacity)
                reserved = size
                chunks.append(chunk)
    except TimeoutError:
        chunks.clear()
        raise BodyTimeout(f"the request body did not arrive within {timeout:g} seconds") from None
    finally:  # read, refused, timed out, abandoned or cancelled: no await, so nothing to shield
        budget.release(reserved)
    return b"".join(chunks)


def _busy(capacity: int) -> BodiesBusy:
    return BodiesBusy(
        f"the server is receiving {capacity} bytes of request bodies already; try again",
        retry_after=1,
    )


def wants_stream(request: Request, stream: bool | None) -> bool:
    """Stream when the body says so, or when the client accepts only SSE."""
    if stream is not None:
        return stream
    accept = request.headers.get("accept", "")
    return "text/event-stream" in accept
