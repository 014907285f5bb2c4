"""The client commands: ``streamsvc run``, ``chat``, ``init`` and ``runs``, for a terminal.

They use ``streamsvc.client`` (the one HTTP implementation) and ``streamsvc.authoring``; they
exit with the program's code (124 timeout, 2 refused, 1 failed or unreachable, 130 Ctrl-C,
which cancels a run). Over 400 lines: one printer serves every command. Docs: the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import msgspec

from streamsvc.authoring import AuthoringError, init
from streamsvc.client import (
    Attachment,
    ChatDone,
    Client,
    ClientError,
    Delta,
    Frame,
    Output,
    OutputFile,
    RequestRefused,
    RunDone,
    RunInfo,
    RunResult,
    Status,
    chat_body,
    chat_event,
    run_body,
    run_event,
)
from streamsvc.settings import SettingsError, load_client_settings, read_dotenv

COMMANDS = ("run", "chat", "init", "runs")


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
    run.add_argument(
        "--detach", action="store_true", help="start it in the background and print its id"
    )
    run.add_argument(
        "--save",
        type=Path,
        metavar="DIR",
        help="write the output files that came back inline into DIR",
    )
    chat = commands.add_parser("chat", help="stream a chat reply from a server")
    chat.add_argument("prompt", help="the user message ('-' reads stdin)")
    chat.add_argument("--system", help="a system message to send first")
    chat.add_argument("--model", help="the deployment to use instead of the server's default")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--max-tokens", type=int)
    records = commands.add_parser("runs", help="list, show, follow or cancel runs on a server")
    runs_commands = records.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    listing = runs_commands.add_parser("list", help="runs, newest first")
    listing.add_argument("--kind", choices=("connector", "chat"))
    listing.add_argument(
        "--status",
        choices=("queued", "running", "completed", "failed", "cancelled", "interrupted"),
    )
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    show = runs_commands.add_parser("show", help="a run's record as JSON")
    logs = runs_commands.add_parser("logs", help="a run's output so far (--follow: to its end)")
    logs.add_argument("--follow", "-f", action="store_true", help="then follow it live")
    cancel = runs_commands.add_parser("cancel", help="stop a run now")
    for command in (show, logs, cancel):
        command.add_argument("run_id", metavar="ID", help="the run's id (X-Run-ID, runs list)")
    for command in (run, chat, listing, show, logs, cancel):
        if command is not show:
            command.add_argument(
                "--json",
                action="store_true",
                help="print JSON only (the final object, or the list)",
            )
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
        client = Client(args.url or defaults.url, args.api_key or defaults.api_key or "")
        if args.command == "run":
            body = build_request(args.connector, _env_file(args.env_file), args.sets, args.network)
            if args.secrets:
                body["secrets"] = sorted({*body.get("secrets", ()), *args.secrets})
            if args.detach:
                return detach(client, body, args.json, out, err)
            return run_connector(client, body, args.json, out, err, args.save)
        if args.command == "runs":
            return runs(client, args, out, err)
        return chat(client, _chat_body(args), args.json, out, err)
    except (SettingsError, UsageError, AuthoringError) as exc:
        _line(err, f"streamsvc: {exc}")
        return 2
    except ClientError as exc:
        if getattr(args, "json", False) and exc.body is not None:
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


class _Printer:
    """Prints a run's frames as they come: output live, progress and the summary on stderr."""

    def __init__(
        self,
        kind: str,
        as_json: bool,
        out: TextIO,
        err: TextIO,
        save: Path | None = None,
        client: Client | None = None,
    ) -> None:
        self.kind, self.as_json, self.save, self.client = kind, as_json, save, client
        self.stdout, self.stderr = _Writer(out), _Writer(err)

    def resumed(self, at: Attachment, reason: str) -> None:
        self.stderr.line(
            f"[streamsvc] connection lost ({reason}); re-attaching to run {at.run_id}"
            f" after event {at.last_event_id}"
        )

    def frame(self, frame: Frame) -> int | None:
        """Print ``frame``; the exit status once it was the last one."""
        if self.kind == "chat":
            return self._chat(frame)
        event = run_event(frame)
        if isinstance(event, RunDone):
            if self.as_json:  # the server's own object: fields this client does not know stay
                self.stdout.write(frame.data + "\n")
            else:
                if not self.stdout.at_line_start:
                    self.stdout.write("\n")
                for line in _summary(event.result):
                    self.stderr.line(line)
            if self.save is not None:
                for line in save_files(event.result, self.save, self.client):
                    self.stderr.line(line)
            return _exit_status(event.result)
        if self.as_json:
            return None
        if isinstance(event, Status):
            self.stderr.line(f"[streamsvc] {event.phase.replace('_', ' ')}: {event.message}")
        elif isinstance(event, Output):
            (self.stdout if event.stream == "stdout" else self.stderr).write(event.text)
        return None

    def _chat(self, frame: Frame) -> int | None:
        event = chat_event(frame)
        if isinstance(event, ChatDone):
            if self.as_json:
                self.stdout.write(frame.data + "\n")
            elif not self.stdout.at_line_start:
                self.stdout.write("\n")
            return 0
        if isinstance(event, Delta) and not self.as_json:
            self.stdout.write(event.content)
        return None


