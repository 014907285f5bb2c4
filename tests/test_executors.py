"""API nodes and executors on one Redis (issue 16): queued connector runs on two real engines.

Real server processes (``ServerProcess``) on ``STREAMSVC_RUN_STORE=redis://...?prefix=<this
test's>``, real ``streamsvc executor`` processes on the first engine and the second one
(``engine2``), short leases and heartbeats. Bad settings stop an executor naming the setting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis

from streamsvc.client import AsyncClient, Attachment, Frame, RunDone, run_event
from streamsvc.runs.redis import MAX_READERS
from tests.harness import (
    EngineProxy,
    ExecutorProcess,
    PrivateRedis,
    ServerProcess,
    SSEEvent,
    SSEResponse,
    read_sse,
    run_events,
)

pytestmark = [pytest.mark.redis, pytest.mark.docker]

LEASE = 2.0
SETTINGS = {"STREAMSVC_LEASE_SECONDS": str(LEASE), "STREAMSVC_HEARTBEAT_SECONDS": "0.3"}


def program(code: str, **extra: Any) -> dict[str, Any]:
    connector = {
        "runtime": {"language": "python", "entryPoint": "main.py", "timeoutMs": 60000},
        "files": {"main.py": code},
    }
    return {"connector": connector, "network_mode": "none", **extra}


LINES = """\
import json, time
for i in range(5):
    print("line", i, flush=True)
    time.sleep(0.05)
print(json.dumps({"ok": True, "result": {"lines": 5}}))
"""
SLOW = """\
import json, time
for i in range({n}):
    print("tick", i, flush=True)
    time.sleep(0.2)
print(json.dumps({{"ok": True, "result": "slept"}}))
"""


class Cluster:
    """Nodes and executors on one store prefix; all stopped at the end."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.env = {"STREAMSVC_RUN_STORE": store, **SETTINGS}
        self.nodes: list[ServerProcess] = []
        self.executors: list[ExecutorProcess] = []

    def node(self) -> ServerProcess:
        process = ServerProcess(self.env)
        self.nodes.append(process)
        return process

    def executor(self, docker_host: str | None = None, **env: str) -> ExecutorProcess:
        extra = {"DOCKER_HOST": docker_host} if docker_host else {}
        process = ExecutorProcess(self.env | extra | env)
        self.executors.append(process)
        return process

    def close(self) -> None:
        for executor in self.executors:
            executor.close()
        for node in self.nodes:
            node.close()


