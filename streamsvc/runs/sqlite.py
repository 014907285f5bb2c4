"""The embedded run store: SQLite in WAL mode, one writer thread, reads in worker threads.

Runs this process executes are served from memory (``live.Active``) while their writes queue;
the writer commits whatever has queued in one short transaction. Nothing runs on the event loop.
Over 400 lines: the schema and its queries stay together with the store that owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import msgspec

from streamsvc.errors import EventsExpired, RunNotFound
from streamsvc.runs.live import Active
from streamsvc.runs.memory import page
from streamsvc.runs.store import (
    CHECKPOINT_EVERY,
    FINISHED,
    RunFile,
    RunKind,
    RunRecord,
    RunStatus,
    StoredEvent,
    executor_alive,
)

log = logging.getLogger("streamsvc.runs")

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], object]

#: How long the writer lets writes gather after the first one before it commits them.
COALESCE_SECONDS = 0.005
#: Longest wait for the writer to commit something a caller waits for.
WRITE_TIMEOUT = 30.0
#: How often a reader polls for the events of a run another process executes.
POLL_SECONDS = 0.2
#: Chunks (each the events of one commit) read per query when replaying; the first query
#: reads fewer, so a resume's first event comes back quickly.
PAGE = 64
#: Seconds between two looks for cancels another worker process asked of this one.
CANCEL_POLL = 0.25
#: Seconds between two marks of a reader following a run another process executes; a mark
#: counts for three (``read_elsewhere``: the running process does not abandon the run).
READER_MARK = 1.0
FIRST_PAGE = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, last_event_id INTEGER NOT NULL DEFAULT 0, owner TEXT,
    background INTEGER NOT NULL DEFAULT 0, request BLOB, result BLOB, error BLOB, executor TEXT,
    events_expired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_newest ON runs (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS runs_finished ON runs (finished_at);
CREATE TABLE IF NOT EXISTS cancels (
    run_id TEXT NOT NULL, executor TEXT NOT NULL, asked_at REAL NOT NULL,
    PRIMARY KEY (run_id, executor)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readers (
    run_id TEXT PRIMARY KEY, seen REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    run_id TEXT NOT NULL, last_id INTEGER NOT NULL, events BLOB NOT NULL,
    PRIMARY KEY (run_id, last_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    run_id TEXT NOT NULL, name TEXT NOT NULL, media_type TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""
_COLUMNS = (
    "id, kind, status, created_at, started_at, finished_at, last_event_id, owner, background,"
    " request, result, error, executor, events_expired"
)
_encode = msgspec.json.Encoder().encode
_INTERRUPTED = msgspec.json.encode(
    {"error": {"code": "interrupted", "message": "the server stopped during the run"}}
)


_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder(list[StoredEvent])


def _pack(events: Sequence[StoredEvent]) -> bytes:
    return _packer.encode(events)


def _unpack(chunk: bytes) -> list[StoredEvent]:
    return _unpacker.decode(chunk)


def _blob(value: Any) -> bytes | None:
    return None if value is None else _encode(value)


def _row(record: RunRecord) -> tuple[Any, ...]:
    return (
        record.id, record.kind, record.status, record.created_at, record.started_at,
        record.finished_at, record.last_event_id, record.owner, int(record.background),
        _blob(record.request), _blob(record.result), _blob(record.error), record.executor,
        int(record.events_expired),
    )  # fmt: skip


def _record(row: Sequence[Any]) -> RunRecord:
    request, result, error = row[9], row[10], row[11]
    return RunRecord(
        id=row[0], kind=row[1], status=row[2], created_at=row[3], started_at=row[4],
        finished_at=row[5], last_event_id=row[6], owner=row[7], background=bool(row[8]),
        request=None if request is None else msgspec.json.decode(request),
        result=None if result is None else msgspec.Raw(result),
        error=None if error is None else msgspec.Raw(error),
        executor=row[12], events_expired=bool(row[13]),
    )  # fmt: skip


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class _Append(NamedTuple):
    run_id: str
    events: Sequence[StoredEvent]


_Item = tuple[_Op | _Append, Callable[[], None] | None]


class _Writer(threading.Thread):
    """The one writer: takes every queued operation, commits them in one transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="streamsvc-run-store", daemon=True)
        self.path = path
        self._ready = threading.Condition()
        self._items: list[_Item | None] = []

    def put(self, item: _Item | None) -> None:
        """Queue a write (None: stop after the queued ones); wakes the writer when idle."""
        with self._ready:
            self._items.append(item)
            if len(self._items) == 1:
                self._ready.notify()

    def run(self) -> None:
        conn = connect(self.path)
        try:
            while True:
                with self._ready:
                    while not self._items:
                        self._ready.wait()
                time.sleep(COALESCE_SECONDS)  # let a busy stream's appends gather (GIL released)
                with self._ready:
                    batch, self._items = self._items, []
                work = [item for item in batch if item is not None]
                self._commit(conn, work)
                for _, done in work:
                    if done is not None:
                        done()
                if None in batch:
                    return
        finally:
            conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, work: list[_Item]) -> None:
        """One transaction; consecutive appends (of any runs) become one insert and one
        ``last_event_id`` update per run, the rest run in order, each in a savepoint."""
        pending: list[_Append] = []

        def flush() -> None:
            if pending:
                by_run: dict[str, list[StoredEvent]] = {}
                for append in pending:
                    by_run.setdefault(append.run_id, []).extend(append.events)
                _guarded(conn, lambda c: _insert_chunks(c, by_run))
                pending.clear()

        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _ in work:
                if isinstance(op, _Append):
                    pending.append(op)
                    continue
                flush()
                _guarded(conn, op)
            flush()
            conn.execute("COMMIT")
        except sqlite3.Error:
            log.exception("a run-store transaction failed")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")


