"""The run store contract (streamsvc/runs/store.py) on every backend: memory, SQLite, Redis.

Each backend is a factory in ``BACKENDS`` (with the marker of the part it needs); a
new backend plugs in there. Redis runs on the tests' real Redis under a per-test key
prefix. The Redis-only checks (stream ids, TTLs, retries, bad URLs) close the module.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from streamsvc.errors import EventsExpired, RunNotFound, RunStoreUnavailable
from streamsvc.runs.memory import MemoryStore
from streamsvc.runs.redis import INTERRUPTED, RedisRunStore, redact
from streamsvc.runs.sqlite import SqliteStore
from streamsvc.runs.store import RunRecord, RunStore, StoredEvent, executor_name
from streamsvc.settings import SettingsError
from tests.harness import REDIS_URL, PrivateRedis

Factory = Callable[[Path], contextlib.AbstractAsyncContextManager[RunStore]]


async def _wipe(prefix: str) -> None:
    async with aioredis.Redis.from_url(REDIS_URL) as r:
        keys = [key async for key in r.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await r.delete(*keys)


@contextlib.asynccontextmanager
async def redis_store(tmp: Path | None = None, **kw: Any) -> AsyncIterator[RedisRunStore]:
    """A store under a prefix of its own: ``tmp``'s (the same for a reopened one), wiped
    when the test's directory goes; without ``tmp`` a fresh one, wiped on leaving."""
    prefix = f"streamsvc-test:{uuid.uuid5(uuid.NAMESPACE_URL, str(tmp or uuid.uuid4())).hex}:"
    store = RedisRunStore.from_url(REDIS_URL, prefix=prefix, poll_seconds=0.2, **kw)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()
        if tmp is None:
            await _wipe(prefix)


@contextlib.asynccontextmanager
async def redis_behind(tmp: Path | None = None) -> AsyncIterator[RedisRunStore]:
    """As the app runs it: appends of the runs it executes written behind by one task."""
    async with redis_store(tmp) as store, store.writer():
        yield store


@contextlib.asynccontextmanager
async def memory_store(tmp: Path) -> AsyncIterator[RunStore]:
    store = MemoryStore()
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def sqlite_store(tmp: Path) -> AsyncIterator[RunStore]:
    store = SqliteStore(tmp / "runs.db")
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


#: name -> (factory, marks); a new backend joins here.
BACKENDS: dict[str, tuple[Factory, list[pytest.MarkDecorator]]] = {
    "memory": (memory_store, []),
    "sqlite": (sqlite_store, []),
    "redis": (redis_store, [pytest.mark.redis]),
}
#: Backends that keep runs across a restart (memory:// forgets them all).
PERSISTENT = {"sqlite", "redis"}


async def _opened(name: str, tmp_path: Path) -> AsyncIterator[Factory]:
    factory, _ = BACKENDS[name]
    yield lambda _: factory(tmp_path)
    if name.startswith("redis"):
        await _wipe(f"streamsvc-test:{uuid.uuid5(uuid.NAMESPACE_URL, str(tmp_path)).hex}:")


