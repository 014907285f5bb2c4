"""streamsvc's Python client: run connectors and chat on a server, sync (``Client``) or async.

Both share the bodies, the SSE parsing and the typed events and results (msgspec structs that
ignore unknown fields); the ``streamsvc`` command uses it. The rule: it only speaks HTTP.
Over 400 lines: the two clients side by side stay alike. Usage: README ("Python client").
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeAlias

import anyio
import httpx
import msgspec

from streamsvc.authoring import load_request
from streamsvc.settings import load_client_settings

__all__ = [
    "Accepted",
    "AsyncClient",
    "Attachment",
    "ChatDone",
    "ChatResult",
    "Client",
    "ClientError",
    "Delta",
    "ErrorInfo",
    "Frame",
    "Output",
    "OutputFile",
    "RequestRefused",
    "RunDone",
    "RunInfo",
    "RunPage",
    "RunResult",
    "Status",
    "StreamFailed",
    "Unreachable",
    "Usage",
    "parse_sse",
]

CONNECT_TIMEOUT = 10.0
#: Between two bytes of a stream; the server sends keep-alives far more often.
READ_TIMEOUT = 120.0
#: A dropped stream is re-attached this many times in a row at most, waiting this long before
#: each try; together well inside the server's grace for a run without a reader.
RESUME_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 2.0, 4.0, 4.0)
TERMINAL = frozenset({"done", "error"})
#: Codes of a stream's ``error`` event without an id (not the run's end) or of a re-attachment's
#: 503 after which the run goes on (the server's Redis went away): re-attached as a drop.
PASSING = frozenset({"run_store_unavailable"})
#: Most bytes one event (a line, or the lines of one event) may take; a server sending more is
#: cut off with ``StreamFailed`` (a final object with its inline files is far smaller).
MAX_EVENT_BYTES = 64 * 1024 * 1024
#: Most bytes of a refusal's body kept (the rest is not read).
MAX_ERROR_BYTES = 1024 * 1024


# ---------------------------------------------------------------- types


class ErrorInfo(msgspec.Struct):
    """The ``error`` object of a refusal, of a stream's ``error`` event or of a result."""

    code: str
    message: str = ""
    path: str | None = None
    details: Any = None


class Usage(msgspec.Struct):
    """What a run used (``cpu_ms``, ``memory_peak_mb``, ``wall_ms``); absent figures are None."""

    cpu_ms: float | None = None
    memory_peak_mb: float | None = None
    wall_ms: float | None = None


class OutputFile(msgspec.Struct):
    """A file the program wrote to the output directory (``content_base64`` when inline)."""

    name: str = ""
    size: int | None = None
    sha256: str | None = None
    media_type: str | None = None
    content_base64: str | None = None
    #: Why the content is neither inline nor downloadable (too large, ...).
    error: ErrorInfo | None = None
    #: Past the inline cap: where the run keeps it (``Client.download``).
    url: str | None = None

    def content(self) -> bytes | None:
        """The file's bytes when they came inline, else None."""
        if self.content_base64 is None:
            return None
        return base64.b64decode(self.content_base64)


class RunResult(msgspec.Struct):
    """The final object of ``POST /execute-connector`` (README, "The answer")."""

    ok: bool
    result: Any = None
    error: ErrorInfo | None = None
    exit_code: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    duration_ms: int = 0
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    output_limit_exceeded: bool = False
    pids_limited: bool = False
    run_id: str | None = None
    #: The process that ran it (``host:pid``; with Redis, an executor).
    executor: str | None = None
    redacted: bool | None = None
    files: list[OutputFile] = []
    #: Files left out of ``files`` by the count cap.
    files_omitted: int = 0
    usage: Usage | None = None


class ChatUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatResult(msgspec.Struct):
    """The final object of ``POST /chat``."""

    content: str
    id: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: ChatUsage | None = None
    run_id: str | None = None


