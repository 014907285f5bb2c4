"""Serving the app with hypercorn, with graceful shutdown on SIGTERM/SIGINT.

On a signal, streams drain for half the grace period, then end with ``shutting_down``.
With ``listen_fd`` the process is one worker of several sharing the socket (``workers``).
"""

from __future__ import annotations

import gc
import importlib.util
import ipaddress
import logging
import signal
import socket

import anyio
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from streamsvc.settings import ServerSettings, Settings, SettingsError
from streamsvc.web.app import create_app
from streamsvc.web.services import installed

log = logging.getLogger("streamsvc")

#: ``gc.set_threshold`` while serving: fewer young collections than CPython's (700, 10, 10)
#: with hundreds of streams open (measured in docs/benchmarks.md, "Figures behind the code").
GC_THRESHOLDS = (10_000, 10, 10)

#: Bursts of hundreds of connections overflowed hypercorn's default backlog of 100.
BACKLOG = 2048


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: ServerSettings) -> None:
    """Refuse a non-loopback address without API keys, unless explicitly insecure."""
    host = settings.host
    if not _loopback(host) and not settings.api_keys and not settings.allow_insecure:
        raise SettingsError(
            f"invalid setting STREAMSVC_HOST: refusing to listen on {host} without "
            "STREAMSVC_API_KEYS (set STREAMSVC_ALLOW_INSECURE=true to override)"
        )


def listen_socket(settings: ServerSettings) -> socket.socket:
    """The listening socket, as hypercorn would open it; a taken address is a message."""
    address = (settings.host, settings.port)
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    dualstack = family == socket.AF_INET6 and socket.has_dualstack_ipv6()
    try:
        sock = socket.create_server(
            address, family=family, backlog=BACKLOG, dualstack_ipv6=dualstack
        )
    except OSError as exc:
        raise SettingsError(
            f"cannot listen on {address[0]}:{address[1]} (STREAMSVC_HOST, STREAMSVC_PORT): "
            f"{exc.strerror or exc}"
        ) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    return sock


def check_bindable(settings: ServerSettings) -> None:
    """Fail start-up with a message, not a traceback, when the address is taken."""
    listen_socket(settings).close()


def hypercorn_config(settings: ServerSettings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # hypercorn holds a connection the client closed until this timer ends, so a long
    # idle timeout piles up CLOSE_WAIT sockets under load (scripts/load-test saw 222).
    config.keep_alive_timeout = 5
    config.backlog = BACKLOG
    return config


def backend_options() -> dict[str, bool]:
    """anyio's options for ``anyio.run(serve, ...)``: uvloop when it is installed."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


async def serve(
    settings: Settings, listen_fd: int | None = None, metrics_dir: str | None = None
) -> None:
    config = hypercorn_config(settings.server)
    if listen_fd is None:
        check_exposure(settings.server)
        check_bindable(settings.server)
    else:
        config.bind = [f"fd://{listen_fd}"]
    if settings.runs.store.startswith(("redis://", "rediss://")):
        from streamsvc.runs.redis import check_url

        await check_url(settings.runs.store)  # a SettingsError before listening, not a trace
    app = create_app(settings, metrics_dir=metrics_dir)
    # What imports and the app built so far lives as long as the process: freeze it out
    # of the cyclic collector, whose full collections otherwise walk it all again (pauses
    # under hundreds of open streams; docs/benchmarks.md, "Figures behind the code"). And
    # collect the young generation less often than CPython's every 700 allocations:
    # each collection walks every young object of hundreds of open streams.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    stop = anyio.Event()
    grace = settings.server.shutdown_grace_seconds

    async def drain_then_interrupt() -> None:
        streams = installed(app).streams
        with anyio.move_on_after(grace / 2):
            await streams.drained()
        streams.close_all()

    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    installed(app).streams.draining = True
                    stop.set()
                    tg.start_soon(drain_then_interrupt)
                    return

        tg.start_soon(watch_signals)
        if listen_fd is None:
            log.info("streamsvc listening on http://%s", config.bind[0])
            if not _loopback(settings.server.host) and not settings.server.allowed_hosts:
                log.warning(
                    "a Host header other than a loopback name or address (or a specific "
                    "STREAMSVC_HOST) gets 421 host_not_allowed: set STREAMSVC_ALLOWED_HOSTS "
                    "to the names and addresses clients use"
                )
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        tg.cancel_scope.cancel()