@pytest.fixture(params=[pytest.param(n, marks=m) for n, (_, m) in BACKENDS.items()])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Opens the backend's store on this test's place: a second one there is a restart."""
    async for factory in _opened(request.param, tmp_path):
        yield factory


@pytest.fixture(params=[pytest.param(n, marks=BACKENDS[n][1]) for n in sorted(PERSISTENT)])
async def persistent(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """``backend``, for the backends several processes share."""
    async for factory in _opened(request.param, tmp_path):
        yield factory


@pytest.fixture
async def store(backend: Factory, tmp_path: Path) -> AsyncIterator[RunStore]:
    async with backend(tmp_path) as opened:
        yield opened


def plain(value: Any) -> Any:
    """A result or error as JSON values (a backend may give ``msgspec.Raw`` back)."""
    return msgspec.json.decode(msgspec.json.encode(value))


#: The executor ``record`` names by default (None: a queued run; a name: executed here).
EXECUTOR: dict[str, str | None] = {"default": None}


def record(run_id: str | None = None, **kw: Any) -> RunRecord:
    fields: dict[str, Any] = {"kind": "connector", "status": "queued", "created_at": time.time()}
    fields["executor"] = EXECUTOR["default"]
    return RunRecord(id=run_id or uuid.uuid4().hex, **(fields | kw))


def events(first: int, last: int, terminal: bool = False) -> list[StoredEvent]:
    out = [StoredEvent(i, "stdout", b'{"text": "line %d\\n"}' % i) for i in range(first, last + 1)]
    if terminal:
        out[-1] = StoredEvent(last, "done", b'{"ok": true}')
    return out


async def collect(store: RunStore, run_id: str, after: int, limit: float = 10) -> list[int]:
    with anyio.fail_after(limit):
        return [event.id async for event in store.follow(run_id, after)]


# -- the contract


async def test_a_record_round_trips(store: RunStore) -> None:
    created = record(
        owner="k1", background=True, request={"entrypoint": "main.py", "env": {}}, executor=None
    )
    await store.create(created)
    assert await store.get(created.id) == created
    assert await store.get("no-such-run") is None


async def test_running_then_finished(store: RunStore) -> None:
    run = record()
    await store.create(run)
    await store.mark_running(run.id)
    running = await store.get(run.id)
    assert running is not None and running.status == "running" and running.started_at
    await store.append(run.id, events(1, 3, terminal=True))
    await store.finish(run.id, "completed", result={"ok": True})
    done = await store.get(run.id)
    assert done is not None and done.status == "completed", done
    assert plain(done.result) == {"ok": True} and done.error is None
    assert done.finished_at is not None and done.finished_at >= running.started_at
    assert done.last_event_id == 3


async def test_follow_replays_after_an_id_and_ends_at_the_terminal_event(store: RunStore) -> None:
    run = record()
    await store.create(run)
    await store.append(run.id, events(1, 4))
    await store.append(run.id, events(5, 6, terminal=True))
    await store.finish(run.id, "completed", result={"ok": True})
    assert await collect(store, run.id, 0) == [1, 2, 3, 4, 5, 6]
    assert await collect(store, run.id, 4) == [5, 6]
    assert await collect(store, run.id, 6) == []
    replay = [e async for e in store.follow(run.id, 5)]
    assert replay == [StoredEvent(6, "done", b'{"ok": true}')]


async def test_followers_see_live_events_in_order_without_gap_or_duplicate(
    store: RunStore,
) -> None:
    run = record(status="running")
    await store.create(run)
    seen: dict[str, list[int]] = {}

    async def follow(name: str, after: int) -> None:
        seen[name] = await collect(store, run.id, after)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow, "early", 0)
        for first in range(1, 200, 20):
            await store.append(run.id, events(first, first + 19, terminal=first + 19 == 200))
            if first == 101:
                tg.start_soon(follow, "late", 50)
            await anyio.sleep(0.01)
        await store.finish(run.id, "completed")
    assert seen["early"] == list(range(1, 201))
    assert seen["late"] == list(range(51, 201))


async def test_200_concurrent_runs_store_every_event_once_in_order(store: RunStore) -> None:
    """As 200 concurrent chats do (one process, one store: Redis's pool is bounded)."""
    runs = [record(executor="this-process:1" if i % 2 else None) for i in range(200)]

    async def one(run: RunRecord) -> None:
        await store.create(run)
        await store.mark_running(run.id)
        for i in range(1, 6):
            await store.append(run.id, events(i, i, terminal=i == 5))
        await store.finish(run.id, "completed")

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for run in runs:
                tg.start_soon(one, run)
        for run in runs:
            assert await collect(store, run.id, 0) == [1, 2, 3, 4, 5]


async def test_follow_ends_for_a_run_finished_without_a_terminal_event(store: RunStore) -> None:
    run = record(status="running")
    await store.create(run)
    await store.append(run.id, events(1, 2))

    async def finish_later() -> None:
        await anyio.sleep(0.3)
        await store.finish(run.id, "interrupted")

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish_later)
        assert await collect(store, run.id, 0, limit=5) == [1, 2]


async def test_the_first_finish_wins(store: RunStore) -> None:
    run = record(status="running")
    await store.create(run)
    await store.finish(run.id, "cancelled", error={"error": {"code": "cancelled"}})
    await store.finish(run.id, "completed", result={"ok": True})
    ended = await store.get(run.id)
    assert ended is not None and ended.status == "cancelled" and ended.result is None