def _stream(client: Client, path: str, body: dict[str, Any], printer: _Printer, err: TextIO) -> int:
    """Stream a new run to its end; Ctrl-C cancels it (the server would wait for a reader)."""
    at = Attachment(on_resume=printer.resumed)
    try:
        for frame in client.frames(path, body, at):
            if (status := printer.frame(frame)) is not None:
                return status
    except KeyboardInterrupt:
        if at.run_id is not None:
            try:
                client.cancel(at.run_id)
                _line(err, f"\nstreamsvc: cancelled run {at.run_id}")
            except ClientError as exc:
                _line(err, f"\nstreamsvc: could not cancel run {at.run_id}: {exc}")
        return 130
    raise ClientError("the stream ended without a result")


def run_connector(
    client: Client,
    body: dict[str, Any],
    as_json: bool,
    out: TextIO,
    err: TextIO,
    save: Path | None = None,
) -> int:
    printer = _Printer("connector", as_json, out, err, save, client)
    return _stream(client, "/execute-connector", body, printer, err)


def _shown(text: str) -> str:
    """``text`` for a terminal: as it is when printable, else quoted with its escapes."""
    return text if text.isprintable() else repr(text)


def _plain_parts(name: str) -> tuple[str, ...] | None:
    """The parts of a plain relative file name (no control character, ``..`` or root)."""
    path = PurePosixPath(name)
    if not name.isprintable() or path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path.parts


def save_files(result: RunResult, folder: Path, client: Client | None = None) -> list[str]:
    """Write the files under ``folder``: inline ones as they came, larger ones downloaded
    through ``client`` (their ``url``); a line for each one. The names come from the
    server: none is written outside ``folder``, through a link, or over a folder."""
    lines = []
    for file in result.files:
        parts = _plain_parts(file.name)
        try:
            content = file.content()
        except ValueError:
            content = None
        if parts is None:
            lines.append(f"[streamsvc] not saved: {file.name!r} is not a plain relative name")
        elif content is not None:
            lines.append(_save_one(folder, parts, content))
        elif file.url is not None and client is not None:
            lines.append(_download_one(client, folder, parts, file))
        else:
            why = file.error.message if file.error else "its content did not come inline"
            lines.append(f"[streamsvc] not saved: {_shown(file.name)}: {_shown(why)}")
    return lines


def _linked_parent(folder: Path, parts: tuple[str, ...]) -> str | None:
    for depth in range(1, len(parts)):
        if folder.joinpath(*parts[:depth]).is_symlink():
            return "/".join(parts[:depth])
    return None


