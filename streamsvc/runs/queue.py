"""The shared queue of connector runs on Redis (issue 16): a stream read by a consumer group.

An executor takes a run when it has a free slot and heartbeats its lease; whoever notices a
lapsed one ends that run ``executor_lost``. Capacity, and each key's share, is global. Over
400 lines: the scripts stay with the queue that runs them (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import anyio
import msgspec
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from streamsvc.errors import Busy, QueueTimeout, RunStoreUnavailable, TooManyRuns
from streamsvc.runs.redis import RedisRunStore
from streamsvc.runs.store import RunRecord

GROUP = "executors"
log = logging.getLogger("streamsvc.runs")

# KEYS: queue, env key, record hash, the owner's active set. ARGV: capacity, run id,
# payload, env values (JSON, '' for none), their ttl, the per-key cap, the record key's
# prefix. Nil when full (entries live until acked), 0 when the owner has ``per_key``
# unfinished runs (the set drops ended or deleted ones as it is counted: at most ``per_key``
# lookups); the env values only when queued. The entry id is kept in the record, so a retry
# after a lost answer queues once.
_ENQUEUE = """
local queued = redis.call('HGET', KEYS[3], 'entry')
if queued then return string.sub(queued, 2, -2) end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local mine = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local status = redis.call('HGET', ARGV[7] .. id, 'status')
  if status == '"queued"' or status == '"running"' then
    mine = mine + 1
  else
    redis.call('SREM', KEYS[4], id)
  end
