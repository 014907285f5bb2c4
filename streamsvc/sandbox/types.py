"""The sandbox protocol: what the execute endpoint needs from a container engine.

A ``Sandbox`` turns a ``RunSpec`` into ``Status`` events, ``Output`` chunks and one final
``Exited``. The rule: the first event comes only once the engine answered (down = 503).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

import msgspec

from streamsvc.connectors.dependencies import Dependency

NetworkMode = Literal["none", "bridge"]
Phase = Literal[
    "validated", "queued", "installing_dependencies", "dependencies_ready", "starting", "running"
]


class RunSpec(msgspec.Struct, frozen=True):
    """Everything one run needs, already validated and substituted."""

    files: dict[str, str]
    entry_point: str
    env: dict[str, str]
    context: dict[str, Any]
    dependencies: tuple[Dependency, ...]
    memory_mb: int
    timeout_ms: int
    network: NetworkMode


class Status(msgspec.Struct, omit_defaults=True):
    """One step of a run, saying what actually happens (fields unset are left out)."""

    phase: Phase
    message: str = ""
    #: ``queued``: the 1-based place in the queue.
    position: int | None = None
    #: Dependencies: ``hit`` (the set was installed already) or ``miss`` (installed now).
    cache: Literal["hit", "miss"] | None = None
    #: Dependencies: how many were requested, how many distributions the set holds, its size.
    requested: int | None = None
    packages: int | None = None
    size_kb: int | None = None
    #: ``installing_dependencies`` (every few seconds) and ``dependencies_ready`` after an install.
    elapsed_ms: int | None = None
    #: ``starting``: ``warm`` (a started sandbox takes the run) or ``cold`` (one starts now).
    start: Literal["warm", "cold"] | None = None


class Output(msgspec.Struct):
    stream: Literal["stdout", "stderr"]
    text: str


class Usage(msgspec.Struct):
    """What a run used: CPU time and the container's memory peak (its cgroup), wall clock.

    ``None``: not known (the run was killed before the runner could read them).
    """

    cpu_ms: int | None
    memory_peak_mb: int | None
    wall_ms: int


class FileError(msgspec.Struct):
    code: str
    message: str


class OutputFile(msgspec.Struct):
    """A file the program wrote under ``$STREAMSVC_OUTPUT_DIR``: its content inline
    (base64) while within the inline cap, else its ``url`` within the download cap,
    else ``error`` says why not."""

    name: str
    size: int
    sha256: str | None
    media_type: str | None
    content_base64: str | None = None
    error: FileError | None = None
    #: Past the inline cap but within the download cap: ``/runs/{id}/files/{name}``.
    url: str | None = None


class Download(msgspec.Struct, frozen=True):
    """The bytes of an output file past the inline cap, kept with the run for download."""

    name: str
    data: bytes


class Exited(msgspec.Struct):
    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    duration_ms: int
    #: The run was killed because a stream passed the output cap.
    output_capped: bool = False
    #: The pids limit refused a fork or a thread (the cgroup's own counter, via the runner).
    pids_limited: bool = False
    usage: Usage | None = None
    files: list[OutputFile] = []
    #: Output files past the count cap (or too deep), not listed.
    files_omitted: int = 0
    #: The contents of the listed files past the inline cap, by their listed name.
    downloads: list[Download] = []


SandboxEvent = Status | Output | Exited


class Sandbox(Protocol):
    def run(self, spec: RunSpec) -> AsyncIterator[SandboxEvent]: ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...
