"""The ``streamsvc`` command (also ``python -m streamsvc``): serve, run, chat, deps.

``serve`` starts the server (the default), or ``STREAMSVC_WORKERS`` processes on one port;
``run`` and ``chat`` are clients of a running server; ``deps list|clear`` shows or empties
the dependency cache on the Docker engine directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

import anyio

from streamsvc import commands as client
from streamsvc.settings import (
    ENV_FILE_VARIABLE,
    SandboxSettings,
    Settings,
    SettingsError,
    load_settings,
)
from streamsvc.web.observability import configure_logging

DESCRIPTION = """\
streamsvc: chat completions and connector runs, streamed.

  streamsvc serve               start the server (the default without a command)
  streamsvc init my-connector   create a connector folder that runs as is
  streamsvc run my-connector    run it on a server, output live
  streamsvc chat "Hello"        stream a chat reply
  streamsvc deps list|clear     the dependency cache on the Docker engine
  streamsvc executor            run queued connector runs (Redis store; README, Scaling out)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsvc",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each command has its own --help. Settings: .env (README, Settings).",
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    serve = commands.add_parser("serve", help="start the HTTP server")
    executor = commands.add_parser(
        "executor", help="run queued connector runs on this Docker engine (Redis store)"
    )
    executor.add_argument(
        "--env-file", dest="settings_file", metavar="FILE", help="the .env file to read, or none"
    )
    for target in (parser, serve):
        target.add_argument("--host", help="address to listen on (overrides STREAMSVC_HOST)")
        target.add_argument("--port", type=int, help="port (overrides STREAMSVC_PORT)")
        target.add_argument(
            "--env-file",
            dest="settings_file",
            metavar="FILE",
            help="the .env file to read settings from, or none (default: the project's "
            "and the working directory's .env)",
        )
        # Internal: a worker serving its parent's socket (streamsvc.serving.workers).
        target.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
        # Internal: the workers' shared metrics directory (streamsvc.web.multiproc).
        target.add_argument("--metrics-dir", help=argparse.SUPPRESS)
    client.add_commands(commands)
    deps = commands.add_parser("deps", help="list or clear the dependency cache (on the engine)")
    deps_commands = deps.add_subparsers(dest="deps_command", required=True)
    listing = deps_commands.add_parser("list", help="every cached dependency set")
    listing.add_argument("--json", action="store_true", help="print JSON")
    clearing = deps_commands.add_parser("clear", help="remove the sets no container uses")
    clearing.add_argument(
        "--all", action="store_true", help="every image's sets, not only this one's"
    )
    return parser


def _with_overrides(settings: Settings, host: str | None, port: int | None) -> Settings:
    import msgspec

    changes: dict[str, object] = {}
    if host:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    if not changes:
        return settings
    return msgspec.structs.replace(
        settings, server=msgspec.structs.replace(settings.server, **changes)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "deps":
        return _deps(args)
    if args.command == "executor":
        return _executor(args)
    if args.command in client.COMMANDS:
        try:
            return client.main(args)
        except KeyboardInterrupt:
            return 130
    try:
        if args.settings_file:
            # Workers are started with this environment, so they read the same file.
            os.environ[ENV_FILE_VARIABLE] = args.settings_file
        settings = _with_overrides(load_settings(), args.host, args.port)
        configure_logging(settings.server)
        if settings.server.workers > 1 and args.listen_fd is None:
            from streamsvc.serving.workers import supervise

            return supervise(settings.server)
        from streamsvc.serving.server import backend_options, serve

        anyio.run(
            serve, settings, args.listen_fd, args.metrics_dir, backend_options=backend_options()
        )
    except SettingsError as exc:
        print(f"streamsvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _executor(args: argparse.Namespace) -> int:
    """``streamsvc executor``: until SIGTERM; a bad setting is one line naming it (exit 2)."""
    from streamsvc.runs.executor import serve_executor

    try:
        if args.settings_file:
            os.environ[ENV_FILE_VARIABLE] = args.settings_file
        settings = load_settings()
        configure_logging(settings.server)
        anyio.run(serve_executor, settings)
    except SettingsError as exc:
        print(f"streamsvc executor: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _deps(args: argparse.Namespace) -> int:
    """``streamsvc deps list|clear``: the Docker engine's cache, with the server's settings."""
    from streamsvc.errors import SandboxError

    try:
        return anyio.run(_deps_command, args, load_settings().sandbox)
    except SettingsError as exc:
        print(f"streamsvc: {exc}", file=sys.stderr)
        return 2
    except SandboxError as exc:
        print(f"streamsvc: {exc}", file=sys.stderr)
        return 1


async def _deps_command(
    args: argparse.Namespace, settings: SandboxSettings, out: TextIO = sys.stdout
) -> int:
    """List or clear the sets as the engine holds them (``clear``: those no container uses)."""
    import msgspec

    from streamsvc.sandbox.docker.api import connect
    from streamsvc.sandbox.docker.deps_inventory import clear, entries

    docker = connect(settings.docker_host)
    try:
        if args.deps_command == "clear":
            removed, kept = await clear(docker, settings, every_image=args.all)
            for name in removed:
                print(f"removed {name}", file=out)
            for name in kept:
                print(f"kept {name} (in use)", file=out)
            print(f"{len(removed)} removed, {len(kept)} in use", file=out)
            return 0
        found = await entries(docker, settings)
        if args.json:
            print(msgspec.json.encode(found).decode(), file=out)
            return 0
        print(f"{'VOLUME':36} {'PYTHON':8} {'SIZE':>9} {'USED BY':>7}  REQUIREMENTS", file=out)
        for entry in found:
            size = f"{entry.size_kb / 1024:.1f} MiB" if entry.size_kb is not None else "?"
            stale = "" if entry.current else "  (another image)"
            print(
                f"{entry.volume:36} {entry.python or '?':8} {size:>9} "
                f"{entry.containers if entry.containers is not None else '?':>7}  "
                f"{' '.join(entry.requirements)}{stale}",
                file=out,
            )
        return 0
    finally:
        await docker.close()
