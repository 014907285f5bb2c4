"""The shared run store on Redis (``STREAMSVC_RUN_STORE=redis://...``; issue 16).

Records are hashes, each run's events a Redis Stream at ids ``<n>-0`` (n: the SSE id);
append and finish are Lua scripts. It and ``runs.queue`` alone import ``redis``. Over 400 lines:
the keys, the scripts and the store that owns them stay together (docs/architecture.md)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ConnectionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from streamsvc.errors import Busy, EventsExpired, RunNotFound, RunStoreUnavailable
from streamsvc.runs.live import Active
from streamsvc.runs.store import (
    CHECKPOINT_EVERY,
    FINISHED,
    RunFile,
    RunKind,
    RunRecord,
    RunStatus,
    StoredEvent,
)
from streamsvc.settings import SettingsError

SETTING = "STREAMSVC_RUN_STORE"
#: Events per read of ``follow``: the first read, then the next ones.
FIRST_BATCH, BATCH = 16, 512
#: Connections to Redis per process for everything but ``follow``'s blocking reads.
MAX_CONNECTIONS = 512
#: Readers one process follows from Redis at once (each blocking read holds a connection
#: of their own pool, so readers never starve the other calls); past it: ``Busy``, 429.
MAX_READERS = 448
#: Most events of one run held while Redis is away before ``append`` gives up (503).
BACKLOG = 10_000
#: Runs created for a reader here whose first look ``follow`` skips (the rest look).
MAX_FRESH = 4096
#: Seconds ``finish`` keeps trying to store a run's end (and its held events) while Redis
#: is away; past it the end is lost here and the run's lease lapses (``executor_lost``).
END_PATIENCE = 30.0
log = logging.getLogger("streamsvc.runs")
#: Seconds a run's files key outlives its record; more seconds allowed for a file's call.
FILES_TTL_MARGIN, FILE_CALL_EXTRA = 300, 10.0

#: Event names that end a run's log (``follow`` stops after one).
TERMINAL_EVENTS = frozenset({"done", "error"})
#: The fields of a record hash; each value is JSON (``RAW`` ones are given back undecoded).
FIELDS = tuple(f.name for f in msgspec.structs.fields(RunRecord))
RAW = frozenset({"result", "error"})
_LISTED = tuple(f for f in FIELDS if f not in {"result", "request"})
#: What ``interrupt_unfinished`` ends a dead process's run with (as the SQLite store does).
INTERRUPTED = {"code": "interrupted", "message": "the server stopped during the run"}

# KEYS: events stream, record hash. ARGV: id, name, data, id, name, data, ...
# Ids at or below the stored last one were stored by an earlier try: skipped (stored once).
# A run already ended (elsewhere: a lapsed lease, a cancel) takes no more: one terminal event.
_APPEND = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return redis.error_reply('NO_RUN') end
if status ~= '"queued"' and status ~= '"running"' then return redis.error_reply('ENDED') end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_event_id') or '0')
for i = 1, #ARGV, 3 do
  local id = tonumber(ARGV[i])
  if id > last then
    if id ~= last + 1 then return redis.error_reply('GAP after ' .. last .. ': ' .. id) end
    redis.call('XADD', KEYS[1], id .. '-0', 'e', ARGV[i + 1], 'd', ARGV[i + 2])
    last = id
  end
end
redis.call('HSET', KEYS[2], 'last_event_id', last)
return last
"""
# KEYS: record hash, events stream, unfinished set. ARGV: run id, record ttl, events ttl,
# a terminal event's name and data to add ('' for none), then field, value pairs. A
# finished run stays as it ended (the first end wins): returns 0 then.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= '"queued"' and status ~= '"running"' then return 0 end
if ARGV[4] ~= '' then
  local id = tonumber(redis.call('HGET', KEYS[1], 'last_event_id') or '0') + 1
  redis.call('XADD', KEYS[2], id .. '-0', 'e', ARGV[4], 'd', ARGV[5])
  redis.call('HSET', KEYS[1], 'last_event_id', id)
