"""The shared run queue (streamsvc/runs/queue.py) on the tests' real Redis.

Executors here are names calling the queue as an executor process would: take with a free
slot, heartbeat, ack; one that stops heartbeating loses its run to ``reap``
(``interrupted``/``executor_lost``, with the terminal event its readers wait for).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from streamsvc.errors import Busy
from streamsvc.runs.manager import RunManager
from streamsvc.runs.queue import RunQueue, Taken
from streamsvc.runs.redis import RedisRunStore
from streamsvc.runs.store import RunRecord, StoredEvent
from streamsvc.settings import RunSettings
from streamsvc.web.sse import Event
from tests.harness import REDIS_URL

pytestmark = pytest.mark.redis

LEASE = 0.5


@pytest.fixture
async def store() -> AsyncIterator[RedisRunStore]:
    prefix = f"streamsvc-test:{uuid.uuid4().hex[:12]}:"
    opened = RedisRunStore.from_url(REDIS_URL, prefix=prefix, poll_seconds=0.1)
    await opened.open()
    yield opened
    await opened.aclose()
    async with aioredis.Redis.from_url(REDIS_URL) as r:
        keys = [key async for key in r.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await r.delete(*keys)


async def queued(store: RedisRunStore, queue: RunQueue) -> str:
    run = RunRecord(id=uuid.uuid4().hex, kind="connector", status="queued", created_at=time.time())
    await queue.enqueue(run, json.dumps({"run": run.id}).encode())  # and creates the record
    return run.id


async def test_each_run_goes_to_one_executor_and_leaves_on_ack(store: RedisRunStore) -> None:
    queue = RunQueue(store, capacity=10, lease_seconds=LEASE)
    await queue.open()
    await queue.open()  # idempotent
    ids = [await queued(store, queue) for _ in range(4)]
    assert await queue.depth() == (4, 0)
    taken = [await queue.take(name, 0.1) for name in ("exec-a", "exec-b", "exec-a", "exec-b")]
    assert [t.run_id for t in taken if t] == ids  # in order, each once
    assert await queue.take("exec-a", 0.1) is None
    assert await queue.depth() == (0, 4)
    first = taken[0]
    assert first is not None and json.loads(first.payload) == {"run": ids[0]}
    record = await store.get(ids[0])
    assert record is not None and record.executor == "exec-a"
    for t in taken:
        assert t is not None
        await queue.ack(t.entry)
    assert await queue.depth() == (0, 0)


async def test_capacity_is_global_and_frees_on_ack(store: RedisRunStore) -> None:
    queue = RunQueue(store, capacity=2, lease_seconds=LEASE)
    await queue.open()
    await queued(store, queue)
    await queued(store, queue)
    refused = RunRecord(id=uuid.uuid4().hex, kind="connector", status="queued", created_at=1.0)
    with pytest.raises(Busy) as full:
        await queue.enqueue(refused, b"{}")
    assert full.value.status == 429 and full.value.retry_after == 1
    assert await store.get(refused.id) is None  # created with the entry, gone with it
    taken = await queue.take("exec-a", 0.1)
    assert taken is not None
    with pytest.raises(Busy):  # running runs count too
        await queued(store, queue)
    await queue.ack(taken.entry)
    await queued(store, queue)


async def test_a_retried_enqueue_queues_the_run_once(store: RedisRunStore) -> None:
    """Redis may apply a transaction whose answer is lost: the retry must not queue twice."""
    queue = RunQueue(store, capacity=1, lease_seconds=LEASE)
    await queue.open()
    run = RunRecord(id=uuid.uuid4().hex, kind="connector", status="queued", created_at=1.0)
    entry = await queue.enqueue(run, b"{}")
    assert await queue.enqueue(run, b"{}") == entry  # not Busy either: the same entry
    assert await queue.depth() == (1, 0)


async def test_a_lapsed_lease_ends_the_run_executor_lost_once(store: RedisRunStore) -> None:
    queue = RunQueue(store, capacity=10, lease_seconds=LEASE)
    await queue.open()
    lost_id, kept_id = await queued(store, queue), await queued(store, queue)
    lost = await queue.take("exec-dead", 0.1)
    kept = await queue.take("exec-live", 0.1)
    assert lost is not None and kept is not None
    await store.mark_running(lost_id)
    await store.append(lost_id, [StoredEvent(1, "stdout", b'{"text": "hi\\n"}')])

    reaped: list[str] = []
    started = time.monotonic()
    with anyio.fail_after(LEASE * 6):
        while lost_id not in reaped:
            assert await queue.heartbeat("exec-live", [kept.entry], slots=2, running=1) == []
            reaped += await queue.reap("api-1")
            reaped += await queue.reap("api-2")  # a second noticer ends nothing more
            await anyio.sleep(LEASE / 5)
    assert time.monotonic() - started >= LEASE * 0.9
    assert reaped == [lost_id]

    ended = await store.get(lost_id)
    assert ended is not None and ended.status == "interrupted", ended
    replay = [(e.id, e.name) async for e in store.follow(lost_id, 0)]
    assert replay == [(1, "stdout"), (2, "error")]
    (last,) = [e async for e in store.follow(lost_id, 1)]
    assert json.loads(last.data)["error"]["code"] == "executor_lost"
    still = await store.get(kept_id)
    assert still is not None and still.status == "queued"  # the live executor's run is not
    # The dead executor comes back: its heartbeat says which run to clean up.
    assert await queue.heartbeat("exec-dead", [lost.entry], slots=2, running=1) == [lost.entry]
    assert await queue.depth() == (0, 1)


async def test_executors_are_listed_by_their_heartbeats(store: RedisRunStore) -> None:
    queue = RunQueue(store, lease_seconds=LEASE)
    await queue.open()
    await queue.heartbeat("exec-b", [], slots=4, running=0)
    await queue.heartbeat("exec-a", [], slots=2, running=0)
    seen = await queue.executors(within=5)
    assert [(s.name, s.slots) for s in seen] == [("exec-a", 2), ("exec-b", 4)]
    await anyio.sleep(0.3)
    await queue.heartbeat("exec-a", [], slots=2, running=1)
    assert [s.name for s in await queue.executors(within=0.2)] == ["exec-a"]


async def test_health_names_the_prefix_and_an_executor_whose_engine_is_down(
    store: RedisRunStore,
) -> None:
    queue = RunQueue(store, lease_seconds=LEASE)
    await queue.open()
    health = await queue.health()
    assert health["state"] == "degraded", health
    assert health["reason"].startswith("no executor seen"), health
    assert repr(store.prefix) in health["reason"], health  # an executor on another prefix
    await queue.heartbeat("exec-a", [], slots=2, running=0, engine="unavailable")
    await queue.heartbeat("exec-b", [], slots=2, running=0)
    health = await queue.health()
    assert health["state"] == "degraded", health
    assert health["reason"] == "Docker engine unavailable (DOCKER_HOST) on exec-a", health
    assert [e["engine"] for e in health["executors"]] == ["unavailable", "ready"], health
    await queue.heartbeat("exec-a", [], slots=2, running=0)  # its engine is back
    health = await queue.health()
    assert health["state"] == "ready" and "reason" not in health, health


async def test_cancel_reaches_the_executor_running_the_run_within_a_second(
    store: RedisRunStore,
) -> None:
    queue = RunQueue(store, lease_seconds=LEASE)
    await queue.open()
    run_id = await queued(store, queue)
    assert await queue.cancel(run_id) == 0  # queued: no executor to tell
    assert await queue.take("exec-b", 0.1) is not None
    heard: list[tuple[str, float]] = []
    arrived = anyio.Event()

    async def listen() -> None:
        async for cancelled in queue.control("exec-b"):
            heard.append((cancelled, time.monotonic()))
            arrived.set()
            return

    async with anyio.create_task_group() as tg:
        tg.start_soon(listen)
        for _ in range(100):  # until the subscription is in place
            sent = time.monotonic()
            if await queue.cancel(run_id):
                break
            await anyio.sleep(0.05)
        with anyio.fail_after(5):
            await arrived.wait()
    assert heard[0][0] == run_id and heard[0][1] - sent < 1.0


async def take(queue: RunQueue, into: list[Taken | None]) -> None:
    into.append(await queue.take("exec-a", 0.2))


async def withdraw(queue: RunQueue, run_id: str, into: list[bool]) -> None:
    await anyio.sleep(random.random() * 0.003)  # vary the interleaving
    into.append(await queue.withdraw(run_id, {"code": "cancelled", "message": "cancelled"}))


async def test_of_take_and_withdraw_racing_exactly_one_wins(store: RedisRunStore) -> None:
    api = RedisRunStore.from_url(REDIS_URL, prefix=store.key(""), poll_seconds=0.1)
    await api.open()  # the API node withdrawing: its own connections, as another process
    try:
        executor, node = RunQueue(store, capacity=10), RunQueue(api, capacity=10)
        await executor.open()
        outcomes = {"ran": 0, "withdrawn": 0}
        for _ in range(150):
            run_id = await queued(store, node)
            taken: list[Taken | None] = []
            withdrawn: list[bool] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(take, executor, taken)
                tg.start_soon(withdraw, node, run_id, withdrawn)
            got = taken[0]
            ran = got is not None and got.record is not None
            assert ran != withdrawn[0], (run_id, got, withdrawn)  # exactly one winner
            if got is not None:
                if ran:  # run it to its end, as the executor does
                    await store.mark_running(run_id)
                    await store.end(run_id, "completed", {"code": "none", "message": ""})
                await executor.ack(got.entry)
            record = await api.get(run_id)
            assert record is not None
            if ran:
                outcomes["ran"] += 1
                assert (record.status, record.executor) == ("completed", "exec-a"), record
            else:
                outcomes["withdrawn"] += 1
                assert (record.status, record.executor) == ("cancelled", None), record
        assert await executor.depth() == (0, 0)
        assert outcomes["ran"] and outcomes["withdrawn"], outcomes  # both sides won rounds
    finally:
        await api.aclose()


async def test_a_deleted_record_is_not_recreated_by_a_take(store: RedisRunStore) -> None:
    queue = RunQueue(store, lease_seconds=LEASE)
    await queue.open()
    run_id = await queued(store, queue)
    assert await store.delete(run_id)
    taken = await queue.take("exec-a", 0.1)
    assert taken is not None and taken.run_id == run_id and taken.record is None
    assert not await store.client.exists(store.key(f"run:{run_id}"))


async def test_a_run_nobody_takes_fails_queue_timeout_past_the_wait(store: RedisRunStore) -> None:
    wait = 0.5
    queue = RunQueue(store, capacity=10, lease_seconds=30, wait_seconds=wait)
    await queue.open()
    taken_id = await queued(store, queue)
    taken = await queue.take("exec-a", 0.1)  # taken: running, not waiting
    assert taken is not None and taken.run_id == taken_id
    run = RunRecord(id=uuid.uuid4().hex, kind="connector", status="queued", created_at=time.time())
    started = time.monotonic()
    await queue.enqueue(run, b"{}", env=b'{"TOKEN": "x"}')
    env_key = store.key(f"env:{run.id}")
    assert 0 < await store.client.ttl(env_key) <= int(wait) + 60  # follows the wait bound

    ended: list[str] = []
    with anyio.fail_after(5):
        while not ended:
            ended = await queue.reap("api-1")
            await anyio.sleep(0.05)
    assert time.monotonic() - started >= wait * 0.9
    assert ended == [run.id]
    record = await store.get(run.id)
    assert record is not None and record.status == "failed", record
    assert record.error is not None and json.loads(bytes(record.error))["code"] == "queue_timeout"
    assert not await store.client.exists(env_key)
    assert await queue.depth() == (0, 1)  # the running one stays
    still = await store.get(taken_id)
    assert still is not None and still.status == "queued" and still.executor == "exec-a"
    assert await queue.reap("api-2") == []  # once


async def test_a_cancel_heard_before_the_run_is_adopted_still_stops_it(
    store: RedisRunStore,
) -> None:
    """The API node publishes a cancel as soon as the record names the executor, which may
    be before that executor's manager adopted the run: the cancel must not be dropped."""
    run = RunRecord(id=uuid.uuid4().hex, kind="connector", status="queued", created_at=1.0)
    await store.create(run)
    settings = RunSettings(connector_grace_seconds=5)
    store.queued_kinds = frozenset({"connector"})  # as an executor's: queued runs are not ours
    async with RunManager(store, settings, b"k", name="exec-early") as manager:
        for _ in range(100):  # until the manager's subscription is up
            if await store.request_cancel(run.id, "exec-early"):
                break
            await anyio.sleep(0.05)
        await anyio.sleep(0.2)  # heard, with no such run here yet
        adopted = manager.adopt(run)
        never = anyio.Event()

        async def source() -> AsyncIterator[Event]:
            await never.wait()
            yield Event("done", {})

        manager.start(adopted, source())
        with anyio.fail_after(5):
            await adopted.done.wait()
    ended = await store.get(run.id)
    assert ended is not None and ended.status == "cancelled", ended
