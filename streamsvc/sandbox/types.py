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
Phase = Literal["validated", "queued", "installing_dependencies", "starting", "running"]


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
    phase: Phase
    message: str = ""
    position: int | None = None


class Output(msgspec.Struct):
    stream: Literal["stdout", "stderr"]
    text: str


class Exited(msgspec.Struct):
    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    duration_ms: int
    #: The run was killed because a stream passed the output cap.
    output_capped: bool = False
    #: The pids limit refused a fork or a thread (the cgroup's own counter, via the runner).
    pids_limited: bool = False


SandboxEvent = Status | Output | Exited


class Sandbox(Protocol):
    def run(self, spec: RunSpec) -> AsyncIterator[SandboxEvent]: ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...
