"""The ephemeral run store (``STREAMSVC_RUN_STORE=memory://``): everything in this process.

Records and logs live in ``live.Active`` until deleted or pruned; a restart forgets them all.
For tests, benchmarks and deployments that want no state on disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import msgspec

from streamsvc.errors import EventsExpired, RunNotFound
from streamsvc.runs.live import Active
from streamsvc.runs.store import FINISHED, RunFile, RunKind, RunRecord, RunStatus, StoredEvent


class MemoryStore:
    """A ``RunStore`` in a dict."""

    def __init__(self) -> None:
        self._active = Active()
        self._files: dict[str, dict[str, RunFile]] = {}

    async def create(self, record: RunRecord) -> None:
        self._active.create(record)

    async def append(self, run_id: str, events: Sequence[StoredEvent]) -> None:
        self._active.append(run_id, events)

    async def finish(
        self, run_id: str, status: RunStatus, *, result: Any = None, error: Any = None
    ) -> None:
        self._active.finish(run_id, status, result, error)

    async def mark_running(self, run_id: str) -> None:
        self._active.mark_running(run_id)

    async def get(self, run_id: str) -> RunRecord | None:
        return self._active.records.get(run_id)

    def follow(self, run_id: str, after: int) -> AsyncIterator[StoredEvent]:
        record = self._active.records.get(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        if record.events_expired:
            raise EventsExpired(f"the events of run {run_id} were pruned")
        return self._active.logs[run_id].follow(after)

    async def find(
        self,
        *,
        owner: str | None,
        kind: RunKind | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        return page(list(self._active.records.values()), owner, kind, status, limit, before)

    async def delete(self, run_id: str) -> bool:
        found = run_id in self._active.records
        self._active.forget(run_id)
        self._files.pop(run_id, None)
        return found

    async def put_file(self, run_id: str, name: str, data: bytes, media_type: str) -> None:
        if run_id in self._active.records:
            self._files.setdefault(run_id, {})[name] = RunFile(name, media_type, data)

    async def get_file(self, run_id: str, name: str) -> RunFile | None:
        return self._files.get(run_id, {}).get(name)

    async def interrupt_unfinished(self, alive: Callable[[str], bool]) -> list[str]:
        return []  # nothing survives a restart

    async def read_elsewhere(self, run_id: str) -> bool:
        return False  # one process: every reader is this process's

    async def request_cancel(self, run_id: str, executor: str) -> int:
        return 0  # one process: its own runs are cancelled directly

    async def cancels(self, executor: str) -> AsyncIterator[str]:
        await anyio.sleep_forever()
        yield ""  # pragma: no cover (an async generator that never yields)

    async def prune(self, events_before: float, records_before: float) -> int:
        touched = 0
        for record in list(self._active.records.values()):
            finished = record.finished_at
            if record.status not in FINISHED or finished is None:
                continue
            if finished < records_before:
                self._active.forget(record.id)
                self._files.pop(record.id, None)
                touched += 1
            elif finished < events_before and not record.events_expired:
                self._active.records[record.id] = msgspec.structs.replace(
                    record, events_expired=True
                )
                self._active.logs[record.id].events.clear()
                touched += 1
        return touched

    async def open(self) -> None:
        pass

    def writer(self) -> AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def health(self) -> dict[str, Any] | None:
        return None

    def adopt(self, record: RunRecord) -> None:
        raise NotImplementedError("runs are queued for executors on the Redis store only")

    async def aclose(self) -> None:
        pass


def page(
    records: list[RunRecord],
    owner: str | None,
    kind: RunKind | None,
    status: RunStatus | None,
    limit: int,
    before: str | None,
) -> list[RunRecord]:
    """``find`` over records in memory: newest first (created_at, then id), without results."""
    chosen = [
        r
        for r in records
        if r.owner == owner
        and (kind is None or r.kind == kind)
        and (status is None or r.status == status)
    ]
    chosen.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    if before is not None:
        cursor = next((r for r in records if r.id == before), None)
        if cursor is None:
            return []
        chosen = [r for r in chosen if (r.created_at, r.id) < (cursor.created_at, cursor.id)]
    return [msgspec.structs.replace(r, result=None, request=None) for r in chosen[:limit]]