def _guarded(conn: sqlite3.Connection, op: _Op) -> None:
    conn.execute("SAVEPOINT op")
    try:
        op(conn)
    except sqlite3.Error:
        log.exception("a run-store write failed; it was skipped")
        conn.execute("ROLLBACK TO op")
    conn.execute("RELEASE op")


def _insert_chunks(conn: sqlite3.Connection, by_run: dict[str, list[StoredEvent]]) -> None:
    """Each run's events of one commit as one row (a *chunk*, keyed by its last id): a few
    rows instead of one per event keeps the writer's work, and its hold on the GIL, small."""
    conn.executemany(
        "INSERT INTO chunks (run_id, last_id, events) VALUES (?,?,?)",
        [(run_id, events[-1].id, _pack(events)) for run_id, events in by_run.items()],
    )
    conn.executemany(
        "UPDATE runs SET last_event_id = ? WHERE id = ?",
        [(events[-1].id, run_id) for run_id, events in by_run.items()],
    )


class SqliteStore:
    """A ``RunStore`` in one SQLite file; ``open`` before use, ``aclose`` after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._active = Active()
        self._writer = _Writer(path)
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await anyio.to_thread.run_sync(self._prepare)
        self._writer.start()

    def _prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = connect(self.path)
        try:
            conn.executescript(SCHEMA)
        finally:
            conn.close()

    # -- plumbing ------------------------------------------------------------------------

    def _submit(self, op: _Op) -> None:
        self._writer.put((op, None))

    async def _write(self, op: _Op) -> None:
        """Queue ``op`` and wait until it is committed."""
        assert self._loop is not None, "open() the store first"
        loop = self._loop
        future: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            def settle() -> None:
                if not future.done():
                    future.set_result(None)

            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle)

        self._writer.put((op, done))
        with anyio.fail_after(WRITE_TIMEOUT):
            await future

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = connect(self.path)
        try:
            yield conn
        finally:
            with self._lock:
                self._readers.append(conn)

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._reader() as conn:
                return query(conn)

        return await anyio.to_thread.run_sync(run)

    # -- the protocol --------------------------------------------------------------------

    async def create(self, record: RunRecord) -> None:
        self._active.create(record)
        row = _row(record)
        insert = f"INSERT INTO runs ({_COLUMNS}) VALUES ({','.join('?' * len(row))})"  # noqa: S608
        self._submit(lambda c: c.execute(insert, row))

    async def append(self, run_id: str, events: Sequence[StoredEvent]) -> None:
        if not events:
            return
        self._active.append(run_id, events)
        self._writer.put((_Append(run_id, events), None))

    async def mark_running(self, run_id: str) -> None:
        self._active.mark_running(run_id)
        record = self._active.records.get(run_id)
        if record is not None:
            values = (record.status, record.started_at, run_id)
            update = "UPDATE runs SET status=?, started_at=? WHERE id=?"
            self._submit(lambda c: c.execute(update, values))

    async def finish(
        self, run_id: str, status: RunStatus, *, result: Any = None, error: Any = None
    ) -> None:
        record = self._active.finish(run_id, status, result, error)
        if record is None:
            return
        values = (status, record.finished_at, _blob(result), _blob(error), run_id)
        try:
            await self._write(
                lambda c: c.execute(
                    "UPDATE runs SET status=?, finished_at=?, result=?, error=? WHERE id=?", values
                )
            )
        finally:
            self._active.forget(run_id)  # committed (or hopeless): the file answers from now on

    async def get(self, run_id: str) -> RunRecord | None:
        record = self._active.records.get(run_id)
        if record is not None:
            return record
        return await self._read(lambda c: _get(c, run_id))

    async def follow(self, run_id: str, after: int) -> AsyncIterator[StoredEvent]:
        live = self._active.logs.get(run_id)
        if live is not None:
            async for event in live.follow(after):
                yield event
            return
        limit = FIRST_PAGE  # a small first page: the first event comes back quickly
        given = 0
        marked = -READER_MARK
        while True:
            read = functools.partial(_events, run_id=run_id, after=after, limit=limit)
            record, rows = await self._read(read)
            if record is None:
                raise RunNotFound(f"no run {run_id}")
            if record.events_expired:
                raise EventsExpired(f"the events of run {run_id} were pruned")
            for chunk in rows:
                for event in _unpack(chunk):
                    if event.id > after:
                        yield event
                        after = event.id
                        given += 1
                        if given % CHECKPOINT_EVERY == 0:  # a client gone: its cancel gets in
                            await anyio.lowlevel.checkpoint()
            if len(rows) < limit:
                if record.status in FINISHED:
                    return
                if time.monotonic() - marked >= READER_MARK:  # "a reader is here" (not waited)
                    marked = time.monotonic()
                    self._submit(functools.partial(_mark_reader, run_id=run_id, at=time.time()))
                await anyio.sleep(POLL_SECONDS)  # run by another process: poll the file
            limit = PAGE

    async def find(
        self,
        *,
        owner: str | None,
        kind: RunKind | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        cursor: tuple[float, str] | None = None
        if before is not None:
            mark = await self.get(before)
            if mark is None:
                return []
            cursor = (mark.created_at, mark.id)
        stored = await self._read(lambda c: _find(c, owner, kind, status, limit, cursor))
        merged = {r.id: r for r in stored} | dict(self._active.records)
        chosen = page(list(merged.values()), owner, kind, status, len(merged), None)
        if cursor is not None:
            chosen = [r for r in chosen if (r.created_at, r.id) < cursor]
        return chosen[:limit]

    async def delete(self, run_id: str) -> bool:
        found = await self.get(run_id) is not None
        self._active.forget(run_id)
        await self._write(lambda c: _delete(c, [run_id]))
        return found

    async def put_file(self, run_id: str, name: str, data: bytes, media_type: str) -> None:
        """Written by the writer thread (after the run's row: same queue), waited for."""
        row = (run_id, name, media_type, data)
        await self._write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO files (run_id, name, media_type, data) VALUES (?,?,?,?)",
                row,
            )
        )

    async def get_file(self, run_id: str, name: str) -> RunFile | None:
        def query(conn: sqlite3.Connection) -> RunFile | None:
            row = conn.execute(
                "SELECT media_type, data FROM files WHERE run_id = ? AND name = ?", (run_id, name)
            ).fetchone()
            return None if row is None else RunFile(name, row[0], bytes(row[1]))

        return await self._read(query)

    async def interrupt_unfinished(self, alive: Callable[[str], bool]) -> list[str]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT id, executor FROM runs WHERE status IN ('queued', 'running')"
            ).fetchall()
        )
        dead = [
            run_id
            for run_id, executor in rows
            if run_id not in self._active.records and (executor is None or not alive(executor))
        ]
        now = time.time()

        def interrupt(conn: sqlite3.Connection) -> None:
            for run_id in dead:
                (last,) = conn.execute(
                    "SELECT COALESCE(MAX(last_id), 0) FROM chunks WHERE run_id = ?", (run_id,)
                ).fetchone()
                _insert_chunks(conn, {run_id: [StoredEvent(last + 1, "error", _INTERRUPTED)]})
                conn.execute(
                    "UPDATE runs SET status='interrupted', finished_at=?, last_event_id=?,"
                    " error=? WHERE id=?",
                    (now, last + 1, _encode(msgspec.json.decode(_INTERRUPTED)["error"]), run_id),
                )

        if dead:
            await self._write(interrupt)
        return dead

    async def read_elsewhere(self, run_id: str) -> bool:
        """Whether a reader in another worker process followed the run lately (its mark)."""
        since = time.time() - 3 * READER_MARK
        query = "SELECT 1 FROM readers WHERE run_id = ? AND seen >= ?"
        found = await self._read(lambda c: c.execute(query, (run_id, since)).fetchone())
        return found is not None

    async def request_cancel(self, run_id: str, executor: str) -> int:
        """A row the process ``executor`` polls for (``cancels``); 0 when it is gone."""
        if not executor_alive(executor):
            return 0
        asked = (run_id, executor, time.time())
        await self._write(
            lambda c: c.execute("INSERT OR REPLACE INTO cancels VALUES (?, ?, ?)", asked)
        )
        return 1

    async def cancels(self, executor: str) -> AsyncIterator[str]:
        """Polls the cancels asked of ``executor`` every ``CANCEL_POLL`` seconds."""
        query = "SELECT run_id FROM cancels WHERE executor = ?"
        while True:
            await anyio.sleep(CANCEL_POLL)
            rows = await self._read(lambda c: c.execute(query, (executor,)).fetchall())
            if not rows:
                continue
            await self._write(functools.partial(_forget_cancels, asked=rows, executor=executor))
            for (run_id,) in rows:
                yield run_id

    async def prune(self, events_before: float, records_before: float) -> int:
        touched: list[int] = [0]

        def prune(conn: sqlite3.Connection) -> None:
            gone = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM runs WHERE finished_at < ? AND status IN"
                    " ('completed', 'failed', 'cancelled', 'interrupted')",
                    (records_before,),
                )
            ]
            _delete(conn, gone)
            expired = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM runs WHERE finished_at < ? AND events_expired = 0 AND status"
                    " IN ('completed', 'failed', 'cancelled', 'interrupted')",
                    (events_before,),
                )
            ]
            for run_id in expired:
                conn.execute("DELETE FROM chunks WHERE run_id = ?", (run_id,))
                conn.execute("UPDATE runs SET events_expired = 1 WHERE id = ?", (run_id,))
            touched[0] = len(gone) + len(expired)

        await self._write(prune)
        return touched[0]

    def writer(self) -> AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # its writer thread batches already

    async def health(self) -> dict[str, Any] | None:
        return None

    def adopt(self, record: RunRecord) -> None:
        raise NotImplementedError("runs are queued for executors on the Redis store only")

    async def aclose(self) -> None:
        if self._writer.is_alive():
            self._writer.put(None)
            with anyio.CancelScope(shield=True), anyio.move_on_after(WRITE_TIMEOUT):
                await anyio.to_thread.run_sync(self._writer.join)
        with self._lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()


