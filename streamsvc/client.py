"""The command-line client: ``streamsvc run`` and ``streamsvc chat`` against a server.

It streams the server's events to stdout/stderr and exits with the program's code (124 on
timeout, 2 refused, 1 failed or unreachable, 130 interrupted). The rule: it only speaks HTTP.
Options and exit codes in full: the README and docs/architecture.md ("Module notes").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
import msgspec

from streamsvc.settings import SettingsError, load_client_settings, read_dotenv

COMMANDS = ("run", "chat")
CONNECT_TIMEOUT = 10.0
#: Between two bytes of a stream; the server sends keep-alives far more often.
READ_TIMEOUT = 120.0


class ClientError(Exception):
    """A failure to report on stderr, with the exit status to leave with."""

    def __init__(self, message: str, status: int = 1, body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Frame(msgspec.Struct, frozen=True):
    """One Server-Sent Event as read off the wire (``data`` still JSON text)."""

    event: str
    data: str
    id: str | None = None


# ---------------------------------------------------------------- arguments


def add_commands(commands: Any) -> None:
    """Add ``run`` and ``chat`` to the ``streamsvc`` sub-command parsers."""
    run = commands.add_parser("run", help="run a connector on a server, streaming its output")
    run.add_argument("connector", type=Path, help="connector JSON, or a whole request body")
    run.add_argument("--env-file", type=Path, help="KEY=VALUE lines added to env")
    run.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="configuration override (dotted key; JSON value, else a string)",
    )
    run.add_argument("--network", choices=("none", "bridge"), help="network_mode of the run")
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


def main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the ``run`` or ``chat`` command parsed into ``args``."""
    try:
        defaults = load_client_settings()
        api = Api(args.url or defaults.streamsvc_url, args.api_key or defaults.streamsvc_api_key)
        if args.command == "run":
            body = build_request(
                _load_json(args.connector), _env_file(args.env_file), args.sets, args.network
            )
            return run_connector(api, body, args.json, out, err)
        return chat(api, _chat_body(args), args.json, out, err)
    except SettingsError as exc:
        print(f"streamsvc: {exc}", file=err)
        return 2
    except ClientError as exc:
        if args.json and exc.body is not None:
            print(exc.body, file=out)
        _line(err, f"streamsvc: {exc}")
        return exc.status


# ---------------------------------------------------------------- requests


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}", 2) from None
    except ValueError as exc:
        raise ClientError(f"{path} is not JSON: {exc}", 2) from None


def _env_file(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    if not path.is_file():
        raise ClientError(f"cannot read {path}: no such file", 2)
    return read_dotenv(path)


def parse_set(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` as (``["a", "b"]``, value): JSON when it parses, else the text."""
    key, sep, text = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ClientError(f"--set {item!r}: expected KEY=VALUE (KEY may be dotted: a.b)", 2)
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return keys, value


def build_request(
    document: Any, env: dict[str, str], sets: list[str], network: str | None
) -> dict[str, Any]:
    """The /execute-connector body from a file and the command-line options."""
    if not isinstance(document, dict):
        raise ClientError("the connector file must hold a JSON object", 2)
    whole = isinstance(document.get("connector"), dict)
    body = dict(document) if whole else {"connector": document}
    body["env"] = {**body.get("env", {}), **env}
    overrides = body.setdefault("configuration_overrides", {})
    for item in sets:
        keys, value = parse_set(item)
        target = overrides
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[keys[-1]] = value
    if network is not None:
        body["network_mode"] = network
    body["stream"] = True
    return body


def _chat_body(args: argparse.Namespace) -> dict[str, Any]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [{"role": "user", "content": prompt}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    body: dict[str, Any] = {"messages": messages, "stream": True}
    for name in ("model", "temperature", "max_tokens"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    return body


# ---------------------------------------------------------------- the wire


def parse_sse(lines: Iterator[str]) -> Iterator[Frame]:
    """Frames from SSE lines; comments (keep-alives) and unnamed fields are skipped."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield Frame(fields.get("event", "message"), "\n".join(data), fields.get("id"))
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
    if data:
        yield Frame(fields.get("event", "message"), "\n".join(data), fields.get("id"))


class Api:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[Frame]:
        """POST ``body`` and yield the answer's frames; a refusal is a ``ClientError``."""
        try:
            with (
                httpx.Client(timeout=self.timeout) as http,
                http.stream("POST", self.url + path, json=body, headers=self.headers) as response,
            ):
                if response.status_code != 200:
                    raise _refusal(response.status_code, response.read().decode(errors="replace"))
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise ClientError(f"{path} did not answer with a stream")
                yield from parse_sse(response.iter_lines())
        except httpx.TimeoutException:
            raise ClientError(f"{self.url} stopped answering (no data for a while)") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.url}: {exc}") from None


def _refusal(status: int, text: str) -> ClientError:
    try:
        error = json.loads(text)["error"]
        message = f"{status} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return ClientError(f"the server answered {status}: {text[:200]}", 1)
    problems = (error.get("details") or {}).get("problems") if error.get("details") else None
    if isinstance(problems, list):
        message += "".join(
            f"\n  - {p.get('path')}: {p.get('message')} ({p.get('code')})"
            for p in problems
            if isinstance(p, dict)
        )
    elif error.get("path"):
        message += f" (at {error['path']})"
    return ClientError(message, 2 if 400 <= status < 500 else 1, body=text)


def _stream_error(frame: Frame) -> ClientError:
    try:
        error = json.loads(frame.data)["error"]
        message = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        message = frame.data
    return ClientError(f"the stream failed: {message}", 1, body=frame.data)


# ---------------------------------------------------------------- commands


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


def run_connector(api: Api, body: dict[str, Any], as_json: bool, out: TextIO, err: TextIO) -> int:
    stdout, stderr = _Writer(out), _Writer(err)
    for frame in api.stream("/execute-connector", body):
        if frame.event == "error":
            raise _stream_error(frame)
        data = json.loads(frame.data)
        if frame.event == "done":
            if as_json:
                stdout.write(frame.data + "\n")
            else:
                if not stdout.at_line_start:
                    stdout.write("\n")
                stderr.line(_summary(data))
            return _exit_status(data)
        if as_json:
            continue
        if frame.event == "status":
            stderr.line(f"[streamsvc] {data['phase'].replace('_', ' ')}: {data.get('message', '')}")
        elif frame.event == "stdout":
            stdout.write(data["text"])
        elif frame.event == "stderr":
            stderr.write(data["text"])
    raise ClientError("the stream ended without a result")


def _summary(result: dict[str, Any]) -> str:
    took = f"{result.get('duration_ms', 0) / 1000:.1f} s"
    if result.get("ok"):
        return f"[streamsvc] ok in {took}, exit code {result.get('exit_code')}"
    error = result.get("error") or {}
    return f"[streamsvc] failed in {took}: {error.get('code')}: {error.get('message')}"


def _exit_status(result: dict[str, Any]) -> int:
    code = result.get("exit_code")
    if isinstance(code, int):
        return code if 0 <= code <= 255 else 1
    return 124 if result.get("timed_out") else 1


def chat(api: Api, body: dict[str, Any], as_json: bool, out: TextIO, err: TextIO) -> int:
    stdout = _Writer(out)
    for frame in api.stream("/chat", body):
        if frame.event == "error":
            raise _stream_error(frame)
        if frame.event == "done":
            if as_json:
                stdout.write(frame.data + "\n")
            elif not stdout.at_line_start:
                stdout.write("\n")
            return 0
        if frame.event == "delta" and not as_json:
            stdout.write(json.loads(frame.data)["content"])
    raise ClientError("the stream ended without a result")
