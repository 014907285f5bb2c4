"""The client commands: ``streamsvc run``, ``chat`` and ``init``, printed for a terminal.

They use ``streamsvc.client`` (the one HTTP implementation) and ``streamsvc.authoring``; they
exit with the program's code (124 on timeout, 2 refused, 1 failed or unreachable, 130
interrupted). Options and exit codes in full: the README and docs/architecture.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from streamsvc.authoring import AuthoringError, init
from streamsvc.client import (
    ChatDone,
    Client,
    ClientError,
    Delta,
    Output,
    RequestRefused,
    RunDone,
    RunResult,
    Status,
    chat_body,
    chat_event,
    run_body,
    run_event,
)
from streamsvc.settings import SettingsError, load_client_settings, read_dotenv

COMMANDS = ("run", "chat", "init")


class UsageError(Exception):
    """Unusable input on the command line (exit status 2)."""


# ---------------------------------------------------------------- arguments


def add_commands(commands: Any) -> None:
    """Add ``run``, ``chat`` and ``init`` to the ``streamsvc`` sub-command parsers."""
    run = commands.add_parser(
        "run",
        help="run a connector on a server, streaming its output",
        description="Run a connector on a server: a connector folder, a connector JSON file "
        "or a whole request body. Prints stdout and stderr live and exits with the program's "
        "exit code.",
    )
    run.add_argument(
        "connector", type=Path, help="a connector folder, connector JSON, or a request body"
    )
    run.add_argument("--env-file", type=Path, help="KEY=VALUE lines added to the run's env")
    run.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="configuration override (dotted key; JSON value, else a string)",
    )
    run.add_argument("--network", choices=("none", "bridge"), help="network_mode of the run")
    run.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        metavar="NAME",
        help="an env name whose value is redacted from the output (repeatable)",
    )
    chat = commands.add_parser("chat", help="stream a chat reply from a server")
    chat.add_argument("prompt", help="the user message ('-' reads stdin)")
    chat.add_argument("--system", help="a system message to send first")
    chat.add_argument("--model", help="the deployment to use instead of the server's default")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--max-tokens", type=int)
    for command in (run, chat):
        command.add_argument("--json", action="store_true", help="print the final object only")
        command.add_argument("--url", help="server URL (default: STREAMSVC_URL)")
        command.add_argument("--api-key", help="API key (default: STREAMSVC_API_KEY)")
    scaffold = commands.add_parser(
        "init",
        help="create a connector folder that runs as is",
        description="Create NAME/ with connector.json, main.py and requirements.txt; "
        "then: streamsvc run NAME",
    )
    scaffold.add_argument("name", type=Path, help="the folder to create")


def main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the ``run``, ``chat`` or ``init`` command parsed into ``args``."""
    if args.command == "init":
        return _init(args.name, out, err)
    try:
        defaults = load_client_settings()
        client = Client(
            args.url or defaults.streamsvc_url, args.api_key or defaults.streamsvc_api_key
        )
        if args.command == "run":
            body = build_request(args.connector, _env_file(args.env_file), args.sets, args.network)
            if args.secrets:
                body["secrets"] = sorted({*body.get("secrets", ()), *args.secrets})
            return run_connector(client, body, args.json, out, err)
        return chat(client, _chat_body(args), args.json, out, err)
    except (SettingsError, UsageError, AuthoringError) as exc:
        _line(err, f"streamsvc: {exc}")
        return 2
    except ClientError as exc:
        if args.json and exc.body is not None:
            print(exc.body, file=out)
        _line(err, f"streamsvc: {exc}")
        return 2 if isinstance(exc, RequestRefused) else 1


def _init(folder: Path, out: TextIO, err: TextIO) -> int:
    try:
        written = init(folder)
    except (AuthoringError, OSError) as exc:
        _line(err, f"streamsvc: {exc}")
        return 2
    for path in written:
        _line(out, f"created {path}")
    _line(out, f"next: streamsvc run {folder}")
    return 0


# ---------------------------------------------------------------- requests