end
if mine >= tonumber(ARGV[6]) then return 0 end
redis.call('SADD', KEYS[4], ARGV[2])
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5]) end
local entry = redis.call('XADD', KEYS[1], '*', 'run', ARGV[2], 'payload', ARGV[3])
redis.call('HSET', KEYS[3], 'entry', '"' .. entry .. '"')
return entry
"""
#: Seconds a queued run's env values outlive its wait bound (the reaper withdraws it first).
ENV_TTL_MARGIN = 60
# KEYS: record hash, env key. ARGV: executor (JSON). The hand-off to an executor: it wins
# the record's ``claim`` field (HSETNX; ``withdraw`` sets it too) only while the run is queued
# and named no executor; a deleted record is not re-created. {1, record, env} or {0}.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= '"queued"' or redis.call('HGET', KEYS[1], 'executor') ~= 'null'
   or redis.call('HSETNX', KEYS[1], 'claim', ARGV[1]) == 0 then
  redis.call('DEL', KEYS[2])
  return {0}
end
redis.call('HSET', KEYS[1], 'executor', ARGV[1])
return {1, redis.call('HGETALL', KEYS[1]), redis.call('GETDEL', KEYS[2])}
"""
# KEYS: record hash. ARGV: the claim's value (false: no executor's). ``take``'s rival: 1 if
# the run is withdrawn.
_WITHDRAW = """
if redis.call('HGET', KEYS[1], 'status') ~= '"queued"'
   or redis.call('HGET', KEYS[1], 'executor') ~= 'null' then return 0 end
return redis.call('HSETNX', KEYS[1], 'claim', ARGV[1])
"""
# KEYS: queue. ARGV: group, executor, entry ids. Renews the entries this executor still
# owns (their idle time restarts) and returns the ids it lost to a reaper.
_HEARTBEAT = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 or p[1][2] ~= ARGV[2] then
    table.insert(lost, ARGV[i])
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return lost
"""


class Taken(msgspec.Struct, frozen=True):
    """A queued run handed to one executor: its queue entry, run id and payload; its record
    (None: deleted) and env values (taken out of Redis), read in the same round trip."""

    entry: str
    run_id: str
    payload: bytes
    record: RunRecord | None = None
    env: bytes | None = None


class ExecutorSeen(msgspec.Struct, frozen=True):
    """An executor as its last heartbeat described it (``/health`` lists these)."""

    name: str
    last_heartbeat: float
    slots: int
    running: int
    #: Its Docker engine as it last looked (``ready`` or ``unavailable``): runs it takes
    #: meanwhile fail ``sandbox_unavailable``.
    engine: str = "ready"


class RunQueue:
    """Connector runs waiting for an executor, on the store's Redis and key prefix.

    ``capacity`` bounds queued plus running runs across the cluster (past it: ``Busy``, 429),
    ``per_key`` those of one owner (past it: ``TooManyRuns``, 429: one key starves no other);
    ``lease_seconds`` is how long an executor may go without a heartbeat before its runs are
    ended ``executor_lost`` by whoever calls ``reap``; ``wait_seconds`` how long a run may
    wait untaken before ``reap`` withdraws it (``failed``, ``queue_timeout``).
    """

    def __init__(
        self,
        store: RedisRunStore,
        *,
        capacity: int = 64,
        per_key: int = 500,
        lease_seconds: float = 15.0,
        wait_seconds: float = 600.0,
    ) -> None:
        self._store = store
        self._redis = store.client
        self.capacity = capacity
        self.per_key = per_key
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.wait_ms = max(1, int(wait_seconds * 1000))
        self.env_ttl = int(wait_seconds) + ENV_TTL_MARGIN
        self.prefix = store.prefix
        self._queue = store.key("queue")
        self._executors = store.key("executors")
        self._enqueue = self._redis.register_script(_ENQUEUE)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._claim = self._redis.register_script(_CLAIM)
        self._withdraw = self._redis.register_script(_WITHDRAW)

    async def open(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            await self._store.call(
                lambda: self._redis.xgroup_create(self._queue, GROUP, id="0", mkstream=True)
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _env_key(self, run_id: str) -> str:
        return self._store.key(f"env:{run_id}")

    async def enqueue(
        self, record: RunRecord, payload: bytes, env: bytes = b"", *, followed: bool = False
    ) -> str:
        """Create the run's record and queue it, in one round trip; ``Busy`` (429,
        ``retry_after``) past the capacity, ``TooManyRuns`` past the owner's ``per_key``
        unfinished runs (the record is gone again either way). ``env``: the run's env
        values (JSON), kept apart from the payload until an executor takes them.
        ``followed``: a reader here follows it at once (``RedisRunStore.create_with``)."""
        run_id = record.id
        owner = "-" if record.owner is None else "k" + record.owner
        keys = [
            self._queue,
            self._env_key(run_id),
            self._store.key(f"run:{run_id}"),
            self._store.key(f"active:{owner}"),
        ]
        args: list[int | str | bytes] = [
            self.capacity, run_id, payload, env, self.env_ttl, self.per_key, self._store.key("run:")
        ]  # fmt: skip

        async def enqueue(pipe: Pipeline) -> None:
            await self._enqueue(keys=keys, args=args, client=pipe)

        entry = await self._store.create_with(record, enqueue, followed=followed)
        if entry is None:
            await self._store.delete(run_id)
            raise Busy("the run queue is full; try again shortly", retry_after=1)
        if entry == 0:
            await self._store.delete(run_id)
            raise TooManyRuns(
                f"{self.per_key} runs of this key are unfinished across the cluster; "
                "wait for one or cancel one",
                retry_after=1,
            )
        return str(entry.decode())

    async def take(self, executor: str, block_seconds: float = 1.0) -> Taken | None:
        """The next queued run for ``executor`` (call only with a free slot), or None after
        ``block_seconds``. The run's record names the executor from here on; a run withdrawn
        (or deleted, or ended) first comes with ``record`` None: ack it and skip it."""
        block = max(1, int(block_seconds * 1000))
        try:
            read = await self._store.call(
                lambda: self._redis.xreadgroup(
                    GROUP, executor, {self._queue: ">"}, count=1, block=block
                ),
                extra=block_seconds,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.open()  # Redis came back without the queue (no persistence)
            return None
        if not read:
            return None
        entry_id, fields = read[0][1][0]
        run_id = fields[b"run"].decode()
        keys = [self._store.key(f"run:{run_id}"), self._env_key(run_id)]
        args = [msgspec.json.encode(executor)]
        won = await self._store.call(lambda: self._claim(keys=keys, args=args))
        if won[0] != 1:
            return Taken(entry_id.decode(), run_id, fields[b"payload"])
        raw = dict(zip(won[1][::2], won[1][1::2], strict=True))
        env = won[2] if len(won) > 2 else None
        record = RedisRunStore.decode_record(raw)
        return Taken(entry_id.decode(), run_id, fields[b"payload"], record, env)

    async def withdraw(self, run_id: str, error: dict[str, Any]) -> bool:
        """End a run no executor took yet (cancelled, or waited too long): its entry and env
        values leave the queue. False if it had ended, or an executor has it now (of this and
        ``take``, exactly one wins: the record's ``claim`` field; the loser's caller asks that
        executor to cancel it instead)."""
        keys = [self._store.key(f"run:{run_id}")]
        won = await self._store.call(lambda: self._withdraw(keys=keys, args=[b"false"]))
        if won != 1:
            return False
        # The stream holds at most ``capacity`` entries: one bounded read finds the run's.
        entries = await self._store.call(
            lambda: self._redis.xrange(self._queue, "-", "+", count=self.capacity + 1)
        )
        for entry_id, fields in entries:
            if fields.get(b"run") == run_id.encode():
                await self._store.call(partial(self._redis.xdel, self._queue, entry_id))
        await self.drop_env(run_id)
        return await self._store.end(
            run_id, "cancelled" if error["code"] == "cancelled" else "failed", error
        )

    async def take_env(self, run_id: str) -> bytes | None:
        """The run's env values, deleted from Redis as they are read (None: none or gone)."""
        key = self._env_key(run_id)
        value = await self._store.call(lambda: self._redis.getdel(key))
        return None if value is None else bytes(value)

    async def drop_env(self, run_id: str) -> None:
        key = self._env_key(run_id)
        await self._store.call(lambda: self._redis.delete(key))

    async def heartbeat(
        self,
        executor: str,
        entries: Sequence[str],
        *,
        slots: int,
        running: int,
        engine: str = "ready",
    ) -> list[str]:
        """Renew the leases of ``entries``, say the executor (and its engine) is alive; returns
        the entries it lost (reaped as ``executor_lost``: kill their containers)."""
        seen = ExecutorSeen(executor, time.time(), slots, running, engine)
        await self._store.call(
            lambda: self._redis.hset(self._executors, executor, msgspec.json.encode(seen))
        )
        if not entries:
            return []
        keys, args = [self._queue], [GROUP, executor, *entries]
        lost = await self._store.call(lambda: self._heartbeat(keys=keys, args=args))
        return [entry.decode() for entry in lost]

    async def leave(self, executor: str) -> None:
        """An executor stopped cleanly: it leaves ``/health``'s list at once."""
        await self._store.call(lambda: self._redis.hdel(self._executors, executor))

    async def ack(self, entry: str) -> None:
        """The run ended on its executor: its entry leaves the queue."""

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._queue, GROUP, entry)
                pipe.xdel(self._queue, entry)
                return await pipe.execute()

        await self._store.call(run)

    async def reap(self, reaper: str) -> list[str]:
        """End the runs whose executor's lease lapsed (``interrupted``, ``executor_lost``;
        each is claimed first, so of several noticers one ends it), then withdraw those that
        waited untaken past ``wait_seconds``. Returns their run ids."""
        ended = await self._reap_lapsed(reaper)
        return ended + await self._withdraw_waiting()

    async def _withdraw_waiting(self) -> list[str]:
        """Withdraw (``failed``, ``queue_timeout``) the runs queued longer than the wait bound:
        entries no executor was given yet (after the group's last delivered id), whose ids
        begin with the time they were queued."""
        groups = await self._store.call(lambda: self._redis.xinfo_groups(self._queue))
        delivered = next(
            (g["last-delivered-id"] for g in groups if g["name"] == GROUP.encode()), b"0-0"
        )
        cutoff = int(time.time() * 1000) - self.wait_ms
        if cutoff <= int(delivered.split(b"-")[0]):
            return []
        start = b"(" + delivered
        entries = await self._store.call(
            lambda: self._redis.xrange(self._queue, start, cutoff, count=self.capacity)
        )
        error = {
            "code": QueueTimeout.code,
            "message": f"no executor took the run within {self.wait_ms / 1000:g} s "
            "(STREAMSVC_QUEUE_WAIT_SECONDS)",
        }
        withdrawn = []
        for _, fields in entries:
            run_id = fields[b"run"].decode()
            if await self.withdraw(run_id, error):
                withdrawn.append(run_id)
        return withdrawn

    async def _reap_lapsed(self, reaper: str) -> list[str]:
        stale = await self._store.call(
            lambda: self._redis.xpending_range(
                self._queue, GROUP, "-", "+", 100, idle=self.lease_ms
            )
        )
        ended: list[str] = []
        for pending in stale:
            entry, owner = pending["message_id"], pending["consumer"].decode()
            claimed = await self._store.call(
                partial(self._redis.xclaim, self._queue, GROUP, reaper, self.lease_ms, [entry])
            )
            if not claimed or claimed[0][1] is None:
                continue  # renewed meanwhile, another noticer's, or deleted
            run_id = claimed[0][1][b"run"].decode()
            error = {
                "code": "executor_lost",
                "message": f"executor {owner} stopped heartbeating (lease {self.lease_ms} ms)",
            }
            if await self._store.end(run_id, "interrupted", error):
                ended.append(run_id)
            await self.ack(entry.decode())
        return ended

    @contextlib.asynccontextmanager
    async def reaper(self, name: str, every: float) -> AsyncIterator[None]:
        """While inside, ``reap`` every ``every`` seconds (API nodes; executors reap too)."""

        async def loop() -> None:
            while True:
                try:
                    ended = await self.reap(name)
                    if ended:
                        log.warning("%d run(s) ended: lease lapsed or waited too long", len(ended))
                except RunStoreUnavailable as exc:
                    log.warning("reaping lapsed leases failed (%s)", exc)
                await anyio.sleep(every)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(loop)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()

    async def health(self) -> dict[str, Any]:
        """``/health``'s ``queue`` component: its depth and the executors seen within two
        leases (last heartbeat, slots, running, engine); ``degraded`` with none (the reason
        names the key prefix looked under) or with any whose engine does not answer."""
        try:
            with anyio.fail_after(1.0):
                waiting, running = await self.depth()
                seen = await self.executors(2 * self.lease_ms / 1000)
        except (RunStoreUnavailable, TimeoutError) as exc:
            return {"state": "unavailable", "reason": str(exc) or type(exc).__name__}
        down = [s.name for s in seen if s.engine != "ready"]
        report = {
            "state": "ready" if seen and not down else "degraded",
            "waiting": waiting,
            "running": running,
            "capacity": self.capacity,
            "executors": msgspec.to_builtins(seen),
        }
        if not seen:
            window = f"{2 * self.lease_ms / 1000:g}"
            report["reason"] = (
                f"no executor seen (none heartbeat within {window} s under the key prefix "
                f"{self.prefix!r}: same STREAMSVC_RUN_STORE on the executors?)"
            )
        elif down:
            report["reason"] = f"Docker engine unavailable (DOCKER_HOST) on {', '.join(down)}"
        return report

    async def executors(self, within: float) -> list[ExecutorSeen]:
        """Executors that heartbeat within the last ``within`` seconds."""
        raw = await self._store.call(lambda: self._redis.hgetall(self._executors))
        now = time.time()
        seen = [msgspec.json.decode(value, type=ExecutorSeen) for value in raw.values()]
        return sorted((s for s in seen if now - s.last_heartbeat <= within), key=lambda s: s.name)

    async def depth(self) -> tuple[int, int]:
        """(waiting, running): entries not yet taken, and taken but not acknowledged."""

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self._queue)
                pipe.xpending(self._queue, GROUP)
                return await pipe.execute()

        length, pending = await self._store.call(run)
        return length - pending["pending"], pending["pending"]

    async def cancel(self, run_id: str) -> int:
        """Tell the executor running ``run_id`` to stop it (a control message): how many
        executors heard it (0: none listening, e.g. the run is still queued)."""
        record = await self._store.get(run_id)
        if record is None or record.executor is None:
            return 0
        return await self._store.request_cancel(run_id, record.executor)

    def control(self, executor: str) -> AsyncIterator[str]:
        """Run ids whose cancel reached ``executor``, as they come (runs until cancelled)."""
        return self._store.cancels(executor)