def _forget_cancels(conn: sqlite3.Connection, asked: list[Any], executor: str) -> None:
    delete = "DELETE FROM cancels WHERE run_id = ? AND executor = ?"
    conn.executemany(delete, [(run_id, executor) for (run_id,) in asked])


def _get(conn: sqlite3.Connection, run_id: str) -> RunRecord | None:
    query = f"SELECT {_COLUMNS} FROM runs WHERE id = ?"  # noqa: S608 (constant columns)
    row = conn.execute(query, (run_id,)).fetchone()
    return None if row is None else _record(row)


def _events(
    conn: sqlite3.Connection, *, run_id: str, after: int, limit: int
) -> tuple[RunRecord | None, list[bytes]]:
    """The record and the next page of events, read in one snapshot (a finished record
    read first means every one of its events is in the snapshot)."""
    conn.execute("BEGIN")
    try:
        record = _get(conn, run_id)
        rows = conn.execute(
            "SELECT events FROM chunks WHERE run_id = ? AND last_id > ? ORDER BY last_id LIMIT ?",
            (run_id, after, limit),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return record, [row[0] for row in rows]


def _find(
    conn: sqlite3.Connection,
    owner: str | None,
    kind: RunKind | None,
    status: RunStatus | None,
    limit: int,
    cursor: tuple[float, str] | None,
) -> list[RunRecord]:
    where = ["owner IS ?"]
    args: list[Any] = [owner]
    if kind is not None:
        where.append("kind = ?")
        args.append(kind)
    if status is not None:
        where.append("status = ?")
        args.append(status)
    if cursor is not None:
        where.append("(created_at, id) < (?, ?)")
        args += list(cursor)
    columns = _COLUMNS.replace(" request, result,", " NULL, NULL,")
    rows = conn.execute(
        f"SELECT {columns} FROM runs WHERE {' AND '.join(where)}"  # noqa: S608 (fixed clauses)
        " ORDER BY created_at DESC, id DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [_record(row) for row in rows]


def _mark_reader(conn: sqlite3.Connection, run_id: str, at: float) -> None:
    conn.execute("INSERT OR REPLACE INTO readers VALUES (?, ?)", (run_id, at))


def _delete(conn: sqlite3.Connection, run_ids: list[str]) -> None:
    for run_id in run_ids:
        conn.execute("DELETE FROM chunks WHERE run_id = ?", (run_id,))
        conn.execute("DELETE FROM files WHERE run_id = ?", (run_id,))
        conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        conn.execute("DELETE FROM cancels WHERE run_id = ?", (run_id,))
        conn.execute("DELETE FROM readers WHERE run_id = ?", (run_id,))
