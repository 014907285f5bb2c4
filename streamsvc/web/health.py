"""The probes: ``/health`` (components, always 200), ``/health/live`` and ``/health/ready``.

``/health/ready`` is 503 with the reasons while a required component is down (chat configured
but its client not open, the sandbox's engine unreachable or its bridge unprotected) or the
server is draining. The rule: a probe never waits on an engine (the sandbox's cached look).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.web.rendering import json_response
from streamsvc.web.services import Services, services

__all__ = ["Liveness", "Readiness", "health", "live", "not_ready", "ready"]


class Liveness(msgspec.Struct):
    """GET /health/live: the process is up."""

    status: Literal["live"]


class Readiness(msgspec.Struct, omit_defaults=True):
    """GET /health/ready: 200 ``ready``, or 503 ``not_ready`` with the reasons."""

    status: Literal["ready", "not_ready"]
    reasons: list[str] | None = None


async def health(request: Request) -> Response:
    found = services(request)
    chat = {
        "state": "configured" if found.chat is not None else "not_configured",
        "deployment": found.settings.chat.deployment,
    }
    components: dict[str, Any] = {"chat": chat}
    if found.sandbox is not None:
        components["sandbox"] = await found.sandbox.health()
    if found.runs is not None and (report := await found.runs.store.health()) is not None:
        components["runs"] = report
    if found.queue is not None:
        components["queue"] = await found.queue.health()
    healthy = all(c["state"] in {"configured", "ready"} for c in components.values())
    return json_response({"status": "ok" if healthy else "degraded", "components": components})


async def live(request: Request) -> Response:
    """The process is up and its event loop answers."""
    return json_response(Liveness("live"))


async def not_ready(found: Services) -> list[str]:
    """Why this server should get no traffic now; empty when it is ready."""
    reasons: list[str] = []
    if found.streams.draining or found.streams.closing:
        reasons.append("draining: the server is shutting down")
    if found.settings.chat.configured and found.chat is None:
        reasons.append("chat: configured, but its upstream client is not open")
    if found.queue is not None:
        pass  # connector runs go to executors; none seen is /health's "degraded", not this
    elif found.sandbox is None:
        reasons.append("sandbox: not started")
    else:
        report = await found.sandbox.health()
        bridge = report.get("bridge") or {}
        if report.get("state") != "ready":
            reasons.append("sandbox: the Docker engine is unreachable")
        elif bridge.get("state") == "unprotected":
            reasons.append(f"sandbox: the bridge is unprotected ({bridge.get('reason', '')})")
    return reasons


async def ready(request: Request) -> Response:
    reasons = await not_ready(services(request))
    if reasons:
        return json_response(Readiness("not_ready", reasons), status_code=503)
    return json_response(Readiness("ready"))


def openapi_paths(ref: str) -> dict[str, Any]:
    """The probes' entries in /openapi.json (``ref``: the schema reference with ``{name}``)."""

    def answer(schema: str, description: str) -> dict[str, Any]:
        body = {"schema": {"$ref": ref.format(name=schema)}}
        return {"description": description, "content": {"application/json": body}}

    ready = answer("Readiness", "Ready; 503: not ready (draining, or a component down).")
    live = {"200": answer("Liveness", "Always, while it answers.")}
    return {
        "/health/live": {"get": {"summary": "Liveness", "responses": live}},
        "/health/ready": {
            "get": {"summary": "Readiness", "responses": {"200": ready, "503": ready}}
        },
    }
