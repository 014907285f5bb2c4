"""The run manager in-process, over a memory store and event sources of our own: the log cap,
the grace timer (kept by a returning reader, firing without one), cancel, graceful stop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import msgspec
import pytest

from streamsvc import errors
from streamsvc.runs import manager as manager_module
from streamsvc.runs.manager import RunManager, new_run_id
from streamsvc.runs.memory import MemoryStore
from streamsvc.runs.respond import stored_error
from streamsvc.settings import RunSettings
from streamsvc.web.sse import Event


class Final(msgspec.Struct):
    total: int
    run_id: str | None = None


def settings(grace: float = 0.3) -> RunSettings:
    return RunSettings(connector_grace_seconds=grace, chat_grace_seconds=grace)


async def ticks(
    count: int, pause: float = 0.0, closed: list[bool] | None = None
) -> AsyncIterator[Event]:
    try:
        for number in range(1, count + 1):
            yield Event("stdout", {"text": f"{number}\n"})
            await anyio.sleep(pause)
        yield Event("done", Final(count))
    finally:
        if closed is not None:
            closed.append(True)


async def test_a_completed_run_records_its_final_object_with_its_id() -> None:
    store = MemoryStore()
    async with RunManager(store, settings(), b"k") as manager:
        run = await manager.create("connector", owner=None, background=True, request={})
        manager.start(run, ticks(5))
        await run.done.wait()
    record = await store.get(run.id)
    assert record is not None and record.status == "completed" and record.last_event_id == 6
    assert msgspec.json.decode(msgspec.json.encode(record.result)) == {"total": 5, "run_id": run.id}


async def test_a_log_past_its_cap_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_module, "MAX_LOG_EVENTS", 10)
    store = MemoryStore()
    closed: list[bool] = []
    async with RunManager(store, settings(), b"k") as manager:
        run = await manager.create("connector", owner=None, background=True, request={})
        manager.start(run, ticks(50, closed=closed))
        await run.done.wait()
    record = await store.get(run.id)
    assert record is not None and record.status == "failed"
    assert msgspec.json.decode(msgspec.json.encode(record.error))["code"] == "run_log_full"
    events = [e async for e in store.follow(run.id, 0)]
    assert [e.id for e in events] == list(range(1, 12)) and events[-1].name == "error"
    assert closed == [True]  # the source was closed (its container, its upstream call)


async def test_the_grace_keeps_a_run_for_a_returning_reader_and_ends_an_abandoned_one() -> None:
    store = MemoryStore()
    async with RunManager(store, settings(grace=0.4), b"k") as manager:
        run = await manager.create("chat", owner=None, background=False, request={})
        closed: list[bool] = []
        manager.start(run, ticks(1000, pause=0.01, closed=closed))
        await manager.started(run)
        reader = manager.reader(run.id, 0)
        await anext(reader)
        await reader.aclose()  # the connection dropped
        await anyio.sleep(0.25)
        again = manager.reader(run.id, 1)  # back within the grace
        first = await anext(again)
        assert first.id == 2  # type: ignore[attr-defined]
        await anyio.sleep(0.6)  # longer than the grace, but a reader is attached
        assert not run.done.is_set()
        await again.aclose()
        with anyio.fail_after(2):
            await run.done.wait()
        assert closed == [True]
    record = await store.get(run.id)
    assert record is not None and record.status == "cancelled"
    assert "abandoned" in msgspec.json.decode(msgspec.json.encode(record.error))["message"]


async def test_cancel_and_graceful_stop() -> None:
    store = MemoryStore()
    async with RunManager(store, settings(), b"k") as manager:
        cancelled = await manager.create("connector", owner=None, background=True, request={})
        stopped = await manager.create("connector", owner=None, background=True, request={})
        manager.start(cancelled, ticks(1000, pause=0.01))
        manager.start(stopped, ticks(1000, pause=0.01))
        await manager.started(cancelled)
        await manager.started(stopped)
        await manager.cancel(cancelled.id)
        assert cancelled.done.is_set()
        assert manager.token(cancelled.id) != manager.token(stopped.id)
        assert manager.token_valid(stopped.id, manager.token(stopped.id))
        assert not manager.token_valid(stopped.id, manager.token(cancelled.id))
    first, second = await store.get(cancelled.id), await store.get(stopped.id)
    assert first is not None and first.status == "cancelled"
    assert second is not None and second.status == "interrupted"
    events = [e async for e in store.follow(stopped.id, 0)]
    assert events[-1].name == "error" and b'"interrupted"' in events[-1].data


def test_no_run_id_begins_with_a_dash() -> None:
    # One token_urlsafe id in 64 began with "-": `streamsvc runs show -6Vh...` then failed
    # with "the following arguments are required: ID" (argparse took it for an option).
    ids = {new_run_id() for _ in range(5000)}
    assert len(ids) == 5000 and not [i for i in ids if i.startswith("-")]
    assert {len(i) for i in ids} == {22}


@pytest.mark.parametrize(
    ("code", "kind", "status"),
    [
        ("dependency_install_failed", errors.DependencyInstallFailed, 400),
        ("sandbox_unavailable", errors.SandboxUnavailable, 503),
        ("too_many_runs", errors.TooManyRuns, 429),
        ("no_such_code", errors.ServiceError, 500),
    ],
)
def test_a_stored_error_comes_back_as_its_class(
    code: str, kind: type[errors.ServiceError], status: int
) -> None:
    """A run that failed before its start on another node answers as it would have here."""
    event = {"error": {"code": code, "message": "m", "path": "$.x", "details": {"a": 1}}}
    error = stored_error(msgspec.json.encode(event))
    assert type(error) is kind
    assert (error.code, error.status, error.message, error.path) == (code, status, "m", "$.x")
    assert error.details == {"a": 1}