class Status(msgspec.Struct):
    """A run's progress: ``phase`` (validated, queued, installing_dependencies, ...)."""

    phase: str
    message: str = ""
    position: int | None = None
    id: int | None = None


class Output(msgspec.Struct):
    """Text the program wrote to ``stream`` (stdout or stderr), in the order written."""

    stream: Literal["stdout", "stderr"]
    text: str
    id: int | None = None


class RunDone(msgspec.Struct):
    result: RunResult
    id: int | None = None


class Delta(msgspec.Struct):
    """A piece of a chat reply."""

    content: str
    id: int | None = None


class ChatDone(msgspec.Struct):
    result: ChatResult
    id: int | None = None


RunEvent: TypeAlias = Status | Output | RunDone
ChatEvent: TypeAlias = Delta | ChatDone


class Accepted(msgspec.Struct):
    """The answer to a background run (``"background": true``): follow it at ``url``."""

    id: str
    status: str = "queued"
    url: str = ""
    events_url: str = ""


class RunInfo(msgspec.Struct):
    """A run's record (``GET /runs/{id}``; in a listing without ``result`` and ``executor``)."""

    id: str
    kind: str = "connector"
    status: str = "queued"
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_event_id: int = 0
    result: Any = None
    error: Any = None
    url: str | None = None
    events_url: str | None = None
    #: The process running (or that ran) it, ``host:pid``; None while queued.
    executor: str | None = None


class RunPage(msgspec.Struct):
    """One page of ``GET /runs``, newest first; ``next`` is the next page's URL, or None."""

    runs: list[RunInfo]
    next: str | None = None


class Attachment:
    """Where a stream stands: its run (``X-Run-ID``) and the last event id received.

    ``on_resume(attachment, reason)`` is called before each re-attachment after a drop."""

    def __init__(self, on_resume: Callable[[Attachment, str], object] | None = None) -> None:
        self.run_id: str | None = None
        self.last_event_id = 0
        self.resumed = 0
        self.on_resume = on_resume

    def seen(self, frame: Frame) -> bool:
        """Whether ``frame`` was received before (a replay overlapping what came)."""
        event_id = _event_id(frame)
        if event_id is None:
            return False
        if event_id <= self.last_event_id:
            return True
        self.last_event_id = event_id
        return False


class Frame(msgspec.Struct, frozen=True):
    """One Server-Sent Event as read off the wire (``data`` still JSON text)."""

    event: str
    data: str
    id: str | None = None


# ---------------------------------------------------------------- errors


class ClientError(Exception):
    """Any failure of a call; ``error`` and ``body`` hold the server's answer when there is one."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error: ErrorInfo | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error = error
        self.body = body


class RequestRefused(ClientError):
    """The server refused the request (4xx): bad input, no key, busy (429)."""


class StreamFailed(ClientError):
    """The server failed (5xx), or a started stream ended with an ``error`` event."""


class Unreachable(ClientError):
    """No answer: connection refused, or no data within the read timeout."""


def _error_info(text: str) -> ErrorInfo | None:
    try:
        return msgspec.convert(json.loads(text)["error"], ErrorInfo)
    except (ValueError, KeyError, TypeError, msgspec.ValidationError):
        return None


def _error_text(response: httpx.Response) -> str:
    """A refusal's body, its first ``MAX_ERROR_BYTES`` at most."""
    body = b""
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BYTES:
            break
    return body[:MAX_ERROR_BYTES].decode(errors="replace")


async def _aerror_text(response: httpx.Response) -> str:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BYTES:
            break
    return body[:MAX_ERROR_BYTES].decode(errors="replace")


