"""The run stores' contract, on both embedded backends: replay plus live tail with no gap and
no duplicate, durability across a reopen, concurrent runs, find, delete, prune, interruption."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest

from streamsvc.errors import EventsExpired
from streamsvc.runs.memory import MemoryStore
from streamsvc.runs.sqlite import SqliteStore
from streamsvc.runs.store import RunRecord, StoredEvent

Store = MemoryStore | SqliteStore


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    found: Store
    if request.param == "memory":
        found = MemoryStore()
    else:
        found = SqliteStore(tmp_path / "state" / "runs.db")
        await found.open()
    yield found
    await found.aclose()


def record(run_id: str, *, owner: str | None = None, created: float | None = None) -> RunRecord:
    return RunRecord(
        id=run_id,
        kind="connector",
        status="queued",
        created_at=time.time() if created is None else created,
        owner=owner,
        executor="nowhere:1",
    )


def event(number: int, name: str = "stdout") -> StoredEvent:
    return StoredEvent(number, name, msgspec.json.encode({"text": f"{number}\n"}))


async def drain(store: Store, run_id: str, after: int = 0) -> list[int]:
    with anyio.fail_after(10):
        return [e.id async for e in store.follow(run_id, after)]


async def test_a_reader_joining_mid_run_gets_the_log_then_the_live_tail(store: Store) -> None:
    await store.create(record("r1"))
    await store.mark_running("r1")
    await store.append("r1", [event(i) for i in range(1, 51)])
    seen: list[int] = []

    async def read(after: int) -> None:
        seen.extend(await drain(store, "r1", after))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(read, 20)
        for number in range(51, 200):
            await store.append("r1", [event(number)])
            if number % 10 == 0:
                await anyio.lowlevel.checkpoint()  # let the reader catch up in between
        await store.append("r1", [event(200, "done")])
        await store.finish("r1", "completed", result={"ok": True})
    assert seen == list(range(21, 201))
    got = await store.get("r1")
    assert got is not None and got.status == "completed" and got.last_event_id == 200
    assert msgspec.json.encode(got.result) == b'{"ok":true}'
    assert await drain(store, "r1", 150) == list(range(151, 201))  # a finished run: replay


async def test_sqlite_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    first = SqliteStore(path)
    await first.open()
    await first.create(record("kept"))
    await first.append("kept", [event(i) for i in range(1, 4)])
    await first.create(record("left-running"))
    await first.append("left-running", [event(1), event(2)])
    await first.append("kept", [event(4, "done")])
    await first.finish("kept", "completed", result={"n": 4})
    await first.aclose()  # flushes the queued writes

    again = SqliteStore(path)
    await again.open()
    try:
        assert await drain(again, "kept") == [1, 2, 3, 4]
        assert await again.interrupt_unfinished(lambda executor: True) == []  # a live peer's
        assert await again.interrupt_unfinished(lambda executor: False) == ["left-running"]
        interrupted = await again.get("left-running")
        assert interrupted is not None and interrupted.status == "interrupted"
        events = [e async for e in again.follow("left-running", 0)]
        assert [e.id for e in events] == [1, 2, 3]
        assert events[-1].name == "error" and b'"interrupted"' in events[-1].data
    finally:
        await again.aclose()


async def test_concurrent_runs_store_every_event_once_in_order(store: Store) -> None:
    runs, per_run = 20, 300

    async def one(index: int) -> None:
        run_id = f"run-{index}"
        await store.create(record(run_id))
        for number in range(1, per_run + 1):
            await store.append(run_id, [event(number, "done" if number == per_run else "stdout")])
            if number % 7 == index % 7:
                await anyio.lowlevel.checkpoint()
        await store.finish(run_id, "completed")

    async with anyio.create_task_group() as tasks:
        for index in range(runs):
            tasks.start_soon(one, index)
    for index in range(runs):
        events = [e async for e in store.follow(f"run-{index}", 0)]
        assert [e.id for e in events] == list(range(1, per_run + 1))
        assert events[5].data == b'{"text":"6\\n"}'


async def test_find_pages_newest_first_per_owner(store: Store) -> None:
    for index in range(7):
        await store.create(record(f"a{index}", owner="alice", created=1000.0 + index))
    await store.create(record("b0", owner="bob", created=2000.0))
    await store.finish("a6", "completed", result={"big": "x"})
    page = await store.find(owner="alice", limit=3)
    assert [r.id for r in page] == ["a6", "a5", "a4"]
    assert all(r.result is None for r in page)  # no result bodies in listings
    following = await store.find(owner="alice", limit=3, before="a4")
    assert [r.id for r in following] == ["a3", "a2", "a1"]
    assert [r.id for r in await store.find(owner="alice", status="completed")] == ["a6"]
    assert [r.id for r in await store.find(owner="bob")] == ["b0"]
    assert await store.find(owner=None) == []


async def test_prune_expires_events_then_drops_records(store: Store) -> None:
    await store.create(record("old"))
    await store.append("old", [event(1), event(2, "done")])
    await store.finish("old", "completed")
    await store.create(record("running"))
    await store.append("running", [event(1)])
    finished = time.time()
    assert await store.prune(finished - 60, finished - 120) == 0  # nothing that old
    assert await store.prune(finished + 1, finished - 120) == 1
    old = await store.get("old")
    assert old is not None and old.events_expired and old.status == "completed"
    with pytest.raises(EventsExpired):
        await drain(store, "old")
    assert await store.prune(finished + 1, finished + 1) == 1
    assert await store.get("old") is None
    assert await store.get("running") is not None  # unfinished runs are never pruned
    assert await store.delete("running") is True
    assert await store.get("running") is None