@pytest.fixture
def cluster(redis_url: str) -> Iterator[Cluster]:
    prefix = f"streamsvc-test:{uuid.uuid4().hex[:12]}:"
    found = Cluster(f"{redis_url}?prefix={prefix}")
    yield found
    found.close()
    with redis.Redis.from_url(redis_url) as r:
        keys = list(r.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            r.delete(*keys)


def stored_events(redis_url: str, store: str, run_id: str) -> list[tuple[int, str]]:
    prefix = store.partition("?prefix=")[2]
    with redis.Redis.from_url(redis_url) as r:
        entries = r.xrange(f"{prefix}events:{run_id}")
    return [(int(i.split(b"-")[0]), f[b"e"].decode()) for i, f in entries]


async def wait_for(check: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await anyio.sleep(0.1)
    raise AssertionError(f"not within {within} s: {what}")


def containers(docker_host: str | None, owner: str) -> list[str]:
    env = {**os.environ, "DOCKER_HOST": docker_host} if docker_host else None
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=streamsvc.owner={owner}"],
        capture_output=True, text=True, env=env, check=True, timeout=30,
    )  # fmt: skip
    return listed.stdout.split()


@pytest.mark.engine2
async def test_twenty_runs_through_two_nodes_and_two_executors(
    cluster: Cluster, engine2: str, redis_url: str, client: httpx.AsyncClient
) -> None:
    nodes = [cluster.node(), cluster.node()]
    first, second = cluster.executor(), cluster.executor(engine2)
    health = (await client.get(nodes[0].url + "/health")).json()["components"]["queue"]
    assert {e["name"] for e in health["executors"]} == {first.name, second.name}, health

    async def one(i: int, answers: list[dict[str, Any]]) -> None:
        response = await client.post(
            nodes[i % 2].url + "/execute-connector", json=program(LINES), timeout=180
        )
        assert response.status_code == 200, response.text
        answers.append(response.json() | {"run": response.headers["x-run-id"]})

    answers: list[dict[str, Any]] = []
    async with anyio.create_task_group() as tasks:
        for i in range(20):
            tasks.start_soon(one, i, answers)
    assert len(answers) == 20 and all(a["ok"] for a in answers), answers
    assert all(a["stdout"].count("line ") == 5 for a in answers)
    ran = {a["executor"] for a in answers}
    assert ran == {first.name, second.name}, ran
    for answer in answers:
        events = stored_events(redis_url, cluster.store, answer["run"])
        assert [i for i, _ in events] == list(range(1, len(events) + 1)), events
        assert [name for _, name in events].count("stdout") >= 1
        assert events[-1][1] == "done" and [n for _, n in events].count("done") == 1
        record = (await client.get(f"{nodes[1].url}/runs/{answer['run']}")).json()
        assert record["executor"] == answer["executor"] and record["status"] == "completed"
    queue = (await client.get(nodes[1].url + "/health")).json()["components"]["queue"]
    assert (queue["waiting"], queue["running"]) == (0, 0), queue


async def test_a_stream_through_node_a_resumes_through_node_b(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    node_a, node_b = cluster.node(), cluster.node()
    cluster.executor()
    body = program(SLOW.format(n=10), stream=True)
    cut = await read_sse(client, node_a.url + "/execute-connector", body, stop_after=4)
    assert cut.status == 200, cut.body
    run_id = cut.headers["x-run-id"]
    assert [e.id for e in cut.events] == ["1", "2", "3", "4"]
    rest = await run_events(client, f"{node_b.url}/runs/{run_id}/events", cut.events[-1].id)
    ids = [int(e.id or 0) for e in cut.events + rest]
    assert ids == list(range(1, len(ids) + 1)), ids
    ticks = [e.data["text"] for e in cut.events + rest if e.event == "stdout"]
    assert "".join(ticks).count("tick") == 10, ticks
    assert rest[-1].event == "done" and rest[-1].data["result"] == "slept"


async def test_a_killed_executor_loses_its_run_and_its_container_goes_on_restart(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    node = cluster.node()
    doomed = cluster.executor()
    started = await client.post(
        node.url + "/execute-connector", json=program(SLOW.format(n=200), background=True)
    )
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]

    async def running() -> bool:
        record = (await client.get(f"{node.url}/runs/{run_id}")).json()
        return bool(record["status"] == "running" and record["last_event_id"] >= 4)

    await wait_for(running, 60, "the run streams")
    assert containers(None, doomed.name), "the run's container"
    events: list[SSEEvent] = []

    async def follow() -> None:
        events.extend(await run_events(client, f"{node.url}/runs/{run_id}/events", None))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(follow)
        await anyio.sleep(0.3)
        doomed.signal(signal.SIGKILL)
        killed = time.monotonic()
        doomed.process.wait()

        async def ended() -> Any:
            record = (await client.get(f"{node.url}/runs/{run_id}")).json()
            return record if record["status"] != "running" else None

        record = await wait_for(ended, LEASE + 3, "the run ends executor_lost")
        took = time.monotonic() - killed
    assert record["status"] == "interrupted", record
    assert record["error"]["code"] == "executor_lost" and took < LEASE + 3, (record, took)
    assert events[-1].event == "error", events[-3:]
    assert events[-1].data["error"]["code"] == "executor_lost"

    left = containers(None, doomed.name)
    assert left, "a killed executor cannot remove its container"
    other = cluster.executor()  # same host and engine: removes the dead one's leftovers
    assert containers(None, doomed.name) == []
    answer = await client.post(node.url + "/execute-connector", json=program(LINES))
    assert answer.status_code == 200 and answer.json()["executor"] == other.name, answer.text


async def test_sigterm_takes_no_new_runs_and_finishes_its_own(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    node = cluster.node()
    leaving = cluster.executor()
    first = await client.post(
        node.url + "/execute-connector", json=program(SLOW.format(n=15), background=True)
    )
    run_id = first.json()["id"]

    async def running() -> bool:
        record = (await client.get(f"{node.url}/runs/{run_id}")).json()
        return bool(record["status"] == "running" and record["last_event_id"] >= 4)

    await wait_for(running, 60, "the run streams")
    leaving.signal(signal.SIGTERM)
    leaving.wait_for("draining")
    second = await client.post(
        node.url + "/execute-connector", json=program(LINES, background=True)
    )
    queued_id = second.json()["id"]
    assert leaving.process.wait(30) == 0, leaving.log()
    health = (await client.get(node.url + "/health")).json()["components"]["queue"]
    assert health["executors"] == [] and health["waiting"] == 1, health
    done = (await client.get(f"{node.url}/runs/{run_id}")).json()
    assert done["status"] == "completed" and done["result"]["result"] == "slept", done
    waiting = (await client.get(f"{node.url}/runs/{queued_id}")).json()
    assert waiting["status"] == "queued" and waiting["executor"] is None, waiting
    cancelled = await client.post(f"{node.url}/runs/{queued_id}/cancel")
    assert cancelled.json()["status"] == "cancelled", cancelled.text


@pytest.mark.engine2
async def test_a_cancel_through_node_b_stops_a_run_on_engine_two(
    cluster: Cluster, engine2: str, client: httpx.AsyncClient
) -> None:
    node_a, node_b = cluster.node(), cluster.node()
    remote = cluster.executor(engine2)
    started = await client.post(
        node_a.url + "/execute-connector", json=program(SLOW.format(n=200), background=True)
    )
    run_id = started.json()["id"]

    async def running() -> bool:
        record = (await client.get(f"{node_b.url}/runs/{run_id}")).json()
        return bool(record["status"] == "running" and record["last_event_id"] >= 4)

    await wait_for(running, 60, "the run streams")
    assert containers(engine2, remote.name)
    sent = time.monotonic()
    cancelled = await client.post(f"{node_b.url}/runs/{run_id}/cancel")
    took = time.monotonic() - sent
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["status"] == "cancelled" and body["executor"] == remote.name, body
    assert took < 1.0, took
    events = await run_events(client, f"{node_a.url}/runs/{run_id}/events", None)
    assert events[-1].event == "error" and events[-1].data["error"]["code"] == "cancelled"

    async def gone() -> bool:
        return not containers(engine2, remote.name)

    await wait_for(gone, 10, "the container is removed")


def bad_executor(env: dict[str, str]) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC_")}
    done = subprocess.run(
        [sys.executable, "-m", "streamsvc", "executor"],
        env=base | {"STREAMSVC_ENV_FILE": "none"} | env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, done.stderr


async def test_an_executor_whose_engine_goes_away_takes_nothing_and_health_says_so(
    cluster: Cluster, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The engine behind a socket the test can cut: while it is away the executor keeps
    heartbeating, takes no run (it would fail) and /health names it; back, it takes again."""
    proxy = EngineProxy(tmp_path / "docker.sock")
    proxy.start()
    try:
        node = cluster.node()
        executor = cluster.executor(proxy.url)
        first = await client.post(node.url + "/execute-connector", json=program(LINES), timeout=60)
        assert first.status_code == 200 and first.json()["ok"], first.text
        proxy.stop()

        async def engine_down() -> Any:
            queue = (await client.get(node.url + "/health")).json()["components"]["queue"]
            return queue if queue["state"] == "degraded" else None

        queue = await wait_for(engine_down, 20, "/health shows the engine away")
        assert executor.name in queue["reason"] and "engine" in queue["reason"], queue
        assert [e["engine"] for e in queue["executors"]] == ["unavailable"], queue
        await anyio.sleep(1.0)  # past the take already waiting (its block: 0.5 s)
        accepted = await client.post(
            node.url + "/execute-connector", json=program(LINES, background=True)
        )
        assert accepted.status_code == 202, accepted.text
        run_url = f"{node.url}/runs/{accepted.json()['id']}"
        await anyio.sleep(2 * float(SETTINGS["STREAMSVC_HEARTBEAT_SECONDS"]) + 1)
        waiting = (await client.get(run_url)).json()
        assert (waiting["status"], waiting["executor"]) == ("queued", None), waiting
        proxy.start()

        async def completed() -> Any:
            record = (await client.get(run_url)).json()
            return record if record["status"] not in ("queued", "running") else None

        record = await wait_for(completed, 40, "the run taken once the engine is back")
        assert record["status"] == "completed" and record["executor"] == executor.name, record
        health = (await client.get(node.url + "/health")).json()
        assert health["components"]["queue"]["executors"][0]["engine"] == "ready", health
    finally:
        proxy.stop()


def test_bad_settings_stop_an_executor_with_one_line_naming_the_setting(
    redis_url: str,
) -> None:
    code, err = bad_executor({"STREAMSVC_RUN_STORE": "redis://127.0.0.1:1/0"})
    assert code == 2 and "STREAMSVC_RUN_STORE=redis://127.0.0.1:1/0" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    wrong = redis_url.replace("redis://", "redis://nobody:wrong-pass@")
    code, err = bad_executor({"STREAMSVC_RUN_STORE": wrong})
    assert code == 2 and "STREAMSVC_RUN_STORE" in err and "wrong-pass" not in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    code, err = bad_executor({"STREAMSVC_RUN_STORE": "memory://"})
    assert code == 2 and "STREAMSVC_RUN_STORE=memory://" in err, err

    down = "unix:///tmp/streamsvc-no-engine.sock"
    code, err = bad_executor({"STREAMSVC_RUN_STORE": redis_url, "DOCKER_HOST": down})
    assert code == 2 and f"DOCKER_HOST={down}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


async def test_past_the_capacity_or_with_no_executor_a_run_is_busy(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    cluster.env |= {"STREAMSVC_QUEUE_CAPACITY": "1", "STREAMSVC_QUEUE_TIMEOUT_SECONDS": "1"}
    node = cluster.node()
    queued = await client.post(
        node.url + "/execute-connector", json=program(LINES, background=True)
    )
    assert queued.status_code == 202, queued.text
    full = await client.post(node.url + "/execute-connector", json=program(LINES, background=True))
    assert full.status_code == 429 and full.headers["retry-after"] == "1", full.text
    assert full.json()["error"]["code"] == "busy"
    health = (await client.get(node.url + "/health")).json()["components"]["queue"]
    assert (health["waiting"], health["executors"]) == (1, []), health
    cancelled = await client.post(f"{node.url}/runs/{queued.json()['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled", cancelled.text

    waited = time.monotonic()
    alone = await client.post(node.url + "/execute-connector", json=program(LINES))
    assert alone.status_code == 429 and alone.json()["error"]["code"] == "busy", alone.text
    prefix = cluster.store.partition("?prefix=")[2]
    assert f"none heartbeats under the key prefix {prefix!r}" in alone.text, alone.text
    assert "STREAMSVC_QUEUE_TIMEOUT_SECONDS" in alone.text, alone.text
    assert time.monotonic() - waited < 5
    record = (await client.get(f"{node.url}/runs/{alone.headers['x-run-id']}")).json()
    assert record["status"] == "failed" and record["error"]["code"] == "busy", record


ALICE = {"authorization": "Bearer key-alice-0123456789"}
BOB = {"x-api-key": "key-bob-0123456789"}


async def test_one_key_cannot_fill_the_queue_through_two_nodes(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    cluster.env |= {
        "STREAMSVC_API_KEYS": "key-alice-0123456789,key-bob-0123456789",
        "STREAMSVC_MAX_ACTIVE_RUNS_PER_KEY": "2",
    }
    nodes = [cluster.node(), cluster.node()]  # no executor: every run stays queued
    url = "/execute-connector"
    answers = [
        await client.post(
            nodes[i % 2].url + url, json=program(LINES, background=True), headers=ALICE
        )
        for i in range(3)
    ]
    assert [a.status_code for a in answers] == [202, 202, 429], [a.text for a in answers]
    assert answers[2].json()["error"]["code"] == "too_many_runs"
    assert answers[2].headers["retry-after"] == "1"
    listed = (await client.get(nodes[0].url + "/runs", headers=ALICE)).json()["runs"]
    assert len(listed) == 2, listed  # the refused run left no record
    bob = await client.post(nodes[1].url + url, json=program(LINES, background=True), headers=BOB)
    assert bob.status_code == 202, bob.text
    cancelled = await client.post(
        f"{nodes[1].url}/runs/{answers[0].json()['id']}/cancel", headers=ALICE
    )
    assert cancelled.json()["status"] == "cancelled", cancelled.text
    again = await client.post(
        nodes[0].url + url, json=program(LINES, background=True), headers=ALICE
    )
    assert again.status_code == 202, again.text  # an ended run frees its place


async def test_six_hundred_readers_of_one_run_leave_the_node_answering(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    node = cluster.node()  # no executor: the run stays queued, its readers block on Redis
    run = (
        await client.post(node.url + "/execute-connector", json=program(LINES, background=True))
    ).json()
    request = (
        f"GET {run['events_url']} HTTP/1.1\r\nHost: 127.0.0.1:{node.url.rpartition(':')[2]}\r\n\r\n"
    )
    streams: list[tuple[anyio.abc.SocketStream, bytearray]] = []

    async def reader() -> None:
        stream = await anyio.connect_tcp("127.0.0.1", int(node.url.rpartition(":")[2]))
        answer = bytearray()
        streams.append((stream, answer))
        await stream.send(request.encode())
        answer += await stream.receive()

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                for _ in range(600):
                    tasks.start_soon(reader)
        await anyio.sleep(1.5)  # every admitted reader is in its blocking read
        began = time.monotonic()
        shown = await client.get(f"{node.url}/runs/{run['id']}")
        health = (await client.get(node.url + "/health")).json()["components"]
        took = time.monotonic() - began
        for stream, answer in streams:  # a reader past the cap: 429, or a busy event
            with anyio.move_on_after(0.01):
                answer += await stream.receive()
    finally:
        for stream, _ in streams:
            await stream.aclose()
    assert shown.status_code == 200 and took < 1.0, (shown.text, took)
    assert health["runs"]["state"] == "ready" and health["queue"]["state"] != "unavailable"
    refused = [a for _, a in streams if a[9:12] == b"429" or b'"code":"busy"' in a]
    assert len(streams) - len(refused) == MAX_READERS, (len(refused), streams[0][1][:300])


async def test_concurrent_cancels_of_a_queued_run_all_answer_cancelled(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    nodes = [cluster.node(), cluster.node()]  # no executor: the run stays queued
    answers: list[str] = []
    for _ in range(3):
        queued = await client.post(
            nodes[0].url + "/execute-connector", json=program(LINES, background=True)
        )

        async def cancel(node: ServerProcess, run_id: str = queued.json()["id"]) -> None:
            answer = await client.post(f"{node.url}/runs/{run_id}/cancel")
            answers.append(answer.json()["status"])

        async with anyio.create_task_group() as tasks:
            for i in range(10):
                tasks.start_soon(cancel, nodes[i % 2])
    assert answers == ["cancelled"] * 30, answers


SECRET = "env-value-7f3a9c"


async def test_env_values_leave_redis_once_an_executor_took_the_run(
    cluster: Cluster, redis_url: str, client: httpx.AsyncClient
) -> None:
    node = cluster.node()
    code = "import os, json\nprint(json.dumps({'ok': True, 'result': len(os.environ['TOKEN'])}))\n"
    body = program(code, env={"TOKEN": SECRET}, background=True)
    started = await client.post(node.url + "/execute-connector", json=body)
    run_id = started.json()["id"]
    prefix = cluster.store.partition("?prefix=")[2]

    def everything() -> bytes:
        """Every value under the test's prefix, as bytes."""
        found = []
        with redis.Redis.from_url(redis_url) as r:
            for key in r.scan_iter(match=f"{prefix}*", count=500):
                kind = r.type(key)
                if kind == b"string":
                    found.append(r.get(key) or b"")
                elif kind == b"hash":
                    found += [k + v for k, v in r.hgetall(key).items()]
                elif kind == b"stream":
                    found += [repr(e).encode() for e in r.xrange(key)]
        return b"\n".join(found)

    assert SECRET.encode() in everything()  # queued: waiting for an executor, in one key
    cluster.executor()

    async def done() -> Any:
        record = (await client.get(f"{node.url}/runs/{run_id}")).json()
        return record if record["status"] == "completed" else None

    record = await wait_for(done, 60, "the run completes")
    assert record["result"]["result"] == len(SECRET)
    assert SECRET.encode() not in everything()


async def test_a_client_gone_before_the_first_event_withdraws_its_queued_run(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    node = cluster.node()  # no executor: the run stays queued
    with pytest.raises(httpx.ReadTimeout):
        await client.post(node.url + "/execute-connector", json=program(LINES), timeout=1.0)

    async def withdrawn() -> Any:
        found = (await client.get(node.url + "/runs")).json()["runs"]
        return found if found and found[0]["status"] == "cancelled" else None

    runs = await wait_for(withdrawn, 10, "the run is cancelled")
    assert runs[0]["error"]["code"] == "cancelled", runs
    health = (await client.get(node.url + "/health")).json()["components"]["queue"]
    assert health["waiting"] == 0, health


async def test_redis_restarted_mid_load_loses_no_acknowledged_run(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """SIGKILL a private Redis (AOF, fsync always) under a stream of background and streamed
    runs, start it again on the same data: every acknowledged run ends, its log whole; the
    outage's requests are 503s; node and executor carry on without a restart."""
    server = PrivateRedis(tmp_path)
    server.start()
    cluster = Cluster(f"{server.url}?prefix=restart:")
    try:
        node, executor = cluster.node(), cluster.executor()
        acknowledged: list[str] = []
        refused: list[httpx.Response] = []
        streams: list[SSEResponse] = []
        killed = anyio.Event()
        refused_stream = SSEResponse(0, httpx.Headers())

        async def post_background() -> None:
            try:
                answer = await client.post(
                    node.url + "/execute-connector", json=program(LINES, background=True)
                )
            except httpx.HTTPError as exc:  # the server hung up: not acknowledged
                raise AssertionError(f"no answer during the outage: {exc!r}") from None
            if answer.status_code == 202:
                acknowledged.append(answer.headers["x-run-id"])
            else:
                refused.append(answer)

        async def post_stream() -> None:
            body = program(SLOW.format(n=12), stream=True)
            streams.append(await read_sse(client, node.url + "/execute-connector", body))

        async with anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(post_stream)
            for i in range(24):
                tasks.start_soon(post_background)
                await anyio.sleep(0.1)
                if i == 11:  # runs queued, running and ending: Redis goes
                    server.kill()
                    killed.set()
                    down = await client.post(
                        node.url + "/execute-connector", json=program(LINES, background=True)
                    )
                    refused.append(down)
                    body = program(LINES, stream=True)
                    refused_stream = await read_sse(client, node.url + "/execute-connector", body)
                    await anyio.sleep(0.5)
                    await anyio.to_thread.run_sync(server.start)
        assert killed.is_set()
        assert refused_stream.status == 503, refused_stream.events
        assert refused_stream.body["error"]["code"] == "run_store_unavailable"

        # (b) refused during the outage: a JSON 503 with a stable code
        assert refused, "no request met the outage"
        for answer in refused:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "run_store_unavailable", answer.text
        # streams whose headers came are acknowledged runs too
        for cut in streams:
            if cut.status == 200:
                acknowledged.append(cut.headers["x-run-id"])
            else:
                assert cut.status == 503, cut.body
                assert cut.body["error"]["code"] == "run_store_unavailable", cut.body
        assert len(acknowledged) >= 12, (acknowledged, refused)

        # (a) every acknowledged run ends, its log 1..n once each with one terminal event
        unended: list[Any] = []

        async def ended() -> Any:
            records = [(await client.get(f"{node.url}/runs/{i}")).json() for i in acknowledged]
            unended[:] = [r for r in records if r.get("status") in {None, "queued", "running"}]
            return None if unended else records

        try:
            records = await wait_for(ended, 25, "every acknowledged run ends")
        except AssertionError:
            raise AssertionError((unended, executor.log()[-6000:])) from None
        for record in records:
            events = stored_events(server.url, cluster.store, record["id"])
            names = [name for _, name in events]
            assert [i for i, _ in events] == list(range(1, len(events) + 1)), events
            assert names[-1] in {"done", "error"}, events
            assert names.count("done") + names.count("error") == 1, events
            # Completed, or (a run taken as Redis went, its claim unanswered) executor_lost.
            if record["status"] != "completed":
                assert record["status"] == "interrupted", record
                assert record["error"]["code"] == "executor_lost", record
            else:
                assert names.count("stdout") >= 1 and names[-1] == "done", events

        # a stream cut by the outage resumes after its last event: no gap, no duplicate
        for cut in streams:
            if cut.status != 200:
                continue
            stored = [e for e in cut.events if e.id is not None]
            if cut.last.id is None:  # the node lost Redis: an error frame, not the run's end
                assert cut.last.event == "error", cut.events
                assert cut.last.data["error"]["code"] == "run_store_unavailable", cut.last
            run_id, last = cut.headers["x-run-id"], stored[-1].id
            rest = await run_events(client, f"{node.url}/runs/{run_id}/events", last)
            ids = [int(e.id or 0) for e in stored + rest]
            assert ids == list(range(1, len(ids) + 1)), ids
            assert (stored + rest)[-1].event in {"done", "error"}, rest

        # (c) the same node and executor serve new runs; /health is ready again
        async def ready() -> Any:
            health = (await client.get(node.url + "/health")).json()["components"]
            runs, queue = health["runs"], health["queue"]
            listed = [e["name"] for e in queue.get("executors", [])]
            return runs["state"] == "ready" and queue["state"] == "ready" and listed

        assert await wait_for(ready, 10, "/health is ready") == [executor.name]
        answer = await client.post(node.url + "/execute-connector", json=program(LINES))
        assert answer.status_code == 200 and answer.json()["ok"], answer.text
        assert answer.json()["executor"] == executor.name
        assert node.process.poll() is None and executor.process.poll() is None
    finally:
        cluster.close()
        server.kill()


async def test_the_python_client_rides_out_a_redis_restart(tmp_path: Path) -> None:
    """A node whose Redis goes ends its stream with an id-less ``run_store_unavailable`` error
    (the run goes on) and refuses re-attachments with 503 until Redis is back: the client
    re-attaches through both, and gets every event once and the run's end."""
    server = PrivateRedis(tmp_path)
    server.start()
    cluster = Cluster(f"{server.url}?prefix=ride:")
    cluster.env |= {"STREAMSVC_LEASE_SECONDS": "15"}  # the outage does not outlast the lease
    try:
        node, executor = cluster.node(), cluster.executor()
        reasons: list[str] = []
        at = Attachment(lambda _, why: reasons.append(why))
        frames: list[Frame] = []
        body = program(SLOW.format(n=20), stream=True)
        async for frame in AsyncClient(node.url).frames("/execute-connector", body, at):
            frames.append(frame)
            if frame.event == "stdout" and len(frames) == 4:
                server.kill()
                await anyio.sleep(2.0)  # longer than the node's own retries
                await anyio.to_thread.run_sync(server.start)
        assert any("run_store_unavailable" in why for why in reasons), reasons
        assert [f.id for f in frames] == [str(i) for i in range(1, len(frames) + 1)], frames
        assert frames[-1].event == "done", frames[-1]
        assert sum(f.data.count("tick") for f in frames if f.event == "stdout") == 20
        done = run_event(frames[-1])
        assert isinstance(done, RunDone) and done.result.ok, frames[-1]
        assert done.result.executor == executor.name  # and the record names it
        assert at.run_id is not None
        assert (await AsyncClient(node.url).get_run(at.run_id)).executor == executor.name
    finally:
        cluster.close()
        server.kill()


async def test_an_executor_whose_engine_went_takes_no_run_and_health_says_so(
    cluster: Cluster, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """One executor reaches the engine through a socket this test forwards, then cuts: it
    shows ``engine: unavailable`` in ``/health`` and leaves every run to the other one
    (before: failing fast, it took most runs and failed them ``sandbox_unavailable``)."""
    proxy = EngineProxy(tmp_path / "engine.sock")
    proxy.start()
    try:
        node = cluster.node()
        lost, good = cluster.executor(proxy.url), cluster.executor()

        async def engines() -> Any:
            queue = (await client.get(node.url + "/health")).json()["components"]["queue"]
            return {e["name"]: e["engine"] for e in queue.get("executors", [])}

        both = await wait_for(lambda: _when(engines, lambda e: len(e) == 2), 30, "both seen")
        assert set(both.values()) == {"ready"}, both
        proxy.stop()
        found = await wait_for(
            lambda: _when(engines, lambda e: e.get(lost.name) == "unavailable"),
            15, "the cut engine shows unavailable",
        )  # fmt: skip
        assert found == {lost.name: "unavailable", good.name: "ready"}, found
        health = (await client.get(node.url + "/health")).json()["components"]["queue"]
        assert health["state"] == "degraded" and lost.name in health["reason"], health
        await anyio.sleep(1.0)  # past a take already waiting when the engine went (0.5 s)
        for _ in range(6):
            answer = await client.post(node.url + "/execute-connector", json=program(LINES))
            assert answer.status_code == 200 and answer.json()["ok"], answer.text
            assert answer.json()["executor"] == good.name, answer.text
        assert "taking no run until it does" in lost.log()
    finally:
        proxy.stop()


async def _when(check: Callable[[], Any], condition: Callable[[Any], bool]) -> Any:
    found = await check()
    return found if condition(found) else None


async def test_with_no_executor_health_is_degraded_but_the_node_stays_ready(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    node = cluster.node()
    health = (await client.get(node.url + "/health")).json()
    queue = health["components"]["queue"]
    assert (queue["state"], queue["executors"]) == ("degraded", []), queue
    assert queue["reason"].startswith("no executor seen"), queue
    assert repr(health["components"]["runs"]["prefix"]) in queue["reason"], queue
    assert health["status"] == "degraded", health
    ready = await client.get(node.url + "/health/ready")  # chat and /runs still served here
    assert ready.status_code == 200, ready.text
    executor = cluster.executor()

    async def seen() -> Any:
        found = (await client.get(node.url + "/health")).json()["components"]["queue"]
        return found if found["state"] == "ready" else None

    queue = await wait_for(seen, 30, "the executor is seen")
    assert [e["name"] for e in queue["executors"]] == [executor.name] and "reason" not in queue
    assert queue["executors"][0]["engine"] == "ready", queue  # its sandbox's look at DOCKER_HOST


async def test_a_read_token_from_node_a_opens_the_events_on_node_b(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    cluster.env |= {"STREAMSVC_QUEUE_WAIT_SECONDS": "1"}  # no executor: it fails queue_timeout
    first, second = cluster.node(), cluster.node()
    accepted = await client.post(
        first.url + "/execute-connector", json=program(LINES, background=True)
    )
    assert accepted.status_code == 202, accepted.text
    events_url = accepted.json()["events_url"]
    assert "token=" in events_url
    started = time.monotonic()
    with anyio.fail_after(15):
        answer = await client.get(second.url + events_url, timeout=15)
    assert answer.status_code == 200, answer.text
    assert "event: error" in answer.text and "queue_timeout" in answer.text, answer.text
    assert time.monotonic() - started >= 0.5
    run_id = accepted.json()["id"]
    wrong = await client.get(f"{second.url}/runs/{run_id}/events?token=x{events_url[-8:]}")
    assert wrong.status_code == 404, wrong.text  # a token is still checked
    record = (await client.get(f"{second.url}/runs/{run_id}")).json()
    assert record["status"] == "failed" and record["error"]["code"] == "queue_timeout", record