def refusal(status: int, text: str) -> ClientError:
    """The error for an answer with a status other than 200."""
    kind = RequestRefused if 400 <= status < 500 else StreamFailed
    error = _error_info(text)
    if error is None:
        return kind(f"the server answered {status}: {text[:200]}", http_status=status, body=text)
    message = f"{status} {error.code}: {error.message}"
    problems = error.details.get("problems") if isinstance(error.details, dict) else None
    if isinstance(problems, list):
        message += "".join(
            f"\n  - {p.get('path')}: {p.get('message')} ({p.get('code')})"
            for p in problems
            if isinstance(p, dict)
        )
    elif error.path:
        message += f" (at {error.path})"
    return kind(message, http_status=status, error=error, body=text)


class _Passing(Exception):
    """A stream cut by a passing failure of the server (``PASSING``): re-attach."""


def _passing(frame: Frame) -> str | None:
    """Why the stream was cut when ``frame`` is a passing failure's event (not the run's end)."""
    if frame.event != "error" or _event_id(frame) is not None:
        return None
    error = _error_info(frame.data)
    return f"{error.code}: {error.message}" if error and error.code in PASSING else None


def _refused_events(status: int, text: str) -> Exception:
    """A re-attachment's refusal; a passing one (503 ``PASSING``) is tried again."""
    exc = refusal(status, text)
    if status == 503 and exc.error is not None and exc.error.code in PASSING:
        return _Passing(str(exc))
    return exc


def _stream_error(frame: Frame) -> StreamFailed:
    error = _error_info(frame.data)
    what = f"{error.code}: {error.message}" if error else frame.data
    return StreamFailed(f"the stream failed: {what}", error=error, body=frame.data)


# ---------------------------------------------------------------- the wire


def parse_sse(lines: Iterable[str]) -> Iterator[Frame]:
    """Frames from SSE lines; comments (keep-alives) and unnamed fields are skipped."""
    parser = _SseParser()
    for line in lines:
        frame = parser.feed(line)
        if frame is not None:
            yield frame
    # An event not ended by a blank line when the stream ends is discarded (the SSE rule): a
    # connection cut mid-event must not pass half of one on.


def _parse(response: httpx.Response) -> Iterator[Frame]:
    lines = _Lines()
    return parse_sse(line for chunk in response.iter_bytes() for line in lines.feed(chunk))


async def _aparse(response: httpx.Response) -> AsyncIterator[Frame]:
    parser, lines = _SseParser(), _Lines()
    async for chunk in response.aiter_bytes():
        for line in lines.feed(chunk):
            if (frame := parser.feed(line)) is not None:
                yield frame


class _Lines:
    """Bytes to lines (``\\r\\n``, ``\\n`` or ``\\r``), a line at most ``MAX_EVENT_BYTES``:
    httpx's own line reader holds a line of any length."""

    def __init__(self) -> None:
        self.rest = bytearray()

    def feed(self, chunk: bytes) -> list[str]:
        if b"\n" not in chunk and b"\r" not in chunk:
            self.rest += chunk
            _bounded(len(self.rest))
            return []
        held = bytes(self.rest) + chunk
        tail = b""
        if held.endswith(b"\r"):  # maybe the first half of a \r\n
            held, tail = held[:-1], b"\r"
        *lines, rest = held.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self.rest = bytearray(rest + tail)
        _bounded(len(self.rest))
        return [line.decode(errors="replace") for line in lines]


def _bounded(size: int) -> None:
    if size > MAX_EVENT_BYTES:
        raise StreamFailed(f"the server sent an event over {MAX_EVENT_BYTES} bytes; cut off")


class _SseParser:
    """Line by line, so the sync and the async reader share it."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.data: list[str] = []
        self.size = 0

    def feed(self, line: str) -> Frame | None:
        if not line:
            frame = None
            if self.data:
                event = self.fields.get("event", "message")
                frame = Frame(event, "\n".join(self.data), self.fields.get("id"))
            self.fields, self.data, self.size = {}, [], 0
            return frame
        if not line.startswith(":"):
            self.size += len(line)
            _bounded(self.size)
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self.data.append(value)
            else:
                self.fields[name] = value
        return None


def _event_id(frame: Frame) -> int | None:
    """The frame's id when it is one (ASCII digits, a few: ``"²".isdigit()`` holds too)."""
    wire = frame.id
    return int(wire) if wire and wire.isascii() and wire.isdigit() and len(wire) <= 18 else None