async def test_find_is_newest_first_filtered_and_paginated(store: RunStore) -> None:
    now = time.time()
    runs = [
        record(f"run-{i:02d}", created_at=now + i, owner="a" if i % 3 else "b",
               kind="chat" if i % 2 else "connector")
        for i in range(12)
    ]  # fmt: skip
    for run in runs:
        await store.create(run)
    await store.finish("run-11", "completed", result={"big": "x" * 100})
    mine = [r for r in reversed(runs) if r.owner == "a"]
    page1 = await store.find(owner="a", limit=3)
    assert [r.id for r in page1] == [r.id for r in mine[:3]]
    assert page1[0].status == "completed" and page1[0].result is None
    page2 = await store.find(owner="a", limit=50, before=page1[-1].id)
    assert [r.id for r in page2] == [r.id for r in mine[3:]]
    chats = await store.find(owner="a", kind="chat")
    assert [r.id for r in chats] == [r.id for r in mine if r.kind == "chat"]
    done = await store.find(owner="a", status="completed")
    assert [r.id for r in done] == ["run-11"]
    assert [r.id for r in await store.find(owner="b")] == ["run-09", "run-06", "run-03", "run-00"]


async def test_delete_removes_the_record_and_its_events(store: RunStore) -> None:
    run = record()
    await store.create(run)
    await store.append(run.id, events(1, 2, terminal=True))
    await store.finish(run.id, "completed")
    assert await store.delete(run.id) is True
    assert await store.get(run.id) is None
    assert await store.delete(run.id) is False
    assert [r.id for r in await store.find(owner=None)] == []
    with pytest.raises(RunNotFound):
        await collect(store, run.id, 0)


async def test_unfinished_runs_of_dead_executors_are_interrupted(
    persistent: Factory, tmp_path: Path
) -> None:
    """Runs a stopped process left: seen by the next process on the same store."""
    backend = persistent
    dead, live, orphan, finished = (
        record(status="running", executor="host:1"),
        record(status="running", executor="host:2"),
        record(status="queued"),
        record(status="running", executor="host:1"),
    )
    async with backend(tmp_path) as before:
        for run in (dead, live, orphan, finished):
            await before.create(run)
        await before.append(dead.id, events(1, 2))
        await before.finish(finished.id, "completed")
    async with backend(tmp_path) as store:
        await check_interrupted(store, dead, live, orphan, finished)