def _env_file(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    if not path.is_file():
        raise UsageError(f"cannot read {path}: no such file")
    return read_dotenv(path)


def parse_set(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` as (``["a", "b"]``, value): JSON when it parses, else the text."""
    key, sep, text = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise UsageError(f"--set {item!r}: expected KEY=VALUE (KEY may be dotted: a.b)")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return keys, value


def overrides(sets: list[str]) -> dict[str, Any]:
    """The ``configuration_overrides`` that ``--set`` options spell."""
    found: dict[str, Any] = {}
    for item in sets:
        keys, value = parse_set(item)
        target = found
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[keys[-1]] = value
    return found


def build_request(
    source: Path | dict[str, Any], env: dict[str, str], sets: list[str], network: str | None
) -> dict[str, Any]:
    """The /execute-connector body from a folder or file and the command-line options."""
    if isinstance(source, dict) and not source:
        raise UsageError("the connector must be a non-empty JSON object")
    return run_body(
        source,
        env=env,
        configuration_overrides=overrides(sets),
        network_mode=network,  # type: ignore[arg-type]
    )


def _chat_body(args: argparse.Namespace) -> dict[str, Any]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return chat_body(
        prompt,
        system=args.system,
        model=args.model,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )


# ---------------------------------------------------------------- printing


class _Writer:
    """Writes to a stream, remembering whether the last text ended a line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()
            self.at_line_start = text.endswith("\n")

    def line(self, text: str) -> None:
        self.write(("" if self.at_line_start else "\n") + text + "\n")


def _line(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def run_connector(
    client: Client, body: dict[str, Any], as_json: bool, out: TextIO, err: TextIO
) -> int:
    stdout, stderr = _Writer(out), _Writer(err)
    for frame in client.frames("/execute-connector", body):
        event = run_event(frame)
        if isinstance(event, RunDone):
            if as_json:  # the server's own object: fields this client does not know stay in it
                stdout.write(frame.data + "\n")
            else:
                if not stdout.at_line_start:
                    stdout.write("\n")
                for line in _summary(event.result):
                    stderr.line(line)
            return _exit_status(event.result)
        if as_json:
            continue
        if isinstance(event, Status):
            stderr.line(f"[streamsvc] {event.phase.replace('_', ' ')}: {event.message}")
        elif isinstance(event, Output):
            (stdout if event.stream == "stdout" else stderr).write(event.text)
    raise ClientError("the stream ended without a result")


def _summary(result: RunResult) -> list[str]:
    took = f"{result.duration_ms / 1000:.1f} s"
    usage = result.usage
    if usage is not None and usage.cpu_ms is not None:
        took += f", cpu {usage.cpu_ms / 1000:.2f} s"
    if usage is not None and usage.memory_peak_mb is not None:
        took += f", memory peak {usage.memory_peak_mb:.0f} MiB"
    if result.ok:
        lines = [f"[streamsvc] ok in {took}, exit code {result.exit_code}"]
    else:
        error = result.error
        what = f"{error.code}: {error.message}" if error else "failed"
        lines = [f"[streamsvc] failed in {took}: {what}"]
    for file in result.files:
        size = f"{file.size} bytes" if file.size is not None else "size unknown"
        lines.append(f"[streamsvc] file {file.name} ({size})")
    return lines


def _exit_status(result: RunResult) -> int:
    code = result.exit_code
    if isinstance(code, int):
        return code if 0 <= code <= 255 else 1
    return 124 if result.timed_out else 1


def chat(client: Client, body: dict[str, Any], as_json: bool, out: TextIO, err: TextIO) -> int:
    stdout = _Writer(out)
    for frame in client.frames("/chat", body):
        event = chat_event(frame)
        if isinstance(event, ChatDone):
            if as_json:
                stdout.write(frame.data + "\n")
            elif not stdout.at_line_start:
                stdout.write("\n")
            return 0
        if isinstance(event, Delta) and not as_json:
            stdout.write(event.content)
    raise ClientError("the stream ended without a result")
