"""The runs this process is executing: their records and whole event logs, held in memory.

``LiveLog.follow`` serves a reader from the log it holds, then waits for the next event, so a
reader in the same process never sees a gap or a duplicate. Both embedded backends build on it.
``Held`` counts the unfinished runs against their caps.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import msgspec

from streamsvc.errors import RunNotFound, TooManyRuns
from streamsvc.runs.store import CHECKPOINT_EVERY, FINISHED, RunRecord, RunStatus, StoredEvent

#: Events a reader takes from the log at once.
FOLLOW_BATCH = 64


class LiveLog:
    """One run's events (ids 1..n, in order) and a wake-up for the readers following it."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.finished = False
        #: Made by the first reader that waits, set (and dropped) by the next change.
        self._changed: anyio.Event | None = None

    def add(self, events: Sequence[StoredEvent]) -> None:
        self.events.extend(events)
        self._wake()

    def finish(self) -> None:
        self.finished = True
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def follow(self, after: int) -> AsyncIterator[StoredEvent]:
        index = max(0, after)
        while True:
            if index < len(self.events):
                # A few at a time: a copy of the rest per reader was up to MAX_LOG_EVENTS
                # references for each slow reader of a long log.
                batch = self.events[index : index + FOLLOW_BATCH]
                index += len(batch)
                for given, event in enumerate(batch, 1):
                    yield event
                    if given % CHECKPOINT_EVERY == 0:  # a client gone: its cancel gets in
                        await anyio.lowlevel.checkpoint()
                continue
            if self.finished:
                return
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()


class Active:
    """Records and logs of runs, updated as the ``RunStore`` calls arrive (no I/O)."""

    def __init__(self) -> None:
        self.records: dict[str, RunRecord] = {}
        self.logs: dict[str, LiveLog] = {}

    def create(self, record: RunRecord) -> None:
        self.records[record.id] = record
        self.logs[record.id] = LiveLog()

    def append(self, run_id: str, events: Sequence[StoredEvent]) -> None:
        if not events:
            return
        record = self.records.get(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        self.logs[run_id].add(events)
        self.records[run_id] = msgspec.structs.replace(record, last_event_id=events[-1].id)

    def mark_running(self, run_id: str) -> None:
        record = self.records.get(run_id)
        if record is not None and record.status == "queued":
            self.records[run_id] = msgspec.structs.replace(
                record, status="running", started_at=time.time()
            )

    def finish(self, run_id: str, status: RunStatus, result: Any, error: Any) -> RunRecord | None:
        record = self.records.get(run_id)
        if record is None or record.status in FINISHED:
            return None
        record = msgspec.structs.replace(
            record, status=status, finished_at=time.time(), result=result, error=error
        )
        self.records[run_id] = record
        self.logs[run_id].finish()
        return record

    def forget(self, run_id: str) -> None:
        self.records.pop(run_id, None)
        log = self.logs.pop(run_id, None)
        if log is not None:
            log.finish()  # a reader of a deleted run ends


class Held:
    """Unfinished runs in all and by owner (None: no keys), against their caps."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self.count = 0
        self.owned: dict[str | None, int] = {}

    def admit(self, owner: str | None) -> None:
        """Raise ``TooManyRuns`` when one more run would pass a cap."""
        if self.count >= self.total:
            raise TooManyRuns(f"this server holds {self.total} unfinished runs")
        if self.owned.get(owner, 0) >= self.per_key:
            raise TooManyRuns(
                f"{self.per_key} runs of this key are unfinished; wait for one or cancel one"
            )

    def hold(self, owner: str | None) -> None:
        self.count += 1
        self.owned[owner] = self.owned.get(owner, 0) + 1

    def release(self, owner: str | None) -> None:
        self.count -= 1
        left = self.owned.pop(owner, 0) - 1
        if left > 0:
            self.owned[owner] = left