def _download_one(client: Client, folder: Path, parts: tuple[str, ...], file: OutputFile) -> str:
    """A file past the inline cap, through the client (its ``url``, sha256 checked)."""
    name = "/".join(parts)
    if (link := _linked_parent(folder, parts)) is not None:
        return f"[streamsvc] not saved: {name}: {link} is a link"
    target = folder.joinpath(*parts)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download(file, target)
    except ClientError as exc:
        return f"[streamsvc] not saved: {name}: {_shown(str(exc))}"
    except OSError as exc:
        return f"[streamsvc] not saved: {name}: {exc.strerror or exc}"
    return f"[streamsvc] saved {target}"


def _save_one(folder: Path, parts: tuple[str, ...], content: bytes) -> str:
    name = "/".join(parts)
    if (link := _linked_parent(folder, parts)) is not None:
        return f"[streamsvc] not saved: {name}: {link} is a link"
    target = folder.joinpath(*parts)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(target, flags, 0o644), "wb") as written:
            written.write(content)
    except OSError as exc:  # a link (ELOOP), a folder of that name, no room, ...
        return f"[streamsvc] not saved: {name}: {exc.strerror or exc}"
    return f"[streamsvc] saved {target}"


def detach(client: Client, body: dict[str, Any], as_json: bool, out: TextIO, err: TextIO) -> int:
    """Start a background run and print its id (``--json``: the server's answer)."""
    accepted = client.start(body)
    if as_json:
        _line(out, json.dumps(msgspec.to_builtins(accepted)))
    else:
        _line(out, accepted.id)
        _line(err, f"[streamsvc] started; follow it: streamsvc runs logs {accepted.id} --follow")
    return 0


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
        lines.append(f"[streamsvc] file {_shown(file.name)} ({size})")
    return lines


def _exit_status(result: RunResult) -> int:
    code = result.exit_code
    if isinstance(code, int):
        return code if 0 <= code <= 255 else 1
    return 124 if result.timed_out else 1


def chat(client: Client, body: dict[str, Any], as_json: bool, out: TextIO, err: TextIO) -> int:
    return _stream(client, "/chat", body, _Printer("chat", as_json, out, err), err)


# ---------------------------------------------------------------- streamsvc runs


def runs(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``streamsvc runs list|show|logs|cancel``."""
    if args.runs_command == "list":
        page = client.list_runs(kind=args.kind, status=args.status, limit=args.limit)
        if args.json:
            _line(out, json.dumps(msgspec.to_builtins(page)))
            return 0
        _line(out, f"{'ID':34} {'KIND':9} {'STATUS':11} {'CREATED (UTC)':19} {'TOOK':>8}")
        for run in page.runs:
            _line(out, f"{run.id:34} {run.kind:9} {run.status:11} {_when(run)}")
        return 0
    if args.runs_command == "show":
        _line(out, json.dumps(msgspec.to_builtins(client.get_run(args.run_id)), indent=2))
        return 0
    if args.runs_command == "cancel":
        record = client.cancel(args.run_id)
        _line(out, f"{record.id}: {record.status}")
        return 0
    return logs(client, args.run_id, args.follow, args.json, out, err)


def _when(run: RunInfo) -> str:
    created = run.created_at
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(created)) if created else "?"
    took = ""
    if run.started_at and run.finished_at:
        took = f"{run.finished_at - run.started_at:.1f} s"
    return f"{when:19} {took:>8}"


def logs(client: Client, run_id: str, follow: bool, as_json: bool, out: TextIO, err: TextIO) -> int:
    """A run's output so far (``follow``: then live, to its end); Ctrl-C only stops reading."""
    record = client.get_run(run_id)
    printer = _Printer(record.kind, as_json, out, err)
    if not follow and record.last_event_id == 0:
        return 0
    at = Attachment(on_resume=printer.resumed)
    try:
        for frame in client.follow(run_id, 0, at):
            status = printer.frame(frame)
            if status is not None:
                return status
            if not follow and at.last_event_id >= record.last_event_id:
                return 0
    except KeyboardInterrupt:
        return 130
    raise ClientError("the stream ended without a result")