def run_event(frame: Frame) -> RunEvent | None:
    """The typed event of one frame of a run (None: a kind this client does not know)."""
    event_id = _event_id(frame)
    if frame.event == "error":
        raise _stream_error(frame)
    data = msgspec.json.decode(frame.data)
    if frame.event == "done":
        return RunDone(msgspec.convert(data, RunResult), event_id)
    if frame.event == "status":
        return msgspec.convert({**data, "id": event_id}, Status)
    if frame.event == "stdout":
        return Output("stdout", data["text"], event_id)
    if frame.event == "stderr":
        return Output("stderr", data["text"], event_id)
    return None


def chat_event(frame: Frame) -> ChatEvent | None:
    """The typed event of one frame of a chat (None: a kind this client does not know)."""
    if frame.event == "error":
        raise _stream_error(frame)
    data = msgspec.json.decode(frame.data)
    if frame.event == "done":
        return ChatDone(msgspec.convert(data, ChatResult), _event_id(frame))
    if frame.event == "delta":
        return Delta(data["content"], _event_id(frame))
    return None


# ---------------------------------------------------------------- request bodies

Connector: TypeAlias = Mapping[str, Any] | str | Path


def run_body(
    connector: Connector,
    *,
    env: Mapping[str, str] | None = None,
    configuration_overrides: Mapping[str, Any] | None = None,
    network_mode: Literal["none", "bridge"] | None = None,
    secrets: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The ``/execute-connector`` body: ``connector`` is a connector, a whole body, a JSON file
    or a connector folder (``streamsvc.authoring``); the options are added to it."""
    if isinstance(connector, str | Path):
        body = load_request(Path(connector))
    elif isinstance(connector.get("connector"), Mapping):
        body = dict(connector)
    else:
        body = {"connector": dict(connector)}
    if env:
        body["env"] = {**body.get("env", {}), **env}
    if configuration_overrides:
        body["configuration_overrides"] = _merge(
            body.get("configuration_overrides", {}), configuration_overrides
        )
    if network_mode is not None:
        body["network_mode"] = network_mode
    if secrets is not None:
        body["secrets"] = sorted({*body.get("secrets", ()), *secrets})
    body["stream"] = True
    return body


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        both = isinstance(old, Mapping) and isinstance(value, Mapping)
        merged[key] = _merge(old, value) if both else value  # type: ignore[arg-type]
    return merged


def chat_body(
    messages: str | Iterable[Mapping[str, Any]],
    *,
    system: str | None = None,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """The ``/chat`` body: ``messages`` is a prompt or a list of ``{role, content}``."""
    listed = [{"role": "user", "content": messages}] if isinstance(messages, str) else []
    if not isinstance(messages, str):
        listed = [dict(message) for message in messages]
    if system is not None:
        listed.insert(0, {"role": "system", "content": system})
    body: dict[str, Any] = {"messages": listed, "stream": True}
    for name, value in (("model", model), ("temperature", temperature), ("max_tokens", max_tokens)):
        if value is not None:
            body[name] = value
    return body


def _result(events: Iterable[RunEvent], on_event: Callable[[RunEvent], object] | None) -> Any:
    for event in events:
        if on_event is not None:
            on_event(event)
        if isinstance(event, RunDone):
            return event.result
    raise StreamFailed("the stream ended without a result")


# ---------------------------------------------------------------- the clients


def _download_path(file: OutputFile) -> str:
    """The file's url, checked to be a path of this server (never another host)."""
    url = file.url or ""
    if not url.startswith("/runs/") or "//" in url or "\\" in url:
        raise ClientError(f"{file.name!r} has no download url of this server")
    return url


def _part(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _open_part(part: Path) -> BinaryIO:
    """``part`` for writing, never through a link of that name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    return os.fdopen(os.open(part, flags, 0o644), "wb")


def _check_digest(file: OutputFile, digest: str, part: Path, target: Path) -> None:
    if file.sha256 is not None and digest != file.sha256:
        part.unlink(missing_ok=True)
        raise ClientError(f"{file.name!r}: the download's sha256 does not match the listing")
    part.replace(target)


class _Base:
    def __init__(self, url: str | None = None, api_key: str | None = None) -> None:
        if url is None or api_key is None:
            defaults = load_client_settings()
            url = url or defaults.url
            api_key = api_key if api_key is not None else defaults.api_key
        self.url = url.rstrip("/")
        self.headers = {"Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)

    def _unreachable(self, exc: httpx.HTTPError | str) -> Unreachable:
        if isinstance(exc, str):
            return Unreachable(exc)
        if isinstance(exc, httpx.TimeoutException):
            return Unreachable(f"{self.url} stopped answering (no data for a while)")
        return Unreachable(f"cannot reach {self.url}: {exc}")

    def _opened(self, response: httpx.Response, path: str, at: Attachment) -> None:
        at.run_id = response.headers.get("x-run-id") or at.run_id
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise StreamFailed(f"{path} did not answer with a stream")

    def _events_request(self, at: Attachment) -> tuple[str, dict[str, str]]:
        headers = {**self.headers, "Last-Event-ID": str(at.last_event_id)}
        return f"{self.url}/runs/{at.run_id}/events", headers

    def _resume_delay(self, at: Attachment, attempt: int, reason: str) -> float:
        """Seconds to wait before re-attaching, or raise when it is no use any more."""
        if at.run_id is None or attempt >= len(RESUME_DELAYS):
            raise self._unreachable(f"the stream from {self.url} broke off: {reason}")
        at.resumed += 1
        if at.on_resume is not None:
            at.on_resume(at, reason)
        return RESUME_DELAYS[attempt]

    @staticmethod
    def _reason(exc: httpx.HTTPError | None) -> str:
        if exc is None:
            return "the connection closed before the end"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    def _run_request(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {**body, "background": True, "stream": False}

    @staticmethod
    def _list_params(
        kind: str | None, status: str | None, limit: int | None, before: str | None
    ) -> dict[str, str]:
        params = {"kind": kind, "status": status, "before": before}
        found = {k: v for k, v in params.items() if v is not None}
        return found | ({"limit": str(limit)} if limit is not None else {})


class Client(_Base):
    """A blocking client of a streamsvc server (``url``; ``api_key`` when keys are set).

    Without arguments: ``STREAMSVC_URL`` and ``STREAMSVC_API_KEY`` (environment or ``.env``).
    """

    def frames(
        self, path: str, body: Mapping[str, Any], attachment: Attachment | None = None
    ) -> Iterator[Frame]:
        """POST ``body`` to ``path`` and yield the answer's SSE frames, to the terminal one.

        A connection that drops mid-stream is re-attached (``GET /runs/{id}/events`` from the
        last event received): no frame is lost or repeated. ``attachment`` tracks where it is.
        """
        at = attachment or Attachment()
        with httpx.Client(timeout=self.timeout) as http:
            yield from self._follow(http, self._post(http, path, body, at), at)

    def follow(
        self, run_id: str, after: int = 0, attachment: Attachment | None = None
    ) -> Iterator[Frame]:
        """A run's frames after event ``after`` (its whole log by default), then live."""
        at = attachment or Attachment()
        at.run_id, at.last_event_id = run_id, after
        with httpx.Client(timeout=self.timeout) as http:
            yield from self._follow(http, self._get_events(http, at), at)

    def _post(
        self, http: httpx.Client, path: str, body: Mapping[str, Any], at: Attachment
    ) -> Iterator[Frame]:
        with http.stream("POST", self.url + path, json=body, headers=self.headers) as response:
            if response.status_code != 200:
                raise refusal(response.status_code, _error_text(response))
            self._opened(response, path, at)
            yield from _parse(response)

    def _get_events(self, http: httpx.Client, at: Attachment) -> Iterator[Frame]:
        url, headers = self._events_request(at)
        with http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise _refused_events(response.status_code, _error_text(response))
            self._opened(response, url, at)
            yield from _parse(response)

    def _follow(
        self, http: httpx.Client, source: Iterator[Frame], at: Attachment
    ) -> Iterator[Frame]:
        attempt = 0
        while True:
            reason = self._reason(None)
            try:
                for frame in source:
                    if at.run_id is not None and (cut := _passing(frame)) is not None:
                        raise _Passing(cut)  # the run goes on: re-attach
                    if at.seen(frame):
                        continue
                    attempt = 0
                    yield frame
                    if frame.event in TERMINAL:
                        return
            except httpx.HTTPError as exc:
                if at.run_id is None:
                    raise self._unreachable(exc) from None
                reason = self._reason(exc)
            except _Passing as exc:
                reason = str(exc)
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            time.sleep(self._resume_delay(at, attempt, reason))
            attempt += 1
            source = self._get_events(http, at)

    def _call(self, method: str, path: str, **kwargs: Any) -> bytes:
        """The answer's body (at most ``MAX_EVENT_BYTES``), or its refusal raised."""
        try:
            with httpx.stream(
                method, self.url + path, headers=self.headers, timeout=self.timeout, **kwargs
            ) as response:
                if response.status_code >= 400:
                    raise refusal(response.status_code, _error_text(response))
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    _bounded(len(body))
                return bytes(body)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def start(self, connector: Connector, **options: Any) -> Accepted:
        """Start a background run (``"background": true``) and return at once with its id."""
        body = self._run_request(run_body(connector, **options))
        return msgspec.json.decode(
            self._call("POST", "/execute-connector", json=body), type=Accepted
        )

    def get_run(self, run_id: str) -> RunInfo:
        """A run's record, with its final object once it has ended."""
        return msgspec.json.decode(self._call("GET", f"/runs/{run_id}"), type=RunInfo)

    def list_runs(
        self,
        *,
        kind: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> RunPage:
        """Runs newest first (``before``: the id the previous page ended with)."""
        params = self._list_params(kind, status, limit, before)
        return msgspec.json.decode(self._call("GET", "/runs", params=params), type=RunPage)

    def cancel(self, run_id: str) -> RunInfo:
        """Stop a run now (idempotent); its record afterwards."""
        return msgspec.json.decode(self._call("POST", f"/runs/{run_id}/cancel"), type=RunInfo)

    def delete_run(self, run_id: str) -> None:
        """Remove a finished run and its events."""
        self._call("DELETE", f"/runs/{run_id}")

    def download(self, file: OutputFile, target: Path) -> None:
        """Stream a file past the inline cap (its ``url``) to ``target``, checking its sha256
        (written to ``target.part`` first, renamed once complete)."""
        path, part, digest = _download_path(file), _part(target), hashlib.sha256()
        try:
            with (
                httpx.stream(
                    "GET", self.url + path, headers=self.headers, timeout=self.timeout
                ) as response,
                _open_part(part) as sink,
            ):
                if response.status_code >= 400:
                    response.read()
                    raise refusal(response.status_code, response.text)
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    sink.write(chunk)
        except httpx.HTTPError as exc:
            part.unlink(missing_ok=True)
            raise self._unreachable(exc) from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        _check_digest(file, digest.hexdigest(), part, target)

    def stream(self, connector: Connector, **options: Any) -> Iterator[RunEvent]:
        """Run a connector and yield its events, ending with ``RunDone`` (options: ``run_body``).

        A failure after the start raises ``StreamFailed``; a refusal ``RequestRefused``.
        """
        for frame in self.frames("/execute-connector", run_body(connector, **options)):
            if (event := run_event(frame)) is not None:
                yield event

    def run(
        self,
        connector: Connector,
        *,
        on_event: Callable[[RunEvent], object] | None = None,
        **options: Any,
    ) -> RunResult:
        """Run a connector to its end and return the final object; ``on_event`` sees each event."""
        result: RunResult = _result(self.stream(connector, **options), on_event)
        return result

    def chat_stream(
        self, messages: str | Iterable[Mapping[str, Any]], **options: Any
    ) -> Iterator[ChatEvent]:
        """Stream a chat reply: ``Delta`` events, then ``ChatDone`` (options: ``chat_body``)."""
        for frame in self.frames("/chat", chat_body(messages, **options)):
            if (event := chat_event(frame)) is not None:
                yield event

    def chat(
        self,
        messages: str | Iterable[Mapping[str, Any]],
        *,
        on_event: Callable[[ChatEvent], object] | None = None,
        **options: Any,
    ) -> ChatResult:
        """The whole chat reply; ``on_event`` sees each ``Delta`` as it comes."""
        for event in self.chat_stream(messages, **options):
            if on_event is not None:
                on_event(event)
            if isinstance(event, ChatDone):
                return event.result
        raise StreamFailed("the stream ended without a result")


class AsyncClient(_Base):
    """The same client for asyncio/anyio code: ``await run(...)``, ``async for ... in stream()``."""

    async def frames(
        self, path: str, body: Mapping[str, Any], attachment: Attachment | None = None
    ) -> AsyncIterator[Frame]:
        """POST ``body`` to ``path`` and yield the answer's SSE frames, re-attaching after drops."""
        at = attachment or Attachment()
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            async for frame in self._follow(http, self._post(http, path, body, at), at):
                yield frame

    async def follow(
        self, run_id: str, after: int = 0, attachment: Attachment | None = None
    ) -> AsyncIterator[Frame]:
        """A run's frames after event ``after``, then live, to its end."""
        at = attachment or Attachment()
        at.run_id, at.last_event_id = run_id, after
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            async for frame in self._follow(http, self._get_events(http, at), at):
                yield frame

    async def _post(
        self, http: httpx.AsyncClient, path: str, body: Mapping[str, Any], at: Attachment
    ) -> AsyncIterator[Frame]:
        async with http.stream(
            "POST", self.url + path, json=body, headers=self.headers
        ) as response:
            if response.status_code != 200:
                raise refusal(response.status_code, await _aerror_text(response))
            self._opened(response, path, at)
            async for frame in _aparse(response):
                yield frame

    async def _get_events(self, http: httpx.AsyncClient, at: Attachment) -> AsyncIterator[Frame]:
        url, headers = self._events_request(at)
        async with http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise _refused_events(response.status_code, await _aerror_text(response))
            self._opened(response, url, at)
            async for frame in _aparse(response):
                yield frame

    async def _follow(
        self, http: httpx.AsyncClient, source: AsyncIterator[Frame], at: Attachment
    ) -> AsyncIterator[Frame]:
        attempt = 0
        while True:
            reason = self._reason(None)
            try:
                async for frame in source:
                    if at.run_id is not None and (cut := _passing(frame)) is not None:
                        raise _Passing(cut)  # the run goes on: re-attach
                    if at.seen(frame):
                        continue
                    attempt = 0
                    yield frame
                    if frame.event in TERMINAL:
                        return
            except httpx.HTTPError as exc:
                if at.run_id is None:
                    raise self._unreachable(exc) from None
                reason = self._reason(exc)
            except _Passing as exc:
                reason = str(exc)
            finally:
                close = getattr(source, "aclose", None)
                if close is not None:
                    await close()
            await anyio.sleep(self._resume_delay(at, attempt, reason))
            attempt += 1
            source = self._get_events(http, at)

    async def _call(self, method: str, path: str, **kwargs: Any) -> bytes:
        """The answer's body (at most ``MAX_EVENT_BYTES``), or its refusal raised."""
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout) as http,
                http.stream(method, self.url + path, headers=self.headers, **kwargs) as response,
            ):
                if response.status_code >= 400:
                    raise refusal(response.status_code, await _aerror_text(response))
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    _bounded(len(body))
                return bytes(body)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    async def start(self, connector: Connector, **options: Any) -> Accepted:
        """Start a background run and return at once with its id."""
        body = self._run_request(run_body(connector, **options))
        response = await self._call("POST", "/execute-connector", json=body)
        return msgspec.json.decode(response, type=Accepted)

    async def download(self, file: OutputFile, target: Path) -> None:
        """As ``Client.download`` (the file written in a worker thread)."""
        path, part, digest = _download_path(file), _part(target), hashlib.sha256()
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout) as http,
                http.stream("GET", self.url + path, headers=self.headers) as response,
            ):
                if response.status_code >= 400:
                    await response.aread()
                    raise refusal(response.status_code, response.text)
                sink = anyio.wrap_file(await anyio.to_thread.run_sync(_open_part, part))
                async with sink:
                    async for chunk in response.aiter_bytes():
                        digest.update(chunk)
                        await sink.write(chunk)
        except httpx.HTTPError as exc:
            part.unlink(missing_ok=True)
            raise self._unreachable(exc) from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        _check_digest(file, digest.hexdigest(), part, target)

    async def get_run(self, run_id: str) -> RunInfo:
        response = await self._call("GET", f"/runs/{run_id}")
        return msgspec.json.decode(response, type=RunInfo)

    async def list_runs(
        self,
        *,
        kind: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> RunPage:
        params = self._list_params(kind, status, limit, before)
        response = await self._call("GET", "/runs", params=params)
        return msgspec.json.decode(response, type=RunPage)

    async def cancel(self, run_id: str) -> RunInfo:
        response = await self._call("POST", f"/runs/{run_id}/cancel")
        return msgspec.json.decode(response, type=RunInfo)

    async def delete_run(self, run_id: str) -> None:
        await self._call("DELETE", f"/runs/{run_id}")

    async def stream(self, connector: Connector, **options: Any) -> AsyncIterator[RunEvent]:
        """Run a connector and yield its events, ending with ``RunDone`` (options: ``run_body``)."""
        async for frame in self.frames("/execute-connector", run_body(connector, **options)):
            if (event := run_event(frame)) is not None:
                yield event

    async def run(
        self,
        connector: Connector,
        *,
        on_event: Callable[[RunEvent], object] | None = None,
        **options: Any,
    ) -> RunResult:
        """Run a connector to its end and return the final object; ``on_event`` sees each event."""
        async for event in self.stream(connector, **options):
            if on_event is not None:
                on_event(event)
            if isinstance(event, RunDone):
                return event.result
        raise StreamFailed("the stream ended without a result")

    async def chat_stream(
        self, messages: str | Iterable[Mapping[str, Any]], **options: Any
    ) -> AsyncIterator[ChatEvent]:
        """Stream a chat reply: ``Delta`` events, then ``ChatDone`` (options: ``chat_body``)."""
        async for frame in self.frames("/chat", chat_body(messages, **options)):
            if (event := chat_event(frame)) is not None:
                yield event

    async def chat(
        self,
        messages: str | Iterable[Mapping[str, Any]],
        *,
        on_event: Callable[[ChatEvent], object] | None = None,
        **options: Any,
    ) -> ChatResult:
        """The whole chat reply; ``on_event`` sees each ``Delta`` as it comes."""
        async for event in self.chat_stream(messages, **options):
            if on_event is not None:
                on_event(event)
            if isinstance(event, ChatDone):
                return event.result
        raise StreamFailed("the stream ended without a result")
