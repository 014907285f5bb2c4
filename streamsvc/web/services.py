"""The app's services: one typed object on ``app.state``, completed by the lifespan.

``Services`` holds the settings, stream registry, metrics, body budget, chat, sandbox, runs.
The rule: routes reach it only through ``services(request)``, never untyped ``app.state``.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request

from streamsvc.chat.types import ChatProvider
from streamsvc.runs.manager import RunManager
from streamsvc.runs.queue import RunQueue
from streamsvc.sandbox.types import Sandbox
from streamsvc.settings import Settings
from streamsvc.web.budget import BodyBudget
from streamsvc.web.observability import Metrics
from streamsvc.web.sse import StreamRegistry

__all__ = ["Services", "install", "installed", "services"]


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a route needs; ``chat``/``sandbox`` are None when not available."""

    settings: Settings
    streams: StreamRegistry
    metrics: Metrics
    #: The request-body bytes this worker holds while they arrive (``web.bodies``).
    bodies: BodyBudget
    chat: ChatProvider | None = None
    sandbox: Sandbox | None = None
    #: The run lifecycle (``runs.manager``); every POST /chat and /execute-connector is a run.
    runs: RunManager | None = None
    #: With the Redis store: the connector runs' queue (executors run them, not this process).
    queue: RunQueue | None = None


def install(app: Starlette, found: Services) -> None:
    app.state.services = found


def installed(app: Starlette) -> Services:
    """The app's services (``create_app`` installs them without I/O clients first)."""
    found = getattr(app.state, "services", None)
    if not isinstance(found, Services):
        raise RuntimeError("the app has no services: it was not built by create_app")
    return found


def services(request: Request) -> Services:
    """The services of the app serving this request."""
    return installed(request.app)
