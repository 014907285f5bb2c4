"""The API-key gate: a pure-ASGI middleware in front of the protected paths.

Keys (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) are compared in constant time; a
missing or wrong one is a 401, a key over its limits (``web.limits``) a 429, before the body.
A key is named only by ``key_id`` (never logged itself).
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from streamsvc.errors import ServiceError, Unauthorized
from streamsvc.web import observability
from streamsvc.web.limits import KeyLimits
from streamsvc.web.rendering import error_response

#: Paths whose answers spend chat tokens (checked against the tokens-per-minute limit).
CHAT_PATHS = ("/chat", "/v1/chat/")


def key_id(key: str) -> str:
    """A short stable id of an API key (the first 8 hex digits of its SHA-256): what logs,
    metrics and run owners show instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class ApiKeyMiddleware:
    """Require one of the configured API keys on the protected paths.

    Pure ASGI: streaming responses pass untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: tuple[str, ...],
        protected: tuple[str, ...],
        limits: KeyLimits | None = None,
    ) -> None:
        self.app = app
        # Digests, so every comparison is between equal lengths: no length leaks either.
        self.keys = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.ids = [key_id(key) for key in keys]
        self.protected = protected
        self.limits = limits if limits is not None and limits.enabled else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(self.protected):
            await self.app(scope, receive, send)
            return
        found = self._key_of(scope)
        if found is None:
            response = error_response(Unauthorized("a valid API key is required"), scope["path"])
            response.headers["WWW-Authenticate"] = "Bearer"
            await _refuse(response, scope, receive, send)
            return
        facts = observability.current()
        facts.key_id = found
        if self.limits is None:
            await self.app(scope, receive, send)
            return
        chat = scope["path"].startswith(CHAT_PATHS)
        try:
            self.limits.check(found, uses_tokens=chat)
        except ServiceError as exc:
            facts.limited = (exc.details or {}).get("limit")
            await _refuse(error_response(exc, scope["path"]), scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if chat and facts.total_tokens:
                self.limits.spend(found, facts.total_tokens)

    def _key_of(self, scope: Scope) -> str | None:
        """The id of the key the request offers, None when it offers none of ours."""
        offered = offered_key(scope)
        digest = hashlib.sha256(offered).digest()
        found = -1
        for index, key in enumerate(self.keys):  # no early exit: the time is the same for all
            if hmac.compare_digest(digest, key):
                found = index
        return self.ids[found] if found >= 0 and offered else None


async def _refuse(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer before the body is read: the connection cannot be reused, so say so, or a
    keep-alive client may send its next request into a closed socket."""
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


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
