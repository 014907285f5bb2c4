"""The Host/Origin gate: a pure-ASGI middleware against DNS rebinding and cross-site calls.

``Host`` must be well formed (a port all digits) and allowed (loopback, the bind address,
``STREAMSVC_ALLOWED_HOSTS``), else 421; an ``Origin`` the same origin or in
``STREAMSVC_CORS_ORIGINS``, else 403. Both before any other work, the body unread.
"""

from __future__ import annotations

import ipaddress
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from streamsvc.errors import Forbidden, MisdirectedRequest, ServiceError
from streamsvc.web.rendering import error_response

#: Always allowed: a loopback-bound server is reached by these.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

#: A ``Host`` header: a bracketed IPv6 literal or a name without ``:``, then an optional
#: all-digit port (``localhost:evil`` and ``localhost:`` do not match).
_HOST_HEADER = re.compile(r"(\[[^\[\]]*\]|[^:\[\]]*)(:[0-9]+)?")


def host_name(host: str) -> str:
    """The name or address of a ``Host`` value, without port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def header_host_name(value: str) -> str | None:
    """The name of a request's ``Host`` header (as ``host_name``); None when malformed."""
    value = value.strip()
    if _HOST_HEADER.fullmatch(value) is None:
        return None
    return host_name(value)


def allowed_hosts(bind_host: str, configured: tuple[str, ...]) -> frozenset[str]:
    """Loopback, the bind address (unless a wildcard such as 0.0.0.0) and ``configured``."""
    names = {*LOOPBACK_HOSTS, *(host_name(name) for name in configured)}
    try:
        wildcard = ipaddress.ip_address(bind_host).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard:
        names.add(host_name(bind_host))
    return frozenset(names)


class HostOriginMiddleware:
    """Refuse a request whose ``Host`` or ``Origin`` is not allowed, before any work."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str], cors_origins: tuple[str, ...]) -> None:
        self.app = app
        self.any_host = "*" in hosts
        self.hosts = hosts
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(origin.lower().rstrip("/") for origin in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                response = error_response(refusal, scope["path"])
                response.headers["Connection"] = "close"  # the body is left unread
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> ServiceError | None:
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        if host is None:  # HTTP/1.0 without one: no browser sends that
            host = ""
        elif not (self.any_host or header_host_name(host) in self.hosts):
            return MisdirectedRequest("this server does not answer for that Host")
        if origin is None or self.any_origin:
            return None
        origin = origin.strip().lower().rstrip("/")
        same = origin in {f"http://{host.lower()}", f"https://{host.lower()}"}
        if same or origin in self.origins:
            return None
        return Forbidden("requests from this Origin are not allowed")
