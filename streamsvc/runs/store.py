"""The run store protocol: a record and an append-only event log per run.

Backends (memory, SQLite, Redis) implement ``RunStore``; endpoints see only this.
The rule: event ids are per-run integers 1..n, appended once each, in order; secrets never stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import msgspec

from streamsvc.identity import process_alive, process_name

RunKind = Literal["connector", "chat"]
RunStatus = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
#: Statuses a run never leaves.
FINISHED: frozenset[RunStatus] = frozenset({"completed", "failed", "cancelled", "interrupted"})
#: Events a reader gives between two returns to the event loop: sends to a client that
#: left do not suspend, and its disconnect must get in to cancel the reader (a replay of a
#: long log would otherwise run to its end, holding the loop).
CHECKPOINT_EVERY = 16
#: A run's source yields this event (data: ``list[RunFile]``) to keep files before ``done``;
#: the manager stores them and never logs it.
FILES_EVENT = "_files"


#: Which process executes a run (``RunRecord.executor``), and whether it still lives.
executor_name = process_name
executor_alive = process_alive


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What is known about one run; ``result``/``error`` are the final JSON objects."""

    id: str
    kind: RunKind
    status: RunStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    last_event_id: int = 0
    #: A short stable id of the API key that created the run (None without keys).
    owner: str | None = None
    background: bool = False
    #: The request as stored: ``env`` values dropped.
    request: dict[str, Any] | None = None
    result: Any = None
    error: Any = None
    #: Which executor ran it (a single process names itself).
    executor: str | None = None
    #: Retention dropped its events (the record is kept a while longer): ``follow`` is a 410.
    events_expired: bool = False


class StoredEvent(msgspec.Struct, frozen=True, array_like=True):
    """One event of a run's log: its id (1..n), SSE name and JSON payload as encoded."""

    id: int
    name: str
    data: bytes


class RunFile(msgspec.Struct, frozen=True):
    """An output file kept with its run (``GET /runs/{id}/files/{name}``); lives as long
    as the run's record (deleted and pruned with it)."""

    name: str
    media_type: str
    data: bytes


class RunStore(Protocol):
    """A run store. Every method is bounded; ``follow`` ends after the terminal event."""

    async def open(self) -> None:
        """Check and prepare it (a ``SettingsError`` naming the setting when unusable)."""

    def writer(self) -> AbstractAsyncContextManager[None]:
        """While inside (the app's lifespan), writes of the runs executed here may be batched
        behind their callers; everything held is written on leaving."""
        ...

    async def health(self) -> dict[str, Any] | None:
        """``/health``'s ``runs`` component, or None when there is nothing to report."""
        ...

    def adopt(self, record: RunRecord) -> None:
        """A run created by another process (queued) that this one now executes."""

    async def create(self, record: RunRecord) -> None: ...

    async def append(self, run_id: str, events: Sequence[StoredEvent]) -> None:
        """Add events (ids continuing the log); may buffer, but ``follow`` sees them at once."""

    async def finish(
        self, run_id: str, status: RunStatus, *, result: Any = None, error: Any = None
    ) -> None:
        """Mark the run finished (after its terminal event was appended)."""

    async def mark_running(self, run_id: str) -> None: ...

    async def get(self, run_id: str) -> RunRecord | None: ...

    def follow(self, run_id: str, after: int) -> AsyncIterator[StoredEvent]:
        """The events after ``after`` from the log, then live ones, ending with the
        terminal one: no gap, no duplicate. Raises ``EventsExpired`` when pruned."""
        ...

    async def find(
        self,
        *,
        owner: str | None,
        kind: RunKind | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        """Newest first, without ``result``; ``before`` is a run id (the page cursor)."""
        ...

    async def delete(self, run_id: str) -> bool:
        """Drop the run whole: record, events and files."""
        ...

    async def put_file(self, run_id: str, name: str, data: bytes, media_type: str) -> None:
        """Keep an output file with the run (before its terminal event is appended)."""

    async def get_file(self, run_id: str, name: str) -> RunFile | None:
        """The run's file of that name, or None."""
        ...

    async def interrupt_unfinished(self, alive: Callable[[str], bool]) -> list[str]:
        """At start-up: unfinished runs whose ``executor`` is None or not ``alive(executor)``
        (a dead process's, not a live peer worker's) become ``interrupted``; their ids."""
        ...

    async def read_elsewhere(self, run_id: str) -> bool:
        """Whether another process follows the run now (then it is not abandoned)."""
        ...

    async def request_cancel(self, run_id: str, executor: str) -> int:
        """Ask the process ``executor`` (a record's) to cancel ``run_id``; how many heard
        (0: nobody listens, e.g. the process is gone or the store is not shared)."""
        ...

    def cancels(self, executor: str) -> AsyncIterator[str]:
        """The run ids whose cancel was asked of ``executor``, as they come (runs until
        cancelled)."""
        ...

    async def prune(self, events_before: float, records_before: float) -> int:
        """Retention (unix seconds, by ``finished_at``): finished runs before ``events_before``
        lose their events (``follow`` then raises ``EventsExpired``, 410); finished runs before
        ``records_before`` are dropped whole (404). Returns the number of runs touched."""
        ...

    async def aclose(self) -> None:
        """Flush buffered writes and close."""