end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SREM', KEYS[3], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return 1
"""
_RUNNING = """
if redis.call('HGET', KEYS[1], 'status') ~= '"queued"' then return 0 end
redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[1])
return 1
"""


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


async def check_url(url: str) -> None:
    """Redis at ``url`` answers and takes its password: a ``SettingsError`` otherwise."""
    store = RedisRunStore.from_url(url)
    await store.open()
    await store.aclose()


def _flat(events: Sequence[StoredEvent]) -> list[bytes | str | int]:
    args: list[bytes | str | int] = []
    for event in events:
        args += [event.id, event.name, event.data]
    return args


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)


class RedisRunStore:
    """A ``RunStore`` on one Redis (or a managed one speaking its protocol).

    ``events_ttl``/``records_ttl`` (seconds, 0 = none) expire a finished run's events and
    record inside Redis; ``prune`` does the same on demand. ``poll_seconds`` bounds each
    blocking read of ``follow`` (it then looks at the record: finished, deleted, pruned).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        reads: aioredis.Redis | None = None,
        prefix: str = "streamsvc:",
        events_ttl: float = 0,
        records_ttl: float = 0,
        timeout: float = 5.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self._redis = client
        #: The blocking reads of ``follow`` (their own pool; ``client`` when not given).
        self._reads = client if reads is None else reads
        #: Readers following a run from Redis now (``admit_reader``).
        self.reading = 0
        self._url = "redis"
        self._prefix = prefix
        self._unfinished_key = f"{prefix}unfinished"
        self._events_ttl = int(events_ttl)
        self._records_ttl = int(max(records_ttl, events_ttl) if records_ttl else 0)
        self._timeout = timeout
        self._poll_ms = max(1, int(poll_seconds * 1000))
        self._append = client.register_script(_APPEND)
        self._finish = client.register_script(_FINISH)
        self._running = client.register_script(_RUNNING)
        #: The runs this process executes (readers here follow them in memory), and the
        #: events Redis has not acknowledged yet, per run.
        self._active = Active()
        self._unsent: dict[str, list[StoredEvent]] = {}
        #: Runs of this process marked running that Redis has not heard of yet (their
        #: ``started_at``): the writer sends the mark before their first events, or their
        #: end carries it (Redis away meanwhile).
        self._starting: dict[str, float] = {}
        #: Runs created here for a reader here (``create_with(followed=True)``), oldest first.
        self._fresh: dict[str, None] = {}
        #: Inside ``writer()``: appends return at once and one task writes them in batches.
        self._behind = False
        self._dirty = anyio.Event()
        self._inflight: dict[str, list[StoredEvent]] = {}
        self._looked_at = -1.0
        self._verdict: str | None = None
        #: Kinds whose unfinished runs are the queue's (leases), not ``interrupt_unfinished``'s.
        self.queued_kinds: frozenset[str] = frozenset()

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> RedisRunStore:
        """A store on ``url`` (redis:// or rediss://; password, db and ``?prefix=`` for the
        keys in it); ``open`` checks it. A malformed URL: a ``SettingsError`` naming the setting."""
        timeout = float(kw.get("timeout", 5.0))
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        for name, value in query:
            if name == "prefix":
                kw["prefix"] = value
        url = urlunsplit(parts._replace(query=urlencode([q for q in query if q[0] != "prefix"])))
        try:
            # Blocking: past its size a call waits (bounded) for a connection to come back.
            client, reads = (
                aioredis.Redis(
                    connection_pool=BlockingConnectionPool.from_url(
                        url,
                        max_connections=size,
                        timeout=timeout,
                        socket_timeout=timeout,
                        socket_connect_timeout=timeout,
                        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
                        retry_on_error=[ConnectionError, RedisTimeout],
                        health_check_interval=30,
                    )
                )
                for size in (MAX_CONNECTIONS, MAX_READERS)
            )
        except ValueError as exc:
            raise SettingsError(f"invalid setting {SETTING}={redact(url)}: {exc}") from None
        store = cls(client, reads=reads, **kw)
        store._url = redact(url)
        return store

    async def open(self) -> None:
        """Check that Redis answers (and takes the password): a ``SettingsError`` otherwise."""
        try:
            with anyio.fail_after(self._timeout * 2):
                await self._redis.ping()
        except AuthenticationError as exc:
            await self.aclose()
            message = f"{SETTING}={self._url}: Redis refused the password ({exc})"
            raise SettingsError(message) from None
        except (RedisError, OSError, TimeoutError) as exc:
            await self.aclose()
            reason = str(exc) or type(exc).__name__
            raise SettingsError(
                f"{SETTING}={self._url}: Redis does not answer ({reason})"
            ) from None

    # -- keys

    @property
    def client(self) -> aioredis.Redis:
        """The connection pool (``runs/queue.py`` shares it)."""
        return self._redis

    @property
    def prefix(self) -> str:
        """The prefix of every key (``?prefix=`` in the URL; nodes and executors must agree)."""
        return self._prefix

    def key(self, name: str) -> str:
        """A key of this store's namespace."""
        return f"{self._prefix}{name}"

    def _record_key(self, run_id: str) -> str:
        return f"{self._prefix}run:{run_id}"

    def _events_key(self, run_id: str) -> str:
        return f"{self._prefix}events:{run_id}"

    def _files_key(self, run_id: str) -> str:
        """A hash: file name to its bytes, NUL + name to its media type (names have no NUL)."""
        return f"{self._prefix}files:{run_id}"

    def _index_key(self, owner: str | None, *, every: bool = False) -> str:
        """Run ids by ``created_at``: of one owner (None: runs without one), or ``every`` run."""
        if every:
            return f"{self._prefix}runs"
        return f"{self._prefix}runs:owner:{'-' if owner is None else 'k' + owner}"

    # -- calls

    async def call(self, call: Callable[[], Awaitable[Any]], extra: float = 0.0) -> Any:
        """One bounded Redis call; a lost or late Redis is ``RunStoreUnavailable``."""
        try:
            with anyio.fail_after(self._timeout + extra):
                return await call()
        except (ConnectionError, RedisTimeout, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise RunStoreUnavailable(f"the run store (Redis) did not answer: {reason}") from None

    @staticmethod
    def _decode(raw: dict[bytes, bytes] | Sequence[bytes | None], fields: Sequence[str]) -> Any:
        pairs: dict[str, bytes]
        if isinstance(raw, dict):
            pairs = {k.decode(): v for k, v in raw.items()}
        else:
            pairs = {f: v for f, v in zip(fields, raw, strict=True) if v is not None}
        if "id" not in pairs:
            return None
        values = {k: msgspec.json.decode(v) for k, v in pairs.items() if k not in RAW}
        record = msgspec.convert(values, RunRecord)
        kept = {k: msgspec.Raw(v) for k, v in pairs.items() if k in RAW and v != b"null"}
        return msgspec.structs.replace(record, **kept) if kept else record

    @classmethod
    def decode_record(cls, raw: dict[bytes, bytes]) -> RunRecord | None:
        """A record hash as ``HGETALL`` gives it (None: no such run)."""
        record: RunRecord | None = cls._decode(raw, FIELDS)
        return record

    # -- the RunStore protocol

    async def create(self, record: RunRecord) -> None:
        await self.create_with(record)

    async def create_with(
        self,
        record: RunRecord,
        also: Callable[[Pipeline], Awaitable[None]] | None = None,
        *,
        followed: bool = False,
    ) -> Any:
        """``create``, and ``also``'s commands in the same transaction (their last answer is
        returned: one round trip for a queued run). ``followed``: a reader here follows the
        run at once, marked as one now, and its ``follow`` needs no first look at the record."""
        mapping = {f: _json(getattr(record, f)) for f in FIELDS}
        key = self._record_key(record.id)

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
                for index in (self._index_key(record.owner), self._index_key(None, every=True)):
                    pipe.zadd(index, {record.id: record.created_at})
                if record.status in FINISHED:
                    if self._records_ttl:
                        pipe.expire(key, self._records_ttl)
                else:
                    pipe.sadd(self._unfinished_key, record.id)
                if followed:
                    pipe.set(self.key(f"reader:{record.id}"), b"1", px=3 * self._poll_ms)
                if also is not None:
                    await also(pipe)
                answers: list[Any] = await pipe.execute()
                return answers

        answers = await self.call(run)
        if record.executor is not None and record.status not in FINISHED:
            self._active.create(record)  # executed here (a queued run names none yet)
        if followed:
            self._fresh[record.id] = None
            while len(self._fresh) > MAX_FRESH:
                del self._fresh[next(iter(self._fresh))]
        return answers[-1] if also is not None else None

    def adopt(self, record: RunRecord) -> None:
        """A run created elsewhere (queued) that this process now executes."""
        self._active.create(record)

    async def append(self, run_id: str, events: Sequence[StoredEvent]) -> None:
        """A run of this process: its readers here have the events at once; Redis gets
        them now, or with the next append or the finish if it is away (up to ``BACKLOG``)."""
        if not events:
            return
        if run_id not in self._active.records:
            await self._write(run_id, events)
            return
        self._active.append(run_id, events)
        unsent = self._unsent.setdefault(run_id, [])
        unsent.extend(events)
        if len(unsent) > BACKLOG:
            raise RunStoreUnavailable(f"run {run_id}: Redis took no events for too long")
        if self._behind:  # the writer task takes them (batched); the pump goes on
            self._dirty.set()
            return
        sendable = self._sendable(run_id)
        try:
            await self._write(run_id, sendable)
        except RunStoreUnavailable:
            self._unsent[run_id] = sendable + self._unsent.get(run_id, [])
            log.warning("run %s: Redis away, events held for the next write", run_id)

    def _sendable(self, run_id: str) -> list[StoredEvent]:
        """Take the run's held events before its terminal one, which waits for ``finish``
        (written with the end in one transaction: no node sees ``done`` on a running run)."""
        held = self._unsent.pop(run_id, [])
        cut = next((i for i, e in enumerate(held) if e.name in TERMINAL_EVENTS), len(held))
        if held[cut:]:
            self._unsent[run_id] = held[cut:]
        return held[:cut]

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[None]:
        """Write-behind for the runs this process executes, while inside (the app's
        lifespan): one task writes whatever events have queued, one pipeline per pass.
        On leaving, everything held is written (bounded) before Redis is closed."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._write_behind)
            self._behind = True
            try:
                yield
            finally:
                self._behind = False
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
                    for run_id in list(self._unsent):
                        await self._write(run_id, self._unsent.pop(run_id))
                tasks.cancel_scope.cancel()

    async def _write_behind(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            starting, self._starting = self._starting, {}
            batch = {run_id: self._sendable(run_id) for run_id in list(self._unsent)}
            batch = {run_id: events for run_id, events in batch.items() if events}
            self._inflight = batch
            try:
                await self._write_batch(starting, batch)
            except RunStoreUnavailable as exc:
                log.warning("Redis away (%s): %d run(s)' events held", exc, len(batch))
                # Back in front of what came meanwhile, for the runs still running here.
                for run_id, at in starting.items():
                    if run_id in self._active.records:
                        self._starting.setdefault(run_id, at)
                for run_id, events in batch.items():
                    if run_id in self._active.records:
                        self._unsent[run_id] = events + self._unsent.get(run_id, [])
                self._dirty.set()
                await anyio.sleep(0.2)
            finally:
                self._inflight = {}

    async def _write_batch(
        self, starting: dict[str, float], batch: dict[str, list[StoredEvent]]
    ) -> None:
        """One pipeline: the running marks, then the appends. A run whose script refused
        (deleted, or a gap: a bug) is logged and not tried again; Redis away raises."""
        if not starting and not batch:
            return

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for run_id, at in starting.items():
                    await self._queue_running(pipe, run_id, at)
                for run_id, events in batch.items():
                    keys = [self._events_key(run_id), self._record_key(run_id)]
                    await self._append(keys=keys, args=_flat(events), client=pipe)
                return await pipe.execute(raise_on_error=False)

        answers = await self.call(run)
        for run_id, answer in zip([*starting, *batch], answers, strict=True):
            if isinstance(answer, Exception) and "ENDED" in str(answer):
                log.warning("run %s: ended elsewhere (its lease lapsed?); events dropped", run_id)
            elif isinstance(answer, Exception):
                log.error("run %s: not stored: %s", run_id, answer)

    async def _queue_running(self, pipe: Pipeline, run_id: str, at: float) -> None:
        """Add the running mark of ``run_id`` (started at ``at``) to ``pipe``."""
        await self._running(keys=[self._record_key(run_id)], args=[_json(at)], client=pipe)

    async def _write(self, run_id: str, events: Sequence[StoredEvent]) -> None:
        args = _flat(events)
        keys = [self._events_key(run_id), self._record_key(run_id)]
        try:
            await self.call(lambda: self._append(keys=keys, args=args))
        except ResponseError as exc:
            if "NO_RUN" in str(exc):
                raise RunNotFound(f"no run {run_id}") from None
            if "ENDED" in str(exc):  # its end is stored: what comes after it is dropped
                log.warning("run %s: ended elsewhere; events dropped", run_id)
                return
            raise ValueError(f"run {run_id}: events out of order ({exc})") from None

    async def finish(
        self, run_id: str, status: RunStatus, *, result: Any = None, error: Any = None
    ) -> None:
        self._active.finish(run_id, status, result, error)  # readers here end now
        try:
            fields = {"status": status, "finished_at": time.time(), "result": result}
            fields |= {"error": error}
            started: float | None = None
            # Redis away: tried again (both scripts are idempotent) for END_PATIENCE.
            with anyio.move_on_after(END_PATIENCE) as patience:
                while True:
                    # What the writer holds too: a script skips ids Redis has.
                    unsent = self._inflight.get(run_id, []) + self._unsent.get(run_id, [])
                    started = self._starting.pop(run_id, None) or started
                    try:
                        await self._finish_fields(run_id, fields, events=unsent, started=started)
                        break
                    except RunStoreUnavailable as exc:
                        log.warning("run %s: its end waits for Redis (%s)", run_id, exc)
                        await anyio.sleep(0.5)
            if patience.cancelled_caught:
                raise RunStoreUnavailable(f"run {run_id}: Redis did not take its end in time")
        finally:
            self._unsent.pop(run_id, None)
            self._active.forget(run_id)  # stored (or hopeless): Redis answers from now on

    async def end(self, run_id: str, status: RunStatus, error: dict[str, Any]) -> bool:
        """End an unfinished run from outside its process: a terminal ``error`` event with
        ``{"error": error}`` and the status, in one script. False if it had ended already."""
        fields = {"status": status, "finished_at": time.time(), "error": error}
        terminal = ("error", msgspec.json.encode({"error": error}))
        try:
            return await self._finish_fields(run_id, fields, terminal)
        finally:
            self._active.forget(run_id)  # a reader here ends; Redis has the terminal event

    async def _finish_fields(
        self,
        run_id: str,
        fields: dict[str, Any],
        terminal: tuple[str, bytes] = ("", b""),
        events: Sequence[StoredEvent] = (),
        started: float | None = None,
    ) -> bool:
        """The end (after the running mark at ``started`` and ``events``, in the same
        transaction); False if it had ended."""
        keys = [self._record_key(run_id), self._events_key(run_id), self._unfinished_key]
        args: list[str | int | bytes] = [run_id, self._records_ttl, self._events_ttl, *terminal]
        for name, value in fields.items():
            args += [name, _json(value)]

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                if started is not None:
                    await self._queue_running(pipe, run_id, started)
                if events:
                    appended = [self._events_key(run_id), self._record_key(run_id)]
                    await self._append(keys=appended, args=_flat(events), client=pipe)
                await self._finish(keys=keys, args=args, client=pipe)
                return await pipe.execute(raise_on_error=False)

        answers = await self.call(run)
        for answer in answers:
            if isinstance(answer, ResponseError):
                log.error("run %s: not stored as it ended: %s", run_id, answer)
        return bool(answers[-1] == 1)

    async def mark_running(self, run_id: str) -> None:
        """Redis away: the run goes on; its ``started_at`` is stored with its end."""
        self._active.mark_running(run_id)
        started = time.time()
        if self._behind and run_id in self._active.records:  # with its first events
            self._starting[run_id] = started
            self._dirty.set()
            return
        keys = [self._record_key(run_id)]
        try:
            await self.call(lambda: self._running(keys=keys, args=[_json(started)]))
        except RunStoreUnavailable:
            if run_id not in self._active.records:
                raise
            self._starting[run_id] = started  # written with its end
            log.warning("run %s: Redis away as it started; its start is stored later", run_id)

    async def get(self, run_id: str) -> RunRecord | None:
        active = self._active.records.get(run_id)
        if active is not None:
            return active

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._record_key(run_id))
                pipe.exists(self._events_key(run_id))
                return await pipe.execute()

        raw, has_events = await self.call(run)
        record: RunRecord | None = self._decode(raw, FIELDS)
        if record is not None and self._expired(record, bool(has_events)):
            record = msgspec.structs.replace(record, events_expired=True)
        return record

    @staticmethod
    def _expired(record: RunRecord, has_events: bool) -> bool:
        """Pruned by ``prune``, or its events' TTL ran out before its record's."""
        return record.events_expired or (record.last_event_id > 0 and not has_events)

    async def follow(self, run_id: str, after: int) -> AsyncIterator[StoredEvent]:
        live = self._active.logs.get(run_id)
        if live is not None:  # a run of this process: its log here, no Redis round trip
            async for event in live.follow(after):
                yield event
            return
        fresh = run_id in self._fresh
        self._fresh.pop(run_id, None)
        if not fresh:  # not created here just now for this reader: look first
            record = await self._state(run_id, mark=True)  # and "a reader is here", one trip
            if record is None:
                raise RunNotFound(f"no run {run_id}")
            if record.events_expired:
                raise EventsExpired(f"the events of run {run_id} were pruned")
        self.admit_reader()  # the endpoint asked first (429); a burst past it ends here
        self.reading += 1
        try:
            async for event in self._read(run_id, after):
                yield event
        finally:
            self.reading -= 1

    def admit_reader(self) -> None:
        """Raise ``Busy`` (429) when this process follows ``MAX_READERS`` runs from Redis."""
        if self.reading >= MAX_READERS:
            raise Busy(
                f"this server follows {MAX_READERS} runs' events already; try again shortly",
                retry_after=1,
            )

    async def _read(self, run_id: str, after: int) -> AsyncIterator[StoredEvent]:
        key = self._events_key(run_id)
        cursor = max(after, 0)
        block = self._poll_ms / 1000
        count = FIRST_BATCH  # a resuming reader gets its first event soon, then bigger reads
        marked = time.monotonic()
        while True:
            if time.monotonic() - marked >= block:  # "a reader is here", for the running node
                marked = time.monotonic()
                await self.call(partial(self._mark_reader, run_id))
            read = await self.call(
                partial(self._reads.xread, {key: f"{cursor}-0"}, count=count, block=self._poll_ms),
                extra=block,
            )
            count = BATCH
            entries = read[0][1] if read else []
            for given, (entry_id, fields) in enumerate(entries, 1):
                event = StoredEvent(
                    int(entry_id.split(b"-")[0]), fields[b"e"].decode(), fields[b"d"]
                )
                cursor = event.id
                yield event
                if event.name in TERMINAL_EVENTS:
                    return
                if given % CHECKPOINT_EVERY == 0:  # a client gone: its cancel gets in
                    await anyio.lowlevel.checkpoint()
            if entries:
                continue
            record = await self._state(run_id)
            if record is None:
                return  # deleted meanwhile
            if record.status in FINISHED and cursor >= record.last_event_id:
                return
            if record.events_expired:
                raise EventsExpired(f"the events of run {run_id} were pruned")

    async def _state(self, run_id: str, *, mark: bool = False) -> RunRecord | None:
        """The record without its request and result (what ``follow`` looks at); ``mark``:
        and mark a reader (``read_elsewhere``) in the same round trip."""

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hmget(self._record_key(run_id), list(_LISTED))
                pipe.exists(self._events_key(run_id))
                if mark:
                    pipe.set(self.key(f"reader:{run_id}"), b"1", px=3 * self._poll_ms)
                return await pipe.execute()

        raw, has_events, *_ = await self.call(run)
        record: RunRecord | None = self._decode(raw, _LISTED)
        if record is not None and self._expired(record, bool(has_events)):
            record = msgspec.structs.replace(record, events_expired=True)
        return record

    async def _mark_reader(self, run_id: str) -> None:
        await self._redis.set(self.key(f"reader:{run_id}"), b"1", px=3 * self._poll_ms)

    async def read_elsewhere(self, run_id: str) -> bool:
        """Whether a reader on another node followed the run within the last few polls (the
        node running it does not cancel it as abandoned then)."""
        try:
            key = self.key(f"reader:{run_id}")
            return bool(await self.call(partial(self._redis.exists, key)))
        except RunStoreUnavailable:
            return False  # Redis away: nobody can be reading through it

    async def request_cancel(self, run_id: str, executor: str) -> int:
        """Ask the process running ``run_id`` (its record's ``executor``) to cancel it; how
        many processes heard (0: none listening)."""
        channel = self.key(f"control:{executor}")
        return int(await self.call(partial(self._redis.publish, channel, run_id)))

    async def cancels(self, executor: str) -> AsyncIterator[str]:
        """Run ids whose cancel was asked of ``executor``, as they come; subscribes again
        after Redis was away. Runs until cancelled."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await self.call(partial(pubsub.subscribe, self.key(f"control:{executor}")))
                while True:
                    message = await self.call(
                        partial(pubsub.get_message, ignore_subscribe_messages=True, timeout=1.0),
                        extra=1.0,
                    )
                    if message is not None and message["type"] == "message":
                        yield message["data"].decode()
            except RunStoreUnavailable:
                await anyio.sleep(1.0)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await pubsub.aclose()

    async def find(
        self,
        *,
        owner: str | None,
        kind: RunKind | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        index = self._index_key(owner)
        top: float | str = "+inf"
        if before is not None:
            score = await self.call(lambda: self._redis.zscore(index, before))
            if score is None:
                return []
            top = score
        found: list[RunRecord] = []
        offset, batch = 0, max(limit * 2, 64)
        while len(found) < limit:
            ids = await self.call(
                partial(
                    self._redis.zrevrangebyscore,
                    index,
                    top,
                    "-inf",
                    start=offset,
                    num=batch,
                    withscores=True,
                )
            )
            if not ids:
                break
            offset += len(ids)
            if before is not None:  # equal scores come in reverse order of ids
                ids = [(m, s) for m, s in ids if not (s == top and m.decode() >= before)]
            records = await self._records([m.decode() for m, _ in ids], _LISTED)
            stale = [m for (m, _), r in zip(ids, records, strict=True) if r is None]
            if stale:
                await self.call(partial(self._redis.zrem, index, *stale))
                offset -= len(stale)
            for record in records:
                if record is None or record.owner != owner:
                    continue
                if (kind is None or record.kind == kind) and (
                    status is None or record.status == status
                ):
                    found.append(record)
        return found[:limit]

    async def _records(self, ids: Sequence[str], fields: Sequence[str]) -> list[RunRecord | None]:
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for run_id in ids:
                    pipe.hmget(self._record_key(run_id), list(fields))
                return await pipe.execute()

        return [self._decode(raw, fields) for raw in await self.call(run)] if ids else []

    async def delete(self, run_id: str) -> bool:
        self._active.forget(run_id)
        self._unsent.pop(run_id, None)
        self._starting.pop(run_id, None)
        record = await self.get(run_id)
        if record is None:
            return False

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(
                    self._record_key(run_id), self._events_key(run_id), self._files_key(run_id)
                )
                pipe.zrem(self._index_key(record.owner), run_id)
                pipe.zrem(self._index_key(None, every=True), run_id)
                pipe.srem(self._unfinished_key, run_id)
                return await pipe.execute()

        return bool((await self.call(run))[0])

    async def put_file(self, run_id: str, name: str, data: bytes, media_type: str) -> None:
        """One hash field; the key outlives the record's TTL a little (the record, read
        first, decides whether the file is visible)."""
        key = self._files_key(run_id)

        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={name: data, "\x00" + name: media_type})
                if self._records_ttl:
                    pipe.expire(key, self._records_ttl + FILES_TTL_MARGIN)
                await pipe.execute()

        await self.call(run, extra=FILE_CALL_EXTRA)

    async def get_file(self, run_id: str, name: str) -> RunFile | None:
        key = self._files_key(run_id)
        data, media_type = await self.call(
            lambda: self._redis.hmget(key, [name, "\x00" + name]), extra=FILE_CALL_EXTRA
        )
        if data is None or media_type is None:
            return None
        return RunFile(name, media_type.decode(), data)

    async def interrupt_unfinished(self, alive: Callable[[str], bool]) -> list[str]:
        members = await self.call(lambda: self._redis.smembers(self._unfinished_key))
        ids = sorted(m.decode() for m in members)
        interrupted = []
        for run_id, record in zip(ids, await self._records(ids, _LISTED), strict=True):
            if record is None:
                await self.call(partial(self._redis.srem, self._unfinished_key, run_id))
                continue
            if run_id in self._active.records or record.kind in self.queued_kinds:
                continue  # this process runs it, or the queue's leases judge it
            if record.executor is not None and alive(record.executor):
                continue
            if await self.end(run_id, "interrupted", INTERRUPTED):
                interrupted.append(run_id)
        return interrupted

    async def prune(self, events_before: float, records_before: float) -> int:
        index = self._index_key(None, every=True)
        cutoff = max(events_before, records_before)
        candidates = await self.call(lambda: self._redis.zrangebyscore(index, "-inf", cutoff))
        ids = [m.decode() for m in candidates]
        fields = ("id", "kind", "created_at", "owner", "status", "finished_at", "events_expired")
        touched = 0
        for run_id, record in zip(ids, await self._records(ids, fields), strict=True):
            if record is None:
                await self.call(partial(self._redis.zrem, index, run_id))
                continue
            if record.status not in FINISHED or record.finished_at is None:
                continue
            if record.finished_at < records_before:
                touched += await self.delete(run_id)
            elif record.finished_at < events_before and not record.events_expired:
                await self.call(partial(self._drop_events, run_id))
                touched += 1
        return touched

    async def _drop_events(self, run_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._events_key(run_id))
            pipe.hset(self._record_key(run_id), "events_expired", b"true")
            await pipe.execute()

    async def health(self) -> dict[str, Any]:
        """``/health``'s ``runs`` component: whether Redis answers a ping (bounded at 1 s;
        one look per second at most), the runs executed here and the events they hold."""
        now = time.monotonic()
        if now - self._looked_at >= 1.0:
            self._looked_at = now
            try:
                with anyio.fail_after(1.0):
                    await self._redis.ping()
                self._verdict = None
            except (RedisError, OSError, TimeoutError) as exc:
                self._verdict = str(exc) or type(exc).__name__
        held = sum(map(len, self._unsent.values()))
        report: dict[str, Any] = {
            "state": "ready" if self._verdict is None else "unavailable",
            "store": "redis",
            "url": self._url,
            "prefix": self._prefix,
            "running_here": len(self._active.records),
            "held_events": held,
        }
        if self._verdict is not None:
            report["reason"] = self._verdict
        return report

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
            for client in {id(c): c for c in (self._redis, self._reads)}.values():
                await client.aclose()
                await client.connection_pool.disconnect()