def _ended_pid() -> int:
    """The pid of a process that has just ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


async def test_a_cancel_asked_through_one_process_reaches_the_one_running_it(
    persistent: Factory, tmp_path: Path
) -> None:
    me = executor_name()
    async with persistent(tmp_path) as running, persistent(tmp_path) as other:
        heard: list[str] = []
        got = anyio.Event()

        async def listen() -> None:
            async for run_id in running.cancels(me):
                heard.append(run_id)
                got.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listen)
            await anyio.sleep(0.5)  # subscribed (Redis Pub/Sub keeps no message for later)
            assert await other.request_cancel("run-1", me) == 1
            with anyio.fail_after(5):
                await got.wait()
            tasks.cancel_scope.cancel()
        assert heard == ["run-1"]
        gone = await anyio.to_thread.run_sync(_ended_pid)
        # A process that is gone hears nothing: 0, and the endpoint answers run_elsewhere.
        assert await other.request_cancel("run-2", f"{socket.gethostname()}:{gone}") == 0


async def check_interrupted(
    store: RunStore, dead: RunRecord, live: RunRecord, orphan: RunRecord, finished: RunRecord
) -> None:
    interrupted = await store.interrupt_unfinished(lambda executor: executor == "host:2")
    assert sorted(interrupted) == sorted([dead.id, orphan.id])
    states = {r.id: r.status for r in await store.find(owner=None)}
    assert states == {
        dead.id: "interrupted", live.id: "running", orphan.id: "interrupted",
        finished.id: "completed",
    }  # fmt: skip
    assert await store.interrupt_unfinished(lambda executor: False) == [live.id]
    ended = await store.get(dead.id)
    assert ended is not None and plain(ended.error)["code"] == "interrupted"
    replay = [(e.id, e.name, json.loads(e.data)) async for e in store.follow(dead.id, 1)]
    assert replay == [(2, "stdout", {"text": "line 2\n"}), (3, "error", {"error": INTERRUPTED})]


async def test_prune_drops_events_then_records(store: RunStore) -> None:
    old, older, running = record(), record(), record(status="running")
    for run in (old, older, running):
        await store.create(run)
        await store.append(run.id, events(1, 3, terminal=run is not running))
    await store.finish(older.id, "completed")
    await anyio.sleep(0.05)
    middle = time.time()
    await anyio.sleep(0.05)
    await store.finish(old.id, "completed")
    now = time.time() + 1

    assert await store.prune(events_before=now, records_before=middle) == 2
    assert await store.get(older.id) is None
    kept = await store.get(old.id)
    assert kept is not None and kept.events_expired and kept.status == "completed"
    with pytest.raises(EventsExpired):
        await collect(store, old.id, 0)
    still = await store.get(running.id)
    assert still is not None and not still.events_expired
    await store.finish(running.id, "cancelled")
    assert await collect(store, running.id, 2) == [3]


async def test_files_are_kept_with_their_run_and_go_with_it(store: RunStore) -> None:
    run, gone, other = record(status="running"), record(status="running"), record()
    for each in (run, gone, other):
        await store.create(each)
    big = bytes(range(256)) * 4096  # 1 MiB, every byte value
    await store.put_file(run.id, "sub/big.bin", big, "application/octet-stream")
    await store.put_file(run.id, "notes.txt", b"v1", "text/plain")
    await store.put_file(run.id, "notes.txt", b"v2", "text/plain")  # replaced, not doubled
    await store.put_file(gone.id, "x.csv", b"a,b\n", "text/csv")
    await store.append(run.id, events(1, 1, terminal=True))
    await store.finish(run.id, "completed")
    kept = await store.get_file(run.id, "sub/big.bin")
    assert kept is not None and (kept.name, kept.media_type) == (
        "sub/big.bin",
        "application/octet-stream",
    )
    assert kept.data == big
    notes = await store.get_file(run.id, "notes.txt")
    assert notes is not None and notes.data == b"v2"
    assert await store.get_file(run.id, "big.bin") is None
    assert await store.get_file(other.id, "notes.txt") is None  # files are per run
    assert await store.get_file("no-such-run", "notes.txt") is None
    await store.append(gone.id, events(1, 1, terminal=True))
    await store.finish(gone.id, "completed")
    assert await store.delete(gone.id)
    assert await store.get_file(gone.id, "x.csv") is None
    # Retention drops them with the record.
    assert await store.prune(events_before=time.time() + 1, records_before=time.time() + 1) >= 1
    assert await store.get_file(run.id, "notes.txt") is None


@pytest.mark.redis
async def test_redis_files_expire_after_their_record() -> None:
    async with redis_store(events_ttl=60, records_ttl=120) as store:
        run = record(status="running")
        await store.create(run)
        await store.put_file(run.id, "a.bin", b"\x00" * 10, "application/octet-stream")
        await store.append(run.id, events(1, 1, terminal=True))
        await store.finish(run.id, "completed")
        record_ttl = await store._redis.ttl(store._record_key(run.id))
        assert record_ttl <= await store._redis.ttl(store._files_key(run.id)) <= 120 + 300


# -- Redis only


@pytest.mark.redis
async def test_redis_write_behind_keeps_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store as the app runs it (``writer()``: the runs it executes written by one task,
    in batches). Task groups cannot live in a fixture, so the checks are called here."""
    checks = [
        test_a_record_round_trips,
        test_running_then_finished,
        test_follow_replays_after_an_id_and_ends_at_the_terminal_event,
        test_followers_see_live_events_in_order_without_gap_or_duplicate,
        test_200_concurrent_runs_store_every_event_once_in_order,
        test_the_first_finish_wins,
        test_find_is_newest_first_filtered_and_paginated,
        test_delete_removes_the_record_and_its_events,
        test_prune_drops_events_then_records,
    ]
    monkeypatch.setitem(EXECUTOR, "default", "this-process:1")  # runs executed here
    for check in checks:
        async with redis_behind() as store:
            await check(store)
    async with redis_behind() as store:  # executed here: Redis has it all once finished
        run = record(status="running", executor="this-process:1")
        await store.create(run)
        for first in range(1, 300, 20):
            await store.append(run.id, events(first, first + 19, terminal=first == 281))
        await store.finish(run.id, "completed")
        other = RedisRunStore.from_url(REDIS_URL, prefix=store.key(""), poll_seconds=0.1)
        await other.open()
        assert await collect(other, run.id, 0) == list(range(1, 301))
        await other.aclose()
    async with redis_behind() as store:  # the running mark is written with the first events
        other = RedisRunStore.from_url(REDIS_URL, prefix=store.key(""), poll_seconds=0.1)
        await other.open()
        run = record(status="queued", executor="this-process:1")
        await store.create(run)
        await store.mark_running(run.id)
        await store.append(run.id, events(1, 2))
        for _ in range(500):  # another process's view: poll it
            seen = await other.get(run.id)
            if seen is not None and seen.last_event_id == 2:
                break
            await anyio.sleep(0.01)
        assert seen is not None and seen.status == "running" and seen.started_at, seen
        quick = record(status="queued", executor="this-process:1")
        await store.create(quick)
        await store.mark_running(quick.id)
        await store.finish(quick.id, "completed")  # before the writer's pass: with the end
        ended = await other.get(quick.id)
        assert ended is not None and ended.status == "completed" and ended.started_at, ended
        await other.aclose()


