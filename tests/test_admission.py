"""Admission control: the queue itself, then a real server with one slot and one place."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from streamsvc.errors import Busy
from streamsvc.sandbox.admission import Admission, Ticket
from tests.harness import ServerProcess, read_sse


async def watch(ticket: Ticket, seen: list[int]) -> None:
    async for position in ticket.positions():
        seen.append(position)


async def test_admits_up_to_the_limit_then_queues_then_refuses() -> None:
    admission = Admission(max_running=2, max_queued=2, retry_after=7)
    first, second = admission.enter(), admission.enter()
    assert first.admitted and second.admitted
    third, fourth = admission.enter(), admission.enter()
    assert (third.admitted, fourth.admitted) == (False, False)
    assert (third.position, fourth.position) == (1, 2)
    with pytest.raises(Busy) as refused:
        admission.enter()
    assert refused.value.status == 429
    assert refused.value.code == "busy"
    assert refused.value.headers() == {"Retry-After": "7"}
    assert (admission.running, len(admission.queue)) == (2, 2)


async def test_queued_tickets_move_up_in_order_and_report_each_position() -> None:
    admission = Admission(max_running=1, max_queued=3)
    running = admission.enter()
    waiting = [admission.enter() for _ in range(3)]
    seen: list[list[int]] = [[], [], []]
    async with anyio.create_task_group() as tg:
        for ticket, positions in zip(waiting, seen, strict=True):
            tg.start_soon(watch, ticket, positions)
        await anyio.sleep(0.01)
        running.release()
        await anyio.sleep(0.01)
        assert waiting[0].admitted and not waiting[1].admitted
        waiting[0].release()
        await anyio.sleep(0.01)
        waiting[1].release()
    assert seen == [[1], [2, 1], [3, 2, 1]]
    assert waiting[2].admitted
    assert (admission.running, len(admission.queue)) == (1, 0)


async def test_a_ticket_that_leaves_the_queue_frees_its_place() -> None:
    admission = Admission(max_running=1, max_queued=2)
    running = admission.enter()
    leaving, staying = admission.enter(), admission.enter()
    seen: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, staying, seen)
        await anyio.sleep(0.01)
        leaving.release()  # e.g. its client disconnected while queued
        await anyio.sleep(0.01)
        assert staying.position == 1
        running.release()
    assert seen == [2, 1]
    assert staying.admitted
    leaving.release()  # releasing twice changes nothing
    assert (admission.running, len(admission.queue)) == (1, 0)


async def test_a_move_while_the_watcher_is_busy_is_not_missed() -> None:
    admission = Admission(max_running=1, max_queued=3)
    running = admission.enter()
    ahead, ticket = admission.enter(), admission.enter()
    positions = ticket.positions()
    assert await anext(positions) == 2
    # The watcher is away (sending the event to its client) while things move.
    ahead.release()
    with anyio.fail_after(2):
        assert await anext(positions) == 1
    running.release()
    with anyio.fail_after(2), pytest.raises(StopAsyncIteration):
        await anext(positions)
    assert ticket.admitted


async def test_a_ticket_waits_at_most_max_wait_then_leaves_the_queue() -> None:
    admission = Admission(max_running=1, max_queued=2, retry_after=3, max_wait=0.3)
    running = admission.enter()
    ticket = admission.enter()
    positions = ticket.positions()
    assert await anext(positions) == 1
    started = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(Busy) as refused:
        await anext(positions)
    assert 0.2 < anyio.current_time() - started < 3
    assert refused.value.retry_after == 3
    assert "0.3s in the queue" in refused.value.message
    assert (admission.running, len(admission.queue), ticket.admitted) == (1, 0, False)
    running.release()  # the slot goes to nobody: the ticket is gone
    assert (admission.running, ticket.admitted) == (0, False)
    ticket.release()  # the caller's own release stays harmless
    assert (admission.running, len(admission.queue)) == (0, 0)


async def test_many_tickets_never_exceed_the_limit() -> None:
    admission = Admission(max_running=3, max_queued=50)
    busiest = 0

    async def run() -> None:
        nonlocal busiest
        ticket = admission.enter()
        try:
            async for _ in ticket.positions():
                pass
            busiest = max(busiest, admission.running)
            await anyio.sleep(0.001)
        finally:
            ticket.release()

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(run)
    assert busiest == 3
    assert (admission.running, len(admission.queue)) == (0, 0)


# -- a real server: one run at a time, one in the queue ----------------------------------

SLEEPER = "import json, time\ntime.sleep({seconds})\nprint(json.dumps({{'slept': {seconds}}}))\n"


def sleeping(seconds: float) -> dict[str, Any]:
    return {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py"},
            "files": {"main.py": SLEEPER.format(seconds=seconds)},
        },
        "stream": True,
    }


async def wait_for_phase(server: ServerProcess, running: int, queued: int) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        with anyio.fail_after(60):
            while True:
                sandbox = (await http.get(server.url + "/health")).json()["components"]["sandbox"]
                if (sandbox["running"], sandbox["queued"]) == (running, queued):
                    return
                await anyio.sleep(0.1)


@pytest.mark.docker
async def test_a_full_server_queues_one_stream_and_refuses_the_next(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_MAX_CONCURRENT_RUNS="1", STREAMSVC_QUEUE_SIZE="1")
    url = server.url + "/execute-connector"
    first = asyncio.create_task(read_sse(client, url, sleeping(4)))
    await wait_for_phase(server, running=1, queued=0)
    second = asyncio.create_task(read_sse(client, url, sleeping(0.1)))
    await wait_for_phase(server, running=1, queued=1)

    refused = await client.post(url, json=sleeping(0.1))
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "busy"
    refused_plain = await client.post(url, json={**sleeping(0.1), "stream": False})
    assert refused_plain.status_code == 429

    with anyio.fail_after(120):
        done_first, done_second = await first, await second
    assert done_first.last.data["result"] == {"slept": 4}
    assert done_second.last.data["result"] == {"slept": 0.1}
    statuses = [e.data for e in done_second.named("status")]
    assert statuses[0]["phase"] == "validated"
    assert statuses[1] == {
        "phase": "queued",
        "message": "waiting for a free slot (position 1)",
        "position": 1,
    }
    assert [s["phase"] for s in statuses[2:]] == ["starting", "running"]
    # The queued stream's status came at once, long before the first run ended.
    queued_at = done_second.named("status")[1].at
    assert queued_at < done_first.last.at - 1
    assert "queued" not in [e.data["phase"] for e in done_first.named("status")]

    # Free again: a run is admitted at once.
    await wait_for_phase(server, running=0, queued=0)
    again = await read_sse(client, url, sleeping(0))
    assert again.last.data["ok"] is True


@pytest.mark.docker
async def test_a_stream_that_waits_past_the_queue_timeout_ends_busy(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = start_server(STREAMSVC_MAX_CONCURRENT_RUNS="1", STREAMSVC_QUEUE_TIMEOUT_SECONDS="1")
    url = server.url + "/execute-connector"
    first = asyncio.create_task(read_sse(client, url, sleeping(4)))
    await wait_for_phase(server, running=1, queued=0)
    waited = await read_sse(client, url, sleeping(0.1))
    assert waited.status == 200
    assert [e.data["phase"] for e in waited.named("status")] == ["validated", "queued"]
    assert waited.last.event == "error"
    assert waited.last.data["error"]["code"] == "busy"
    queued_at = waited.named("status")[1].at
    assert 0.8 < waited.last.at - queued_at < 3.5  # about the 1 s limit, not the 4 s run
    plain = await client.post(url, json={**sleeping(0.1), "stream": False})
    assert plain.status_code == 429
    assert plain.json()["error"]["code"] == "busy"
    assert int(plain.headers["retry-after"]) >= 1
    with anyio.fail_after(60):
        done = await first
    assert done.last.data["result"] == {"slept": 4}
    await wait_for_phase(server, running=0, queued=0)
