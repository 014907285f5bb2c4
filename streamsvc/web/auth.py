"""The API-key gate: a pure-ASGI middleware in front of the protected paths.

Keys are accepted as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` and
compared in constant time (as SHA-256 digests: no length leaks either). A
missing or wrong key is a 401 ``unauthorized`` before the body is read.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from streamsvc.errors import Unauthorized
from streamsvc.web.rendering import error_response


class ApiKeyMiddleware:
    """Require one of the configured API keys on the protected paths.

    Pure ASGI: streaming responses pass untouched.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], protected: tuple[str, ...]) -> None:
        self.app = app
        # Digests, so every comparison is between equal lengths: no length leaks either.
        self.keys = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.keys
            and scope["path"].startswith(self.protected)
            and not self._authorized(scope)
        ):
            response = error_response(Unauthorized("a valid API key is required"), scope["path"])
            response.headers["WWW-Authenticate"] = "Bearer"
            # The body is left unread, so the connection cannot be reused: say so,
            # or a keep-alive client may send its next request into a closed socket.
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        return key_matches(offered_key(scope), self.keys)


def offered_key(scope: Scope) -> bytes:
    """The key a request offers (``Authorization: Bearer`` or ``X-API-Key``), or b""."""
    offered = b""
    for name, value in scope["headers"]:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            offered = value[7:].strip()
        elif name == b"x-api-key":
            offered = value.strip()
    return offered


def key_matches(offered: bytes, digests: list[bytes]) -> bool:
    """``offered`` is one of the keys (given as SHA-256 digests), compared in constant time."""
    digest = hashlib.sha256(offered).digest()
    found = False
    for key in digests:  # no early exit: the time does not depend on which key
        found |= hmac.compare_digest(digest, key)
    return found and bool(offered)


def key_owner(offered: bytes) -> str:
    """A short stable id of a key, stored with the runs it creates (never the key itself)."""
    return hashlib.sha256(b"streamsvc-run-owner:" + offered).hexdigest()[:16]


def request_owner(scope: Scope, keys: tuple[str, ...]) -> str | None:
    """The owner of the runs a request creates: its key's id, or None when keys are off."""
    return key_owner(offered_key(scope)) if keys else None
