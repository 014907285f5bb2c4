"""What the server and a warm sandbox's runner say over the attach stream: frames and end lines.

The rule: plain bytes in, plain bytes out, nothing here talks to the engine; a line without
the run's nonce is only output. The protocol step by step: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from importlib import resources
from typing import ClassVar, Literal

import msgspec

from streamsvc.sandbox.runner.runner import (
    END_MARKER,
    MAX_DOWNLOAD_BYTES,
    MAX_INLINE_BYTES,
    MAX_OUTPUT_FILES,
    READY_MARKER,
)
from streamsvc.sandbox.types import Download, OutputFile, RunSpec, Usage

RUNNER = resources.files("streamsvc.sandbox.runner").joinpath("runner.py").read_bytes()
#: Docker's attach stream numbers.
STREAMS: dict[int, Literal["stdout", "stderr"]] = {1: "stdout", 2: "stderr"}


def frame(payload: bytes) -> bytes:
    """One message on the runner's stdin: its length, a newline, the bytes."""
    return b"%d\n" % len(payload) + payload


def bundle_files(spec: RunSpec) -> dict[str, str]:
    """What lands in /work: the connector's files, the runner and the context."""
    return {
        **spec.files,
        ".streamsvc/runner.py": RUNNER.decode(),
        ".streamsvc/context.json": json.dumps(spec.context),
    }


def new_nonce() -> str:
    return secrets.token_hex(16)


def delivery(spec: RunSpec, env: dict[str, str], nonce: str, fresh: bool = False) -> bytes:
    """The run for a waiting runner (send it with ``frame``).

    ``fresh``: the runner starts itself again in a new interpreter with ``env``
    (a cold run: what Python reads only at start-up applies).
    """
    run = {"files": bundle_files(spec), "env": env, "nonce": nonce, "fresh": fresh}
    return json.dumps(run).encode()


class ReadyReport(msgspec.Struct):
    """What a warm runner says once it waits: what it preloaded, or why it would not."""

    modules: list[str] = []
    env: list[str] = []
    refused: str = ""


def ready_report(data: bytes) -> ReadyReport | None:
    """The runner's ready line (first stdout chunk) as a report; ``None`` if it is not one."""
    if data.startswith(READY_MARKER) and data.endswith(b"\n"):
        with contextlib.suppress(msgspec.DecodeError):
            return msgspec.json.decode(data[len(READY_MARKER) :], type=ReadyReport)
    return None


class EndLine(msgspec.Struct):
    """What a runner reports when its program has exited: on stderr the exit only, on
    stdout also what it used and the files it wrote."""

    exit_code: int
    oom_killed: bool | None = None
    usage: Usage | None = None
    files: list[OutputFile] = []
    files_omitted: int = 0
    downloads: list[Download] = []


class EndLines:
    """Finds the runner's end line in stdout and in stderr, and keeps it out of the output.

    Each line is ``END_MARKER NONCE JSON\\n``; what comes before it on its stream
    is output, what comes after (a leftover process writing on) is dropped. A
    chunk ending in what may be the start of the marker is held back until the
    next chunk says whether it is.
    """

    #: An end line longer than this is not one of ours (stdout's carries the files' bytes:
    #: inline and for download, in base64).
    LIMITS: ClassVar[dict[int, int]] = {
        1: (MAX_INLINE_BYTES + MAX_DOWNLOAD_BYTES) * 4 // 3 + MAX_OUTPUT_FILES * 4096 + 4096,
        2: 4096,
    }

    def __init__(self, nonce: str) -> None:
        self.marker = END_MARKER + nonce.encode() + b" "
        self._held = {number: b"" for number in STREAMS}
        self._found = dict.fromkeys(STREAMS, False)
        self._lines: dict[int, bytes | memoryview] = {}
        self._line = {number: bytearray() for number in STREAMS}
        self._decided = False
        self._verdict: EndLine | None = None

    @property
    def complete(self) -> bool:
        return len(self._lines) == len(STREAMS)

    def feed(self, stream: int, data: bytes) -> bytes:
        """The part of ``data`` that is the program's output."""
        if stream in self._lines:
            return b""
        output = b""
        if not self._found[stream]:
            buffer = self._held[stream] + data
            at = buffer.find(self.marker)
            if at < 0:
                keep = self._partial(buffer)
                self._held[stream] = buffer[len(buffer) - keep :]
                return buffer[: len(buffer) - keep]
            output, data = buffer[:at], buffer[at:]
            self._found[stream] = True
            self._line[stream] = bytearray()
        line = self._line[stream]
        newline = data.find(b"\n")
        line += data if newline < 0 else data[:newline]  # grown in place: no copy per chunk
        if newline < 0 and len(line) <= self.LIMITS[stream]:
            return output
        # A view of the buffer, not a copy (stdout's may carry 43 MiB of base64).
        self._lines[stream] = memoryview(line)[len(self.marker) :] if newline >= 0 else b""
        return output

    def _partial(self, buffer: bytes) -> int:
        """How many bytes at the end of ``buffer`` may begin the marker."""
        start = buffer.rfind(self.marker[:1], max(0, len(buffer) - len(self.marker) + 1))
        if start >= 0 and self.marker.startswith(buffer[start:]):
            return len(buffer) - start
        return 0

    def leftover(self, stream: int) -> bytes:
        """Held-back bytes that turned out to be output (the stream ended without its line)."""
        if self._found[stream]:
            return b""
        held, self._held[stream] = self._held[stream], b""
        return held

    @property
    def size(self) -> int:
        """Bytes of stdout's end line (decode a large one off the event loop)."""
        return len(self._lines.get(1, b""))

    def verdict(self) -> EndLine | None:
        """The runner's report (stdout's line), once both lines are in and agree on the
        exit; else ``None``."""
        if not self.complete:
            return None
        if self._decided:
            return self._verdict
        self._decided = True
        try:
            full = msgspec.json.decode(self._lines[1], type=EndLine)
            short = msgspec.json.decode(self._lines[2], type=EndLine)
        except msgspec.DecodeError:
            return None
        finally:  # decoded (or not ours): the line's buffer is not kept besides
            self._lines[1], self._line[1] = b"", bytearray()
        if (full.exit_code, full.oom_killed) != (short.exit_code, short.oom_killed):
            return None
        self._verdict = full
        return full
