"""From sandbox events to the final answer of a run (``ExecutionResult``).

``Transcript`` keeps the output (redacted, capped per stream) and applies the result rule to
stdout. The rule: the JSON answer and the stream's ``done`` carry the same object. The result
rule and its error codes: docs/architecture.md ("Module notes").
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import msgspec

from streamsvc.connectors.analysis import json_depth
from streamsvc.connectors.redact import MASK, Redactor
from streamsvc.sandbox.types import Download, Exited, Output, OutputFile, Usage

_json = msgspec.json.Decoder()

MAX_RESULT_DEPTH = 64


class ExecutionError(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    details: Any = None


class ExecutionResult(msgspec.Struct):
    ok: bool
    result: Any
    error: ExecutionError | None
    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    duration_ms: int
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    output_limit_exceeded: bool = False
    #: The program tried to start more processes than the pids limit allows.
    pids_limited: bool = False
    #: The run this answer ends (``GET /runs/{id}``).
    run_id: str | None = None
    #: The process that ran it (``host:pid``: the server, or the executor with Redis).
    executor: str | None = None
    #: Some secret was masked somewhere in this answer (stdout, stderr, result, a file name).
    redacted: bool = False
    usage: Usage | None = None
    #: Files written under ``$STREAMSVC_OUTPUT_DIR``, by name; ``files_omitted`` past the cap.
    files: list[OutputFile] = []
    files_omitted: int = 0


_NOTHING = object()


def _decode(text: str) -> Any:
    try:
        value = _json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return _NOTHING
    return value if json_depth(value) <= MAX_RESULT_DEPTH else _NOTHING


def find_result(stdout: str) -> Any:
    """The program's result per the module's rule, or ``_NOTHING``."""
    text = stdout.strip()
    if not text:
        return _NOTHING
    whole = _decode(text)
    if whole is not _NOTHING:
        return whole
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            value = _decode(line)
            if isinstance(value, dict):
                return value
    return _NOTHING


class _Capped:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False

    def add(self, text: str) -> None:
        room = self.cap - self.size
        if room <= 0:
            self.truncated = self.truncated or bool(text)
            return
        data = text.encode()
        if len(data) > room:
            text = data[:room].decode(errors="ignore")
            self.truncated = True
        self.parts.append(text)
        self.size += len(text.encode())

    def text(self) -> str:
        return "".join(self.parts)


class Transcript:
    def __init__(self, secrets: list[str], cap: int) -> None:
        self._streams = {"stdout": _Capped(cap), "stderr": _Capped(cap)}
        redactor = Redactor(secrets)
        self._redactors = {"stdout": redactor, "stderr": redactor.sibling()}
        self._names_masked = False
        #: Longest first, so a secret that contains another is masked whole.
        self._secret_bytes = sorted({v.encode() for v in secrets if v}, key=len, reverse=True)
        self._contents_masked = False

    def redact_files(self, exited: Exited) -> None:
        """Mask the secrets in the output files' contents (inline and for download), their
        size and sha256 then those of what is returned. CPU-bound: call it in a thread."""
        if not self._secret_bytes:
            return
        listed = {item.name: item for item in exited.files}
        for item in exited.files:
            if item.content_base64 is not None:
                data = self._masked(base64.b64decode(item.content_base64))
                if data is not None:
                    item.content_base64 = base64.b64encode(data).decode()
                    _describe(item, data)
        kept: list[Download] = []
        for download in exited.downloads:
            data = self._masked(download.data)
            if data is not None and download.name in listed:
                _describe(listed[download.name], data)
            kept.append(download if data is None else Download(download.name, data))
        exited.downloads = kept

    def _masked(self, data: bytes) -> bytes | None:
        """``data`` with every secret masked, or None when it holds none."""
        found = False
        for secret in self._secret_bytes:
            if secret in data:
                data = data.replace(secret, MASK.encode())
                found = True
        self._contents_masked = self._contents_masked or found
        return data if found else None

    def output(self, event: Output) -> Output | None:
        """Record one chunk; the redacted chunk to forward, if any text is left."""
        text = self._redactors[event.stream](event.text)
        if not text:
            return None
        self._streams[event.stream].add(text)
        return Output(event.stream, text)

    def flush(self) -> list[Output]:
        """Whatever redaction held back, at the end of the run."""
        flushed = []
        for name, redactor in self._redactors.items():
            text = redactor.flush()
            if text:
                self._streams[name].add(text)
                flushed.append(Output(name, text))  # type: ignore[arg-type]
        return flushed

    def result(self, exited: Exited) -> ExecutionResult:
        stdout, stderr = self._streams["stdout"], self._streams["stderr"]
        files = [self._redacted_name(item) for item in exited.files]
        found = find_result(stdout.text())
        ok, value, error = _outcome(found, exited)
        return ExecutionResult(
            ok=ok,
            result=value,
            error=error,
            exit_code=exited.exit_code,
            timed_out=exited.timed_out,
            oom_killed=exited.oom_killed,
            duration_ms=exited.duration_ms,
            stdout=stdout.text(),
            stderr=stderr.text(),
            stdout_truncated=stdout.truncated,
            stderr_truncated=stderr.truncated,
            output_limit_exceeded=exited.output_capped,
            pids_limited=exited.pids_limited,
            redacted=any(redactor.masked for redactor in self._redactors.values())
            or self._names_masked
            or self._contents_masked,
            usage=exited.usage,
            files=files,
            files_omitted=exited.files_omitted,
        )

    def _redacted_name(self, item: OutputFile) -> OutputFile:
        """The file with any secret in its name masked (contents: ``redact_files``)."""
        redactor = self._redactors["stdout"].sibling()
        name = redactor(item.name) + redactor.flush()
        if redactor.masked:
            self._names_masked = True
            item.name = name
        return item


def _describe(item: OutputFile, data: bytes) -> None:
    item.size = len(data)
    item.sha256 = hashlib.sha256(data).hexdigest()


def _outcome(found: Any, exited: Exited) -> tuple[bool, Any, ExecutionError | None]:
    value: Any = None
    reported_ok = True
    program_error: Any = None
    if found is not _NOTHING:
        if isinstance(found, dict) and isinstance(found.get("ok"), bool):
            reported_ok = found["ok"]
            value = found.get("result")
            program_error = found.get("error")
        else:
            value = found
    limit = _limit_error(exited)
    if limit is not None:
        return False, value, limit
    if exited.exit_code != 0:
        return (
            False,
            value,
            ExecutionError("nonzero_exit", f"the program exited with code {exited.exit_code}"),
        )
    if found is _NOTHING:
        return False, None, ExecutionError("no_result", "the program printed no JSON result")
    if not reported_ok:
        return (
            False,
            value,
            ExecutionError("connector_failed", _message(program_error), details=program_error),
        )
    return True, value, None


def _message(program_error: Any) -> str:
    """The program's own error message when it gave one, as a string or ``{"message"}``."""
    if isinstance(program_error, dict):
        program_error = program_error.get("message")
    if isinstance(program_error, str) and program_error:
        return program_error
    return "the connector reported failure"


def _limit_error(exited: Exited) -> ExecutionError | None:
    if exited.timed_out:
        return ExecutionError("timeout", f"the run was killed after {exited.duration_ms} ms")
    if exited.oom_killed:
        return ExecutionError("out_of_memory", "the run was killed for exceeding memoryMb")
    if exited.output_capped:
        return ExecutionError("output_limit", "the run was killed for writing too much output")
    if exited.pids_limited:
        return ExecutionError("process_limit", "the run hit the process limit")
    return None