@pytest.mark.redis
async def test_redis_keeps_sse_ids_as_stream_ids_and_retries_store_once() -> None:
    async with redis_store() as store:
        run = record()
        await store.create(run)
        await store.append(run.id, events(1, 3))
        await store.append(run.id, events(2, 5))  # a retry after a lost answer
        with pytest.raises(ValueError, match="out of order"):
            await store.append(run.id, events(7, 7))
        raw = await store._redis.xrange(store._events_key(run.id)) or []
        assert [entry_id for entry_id, _ in raw] == [b"1-0", b"2-0", b"3-0", b"4-0", b"5-0"]
        with pytest.raises(RunNotFound):
            await store.append("no-such-run", events(1, 1))


@pytest.mark.redis
async def test_a_run_executed_here_is_followed_from_memory_and_elsewhere_from_redis() -> None:
    async with redis_store() as here:
        other = RedisRunStore.from_url(REDIS_URL, prefix=here.key(""), poll_seconds=0.1)
        await other.open()
        run = record(status="running", executor="this-process:1")
        await here.create(run)
        seen: dict[str, list[int]] = {}

        async def follow(name: str, store: RunStore) -> None:
            seen[name] = await collect(store, run.id, 0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow, "here", here)
            tg.start_soon(follow, "other", other)
            for first in range(1, 100, 10):
                await here.append(run.id, events(first, first + 9, terminal=first == 91))
            await here.finish(run.id, "completed")
        await other.aclose()
        assert seen == {"here": list(range(1, 101)), "other": list(range(1, 101))}
        assert run.id not in here._active.records  # finished: Redis answers for it now
        assert await collect(here, run.id, 95) == list(range(96, 101))


@pytest.mark.redis
async def test_redis_expires_a_finished_runs_keys() -> None:
    async with redis_store(events_ttl=60, records_ttl=120) as store:
        run = record(status="running")
        await store.create(run)
        await store.append(run.id, events(1, 1))
        assert await store._redis.ttl(store._record_key(run.id)) == -1  # unfinished: kept
        await store.finish(run.id, "completed")
        assert 60 < await store._redis.ttl(store._record_key(run.id)) <= 120
        assert 0 < await store._redis.ttl(store._events_key(run.id)) <= 60
        await store._redis.delete(store._events_key(run.id))  # as the TTL would
        got = await store.get(run.id)
        assert got is not None and got.events_expired
        with pytest.raises(EventsExpired):
            await collect(store, run.id, 0)


@pytest.mark.redis
async def test_redis_reconnects_after_its_connections_are_killed() -> None:
    async with redis_store() as store, aioredis.Redis.from_url(REDIS_URL) as admin:
        run = record(status="running")
        await store.create(run)
        await store.append(run.id, events(1, 2))
        await admin.client_kill_filter(_type="normal", skipme=True)
        await store.append(run.id, events(3, 3, terminal=True))
        assert await collect(store, run.id, 0) == [1, 2, 3]


@pytest.mark.redis
async def test_redis_bad_urls_name_the_setting() -> None:
    port = REDIS_URL.rsplit(":", 1)[0] + ":1/0"
    with pytest.raises(
        SettingsError, match=r"STREAMSVC_RUN_STORE=redis://127\.0\.0\.1:1/0.*answer"
    ):
        await RedisRunStore.from_url(port, timeout=1).open()
    user = f"streamsvc-test-{uuid.uuid4().hex[:8]}"
    async with aioredis.Redis.from_url(REDIS_URL) as admin:
        await admin.acl_setuser(
            user, enabled=True, passwords=["+right-password"], commands=["+ping"]
        )
        try:
            bad = REDIS_URL.replace("redis://", f"redis://{user}:wrong-password@")
            with pytest.raises(SettingsError, match="refused the password") as caught:
                await RedisRunStore.from_url(bad, timeout=2).open()
            assert "wrong-password" not in str(caught.value)
            good = RedisRunStore.from_url(
                REDIS_URL.replace("redis://", f"redis://{user}:right-password@")
            )
            await good.open()
            await good.aclose()
        finally:
            await admin.acl_deluser(user)
    assert redact("rediss://:s3cret@h:6380/1") == "rediss://:***@h:6380/1"


@pytest.mark.redis
@pytest.mark.parametrize("executor", [None, "this-process:1"], ids=["queued", "executed-here"])
async def test_redis_restarted_mid_run_loses_nothing_acknowledged(
    tmp_path: Path, executor: str | None
) -> None:
    """SIGKILL Redis mid-append and start it again: the store reconnects by itself, and the
    log holds every event once, in order (a retried append is not stored twice). A run this
    process executes keeps what Redis missed and writes it with the next append."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        store = RedisRunStore.from_url(server.url, poll_seconds=0.2, timeout=2)
        await store.open()
        run = record(status="running", executor=executor)
        await store.create(run)
        acknowledged = 0
        outages = 0
        restarted, hundred = anyio.Event(), anyio.Event()

        async def restart_redis() -> None:
            await hundred.wait()
            server.kill()  # mid-stream: an append may be in flight
            await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(server.start)
            restarted.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(restart_redis)
            for event_id in range(1, 301):
                while True:
                    try:
                        await store.append(run.id, events(event_id, event_id, event_id == 300))
                        break
                    except RunStoreUnavailable:
                        outages += 1  # the retries did not bridge the outage: try again
                        await anyio.sleep(0.1)
                acknowledged = event_id
                if event_id == 100:
                    hundred.set()
                if event_id == 200:
                    await restarted.wait()
        await store.finish(run.id, "completed")
        assert acknowledged == 300
        assert await collect(store, run.id, 0) == list(range(1, 301))
        await store.aclose()
        store = RedisRunStore.from_url(server.url, poll_seconds=0.2, timeout=2)  # another node
        await store.open()
        assert await collect(store, run.id, 0) == list(range(1, 301))
        stored = await store.get(run.id)
        assert stored is not None and stored.status == "completed", (stored, outages)
        await store.aclose()
    finally:
        server.kill()


@pytest.mark.redis
async def test_redis_health_follows_redis(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        store = RedisRunStore.from_url(server.url.replace("redis://", "redis://:pw@"), timeout=1)
        assert (await store.health())["state"] == "ready"  # no requirepass: any password works
        server.kill()
        await anyio.sleep(1.05)  # one look per second at most
        down = await store.health()
        assert down["state"] == "unavailable" and down["reason"], down
        assert "pw" not in str(down), down
        await anyio.to_thread.run_sync(server.start)
        await anyio.sleep(1.05)
        assert (await store.health())["state"] == "ready"
        await store.aclose()
    finally:
        server.kill()


@pytest.mark.redis
async def test_redis_takes_no_event_after_a_run_ended_elsewhere() -> None:
    """A reaper ended the run (``executor_lost``) while its executor, not told yet, goes on:
    what the executor appends then is dropped, so the log keeps one terminal event, last."""
    async with redis_store() as store:
        run = record(status="running", executor=None)
        await store.create(run)
        await store.append(run.id, events(1, 3))
        lost = {"code": "executor_lost", "message": "its lease lapsed"}
        assert await store.end(run.id, "interrupted", lost)
        await store.append(run.id, events(4, 6, terminal=True))
        raw = await store._redis.xrange(store._events_key(run.id)) or []
        stored = [(entry_id, (fields or {}).get(b"e")) for entry_id, fields in raw]
        assert stored == [
            (b"1-0", b"stdout"), (b"2-0", b"stdout"), (b"3-0", b"stdout"), (b"4-0", b"error")
        ], stored  # fmt: skip
        ended = await store.get(run.id)
        assert ended is not None and ended.status == "interrupted"
