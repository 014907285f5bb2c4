"""Warm sandboxes on the real engine (issue 5, item 2), through a real server.

A server with ``STREAMSVC_WARM_POOL_SIZE=2`` keeps started sandboxes ready per
(image, network, dependency set, memory) key. These tests prove that a warm
run really uses a container started before its request, once; that nothing
of one run reaches the next (files, env, processes, the memory limit); that
per-request memory and timeout apply exactly, the deadline counting from the
delivery; that warm containers carry the same hardening as cold ones and no
secret in their config; that the runner's features (live lines, the process
limit flag, ``run(context)``, exit codes) work the same; that env the
interpreter reads at start-up sends a run cold; that a dependency set is
preloaded only when its import is clean and never for a request whose env
its import read; that the keys kept are bounded; and that shutdown, and the
next start after a crash, remove warm containers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import socket
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from tests.fake_azure import FakeAzure
from tests.harness import (
    FORK_UNTIL_REFUSED,
    HARDENING_REPORT,
    ServerProcess,
    assert_healthy,
    body,
    docker,
    execute,
    inspect,
    pool,
    pool_full,
    result_line,
    sandboxes,
    server_env,
    sse_events,
    stream,
    wait_until,
)

pytestmark = pytest.mark.docker

MiB = 1024 * 1024

HOSTNAME = """
    import json, socket
    print(json.dumps({"ok": True, "result": socket.gethostname()}))
"""


@pytest.fixture(scope="module")
def warm(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    """A server with the default pool: two warm sandboxes per key (empty: the default)."""
    process = ServerProcess(server_env(fake_azure, STREAMSVC_WARM_POOL_SIZE=""))
    yield process
    process.close()


def test_the_pool_is_on_by_default(warm: ServerProcess) -> None:
    assert pool(warm)["size"] == 2


def warm_ids(server: ServerProcess) -> set[str]:
    """Ids of the server's warm containers that are running (ready, or in a run)."""
    out = docker(
        "ps", "-q", "--no-trunc",
        "--filter", f"label=streamsvc.owner={socket.gethostname()}:{server.process.pid}",
        "--filter", "label=streamsvc.role=warm",
    )  # fmt: skip
    return set(out.split())


def primer(payload: Any) -> Any:
    """A quick run with the same pool key as ``payload`` (network, dependencies, memory)."""
    primed = copy.deepcopy(payload)
    primed["connector"]["files"] = {"main.py": textwrap.dedent(HOSTNAME)}
    primed["env"] = {}
    return primed


async def warm_run(client: httpx.AsyncClient, server: ServerProcess, payload: Any) -> Any:
    """Prime the key, wait for a full pool, run streamed; the answer (asserting it was warm)."""
    await execute(client, server, primer(payload))
    pool_full(server)
    answer = await stream(client, server, payload)
    starting = [e.data["message"] for e in answer.named("status") if e.data["phase"] == "starting"]
    assert starting == ["using a warm sandbox"], starting
    return answer.last.data


# -- served warm, once -------------------------------------------------------------------


async def test_a_warm_run_uses_a_container_started_before_the_request_once(
    warm: ServerProcess, client: httpx.AsyncClient
) -> None:
    await execute(client, warm, body(HOSTNAME))
    pool_full(warm)
    ready = warm_ids(warm)
    assert len(ready) >= 2
    before = pool(warm)
    host = result_line(await execute(client, warm, body(HOSTNAME)))
    [used] = [c for c in ready if c.startswith(host)]  # it existed before the request
    assert pool(warm)["hits"] == before["hits"] + 1
    wait_until(lambda: used not in sandboxes(warm), 10)  # used once, then destroyed
    pool_full(warm)
    assert used not in warm_ids(warm)
    assert len(warm_ids(warm) - ready) >= 1  # refilled with a new one


async def test_nothing_leaks_from_one_warm_run_to_the_next(
    warm: ServerProcess, client: httpx.AsyncClient
) -> None:
    token = uuid.uuid4().hex
    leave = f"""
        import json, os, socket, subprocess
        for path in ("/work/left", "/tmp/left", "/dev/shm/left", "/work/.streamsvc/left"):
            try:
                with open(path, "w") as handle:
                    handle.write("{token}")
            except OSError:
                pass
        os.environ["LEFT_BY_A"] = "{token}"
        subprocess.Popen(["python3", "-c", "import time; time.sleep(600)", "{token}"],
                         start_new_session=True)
        print(json.dumps({{"ok": True, "result": socket.gethostname()}}))
    """
    look = f"""
        import json, os, socket
        def read(path):
            try:
                return open(path).read().strip()
            except OSError:
                return None
        found = [p for p in ("/work/left", "/tmp/left", "/dev/shm/left", "/work/.streamsvc/left")
                 if os.path.exists(p)]
        processes = [read(f"/proc/{{pid}}/cmdline") or "" for pid in os.listdir("/proc")
                     if pid.isdigit()]
        print(json.dumps({{"ok": True, "result": {{
            "host": socket.gethostname(),
            "found": found,
            "env": sorted(k for k, v in os.environ.items() if "{token}" in v or k == "LEFT_BY_A"),
            "daemons": sum("{token}" in p for p in processes),
            "listing": {{d: sorted(os.listdir(d)) for d in ("/work", "/tmp", "/dev/shm")}},
            "limit": int(read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
                         or read("/sys/fs/cgroup/memory.max")),
        }}}}))
    """
    secret_env = {"A_SECRET": f"secret-{token}"}
    first = result_line(await execute(client, warm, body(leave, memory_mb=96, env=secret_env)))
    pool_full(warm)
    second = result_line(await execute(client, warm, body(look, memory_mb=96)))
    assert second["host"] != first
    assert second["found"] == [] and second["env"] == [] and second["daemons"] == 0
    listing = {"/work": [".streamsvc", "main.py", "out"], "/tmp": [], "/dev/shm": []}
    assert second["listing"] == listing  # out: the (empty) output directory
    assert second["limit"] == 96 * MiB
    # Another memory limit is another key: never the previous request's limit.
    third = result_line(await execute(client, warm, body(look, memory_mb=160)))
    assert third["limit"] == 160 * MiB and third["daemons"] == 0
    fourth = await warm_run(client, warm, body(look, memory_mb=96))
    assert fourth["result"]["limit"] == 96 * MiB and fourth["result"]["found"] == []


# -- per-request limits ---------------------------------------------------------------------

MEMORY_BOMB = """
    import json
    chunks = []
    for _ in range(16):  # 128 MiB
        chunks.append(bytearray(8 * 1024 * 1024))
    limit = open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read().strip()
    print(json.dumps({"ok": True, "result": int(limit)}))
"""


async def test_memory_limits_apply_exactly_on_warm_sandboxes(
    warm: ServerProcess, client: httpx.AsyncClient
) -> None:
    small = await warm_run(client, warm, body(MEMORY_BOMB, memory_mb=64))
    assert small["oom_killed"] is True and small["ok"] is False
    assert small["error"]["code"] == "out_of_memory" and small["exit_code"] == 137
    large = await warm_run(client, warm, body(MEMORY_BOMB, memory_mb=256))
    assert large["ok"] is True and large["oom_killed"] is False
    assert large["result"] == 256 * MiB


SPIN = """
    print("spinning", flush=True)
    while True:
        pass
"""


async def test_timeouts_apply_exactly_on_warm_sandboxes_from_delivery(
    warm: ServerProcess, client: httpx.AsyncClient
) -> None:
    for timeout_ms in (1500, 3000):
        answer = await warm_run(client, warm, body(SPIN, timeout_ms=timeout_ms))
        assert answer["timed_out"] is True and answer["error"]["code"] == "timeout"
        assert answer["exit_code"] is None and answer["stdout"] == "spinning\n"
        assert timeout_ms <= answer["duration_ms"] < timeout_ms + 5000
    # The clock starts at delivery: a sandbox idle for longer than the timeout still runs.
    quick = 'print(\'{"ok": true, "result": "in time"}\')'
    await execute(client, warm, body(quick, timeout_ms=1000))
    pool_full(warm)
    await anyio.sleep(1.5)
    answer = await execute(client, warm, body(quick, timeout_ms=1000))
    assert answer["ok"] is True and answer["result"] == "in time", answer


# -- the same sandbox, warm or cold ------------------------------------------------------

HARDENING_FIELDS = (
    "Memory", "MemorySwap", "NanoCpus", "PidsLimit", "ReadonlyRootfs", "CapDrop",
    "SecurityOpt", "Privileged", "Tmpfs", "ShmSize", "IpcMode", "Ulimits", "LogConfig",
    "Init", "NetworkMode", "Binds", "AutoRemove",
)  # fmt: skip


async def hardening(client: httpx.AsyncClient, server: ServerProcess, payload: Any) -> Any:
    """The report from inside, and the engine's record, of one run (hung up after)."""
    async with contextlib.aclosing(sse_events(client, server, payload)) as events:
        async for name, data in events:
            if name == "stdout":
                report = json.loads(data["text"])
                break
        record = inspect(report.pop("hostname"))
    return report, record


async def test_warm_sandboxes_are_hardened_like_cold_ones_and_hold_no_secret(
    warm: ServerProcess, server: ServerProcess, client: httpx.AsyncClient
) -> None:
    secret = f"not-in-the-config-{uuid.uuid4().hex}"
    payload = body(HARDENING_REPORT, memory_mb=128, env={"API_TOKEN": secret})
    await execute(client, warm, body(HOSTNAME, memory_mb=128))
    pool_full(warm)
    warm_report, warm_record = await hardening(client, warm, payload)
    cold_report, cold_record = await hardening(client, server, payload)

    assert warm_record["Config"]["Labels"]["streamsvc.role"] == "warm"
    assert cold_record["Config"]["Labels"]["streamsvc.role"] == "run"
    # Inside: the same user, capabilities, mounts, limits (no /bundle any more).
    assert "/bundle" not in cold_report["mounts"]
    for report in (warm_report, cold_report):
        for mount in report["mounts"].values():  # the layers are each container's own
            mount["options"] = [o for o in mount["options"] if "dir=" not in o]
    assert warm_report == cold_report
    # The engine's record: the same hardening, and no request in the warm config.
    for field in HARDENING_FIELDS:
        assert warm_record["HostConfig"][field] == cold_record["HostConfig"][field], field
    assert warm_record["Config"]["User"] == cold_record["Config"]["User"] == "10001:10001"
    assert [m["Destination"] for m in warm_record["Mounts"]] == []
    assert cold_record["Mounts"] == []
    assert secret not in json.dumps(cold_record)  # cold too: delivered over stdin only
    assert secret not in json.dumps(warm_record)  # warm: delivered over stdin only


async def test_the_runner_works_the_same_on_warm_sandboxes(
    warm: ServerProcess, client: httpx.AsyncClient
) -> None:
    live = """
        import sys, time
        print("first")
        print("apart", file=sys.stderr)
        time.sleep(1)
        print('{"ok": true, "result": "second"}')
    """
    await execute(client, warm, primer(body(live)))
    pool_full(warm)
    answer = await stream(client, warm, body(live))
    stdout = answer.named("stdout")
    assert [e.data["text"] for e in stdout] == ["first\n", '{"ok": true, "result": "second"}\n']
    assert stdout[1].at - stdout[0].at > 0.8  # each line when written, not at the end
    assert answer.last.data["stderr"] == "apart\n" and answer.last.data["result"] == "second"

    limited = await warm_run(client, warm, body(FORK_UNTIL_REFUSED, memory_mb=512))
    assert limited["result"]["failure"] == "BlockingIOError"
    assert limited["error"]["code"] == "process_limit" and limited["pids_limited"] is True

    contract = """
        import atexit, os
        atexit.register(lambda: print("atexit ran"))

        def run(context):
            return {"sheet": context["connector"]["configuration"]["sheet"], "cwd": os.getcwd()}
    """
    result = await warm_run(client, warm, body(contract, configuration={"sheet": "S1"}))
    assert result["result"] == {"sheet": "S1", "cwd": "/work"}
    assert result["stdout"].endswith("atexit ran\n")

    failing = "raise SystemExit('failing on purpose')"
    failed = await warm_run(client, warm, body(failing))
    assert failed["exit_code"] == 1 and failed["stderr"] == "failing on purpose\n"
    crashed = await warm_run(client, warm, body("1 / 0"))
    assert crashed["exit_code"] == 1 and "ZeroDivisionError" in crashed["stderr"]
    assert_healthy(warm)


async def test_env_the_interpreter_reads_at_start_up_runs_cold(
    warm: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = """
        import json, os, sys, time
        print(json.dumps({"ok": True, "result": {
            "hash_randomization": sys.flags.hash_randomization,
            "timezone": time.timezone,
        }}))
    """
    answer = await stream(client, warm, body(code, env={"PYTHONHASHSEED": "0"}))
    starting = [e.data["message"] for e in answer.named("status") if e.data["phase"] == "starting"]
    assert starting == ["starting the sandbox"]  # the cold path
    assert answer.last.data["result"] == {"hash_randomization": 0, "timezone": 0}
    # TZ is not one of them: a warm runner applies it (time.tzset) before the program.
    tz = await warm_run(client, warm, body(code, env={"TZ": "UTC+05"}))
    assert tz["result"] == {"hash_randomization": 1, "timezone": 5 * 3600}


# -- dependencies -----------------------------------------------------------------------

PRELOADED = """
    import json, os, sys
    before = "tqdm" in sys.modules
    import tqdm
    print(json.dumps({"ok": True, "result": {
        "preloaded": before, "version": tqdm.__version__, "env": os.environ.get("TQDM_X")}}))
"""


async def test_a_dependency_set_is_preloaded_unless_its_import_read_the_request_env(
    start_server: Any, client: httpx.AsyncClient
) -> None:
    """tqdm reads every ``TQDM_*`` variable at import (it iterates ``os.environ``)."""
    dedicated: ServerProcess = start_server(STREAMSVC_WARM_POOL_SIZE="1")
    payload = body(PRELOADED, dependencies=["tqdm==4.67.1"])
    await execute(client, dedicated, payload)  # installs, then fills a preloaded sandbox
    pool_full(dedicated)
    without_env = result_line(await execute(client, dedicated, payload))
    assert without_env == {"preloaded": True, "version": "4.67.1", "env": None}
    pool_full(dedicated)
    with_env = body(PRELOADED, dependencies=["tqdm==4.67.1"], env={"TQDM_X": "1"})
    answer = await stream(client, dedicated, with_env)
    starting = [e.data["message"] for e in answer.named("status") if e.data["phase"] == "starting"]
    assert starting == ["starting a sandbox (none was warm)"]
    assert answer.last.data["result"] == {"preloaded": False, "version": "4.67.1", "env": "1"}


async def test_a_set_that_cannot_install_leaves_no_sandbox_behind(
    warm: ServerProcess, client: httpx.AsyncClient
) -> None:
    """The sandbox made while a new set installs goes when the install fails."""
    requirement = f"streamsvc-no-such-package-{uuid.uuid4().hex[:8]}==1.0"
    response = await client.post(
        warm.url + "/execute-connector", json=body("print(1)", dependencies=[requirement])
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "dependency_install_failed"
    pool_full(warm)
    wait_until(lambda: len(sandboxes(warm)) == pool(warm)["ready"], 10)
    volumes = docker("volume", "ls", "-q", "--filter", "label=streamsvc.deps").split()
    labelled = [docker("volume", "inspect", name) for name in volumes]
    assert not [text for text in labelled if requirement in text]  # its volume went too
    assert_healthy(warm)


# -- bounds and cleanup -------------------------------------------------------------------


async def test_only_the_most_recently_used_keys_stay_warm(
    start_server: Any, client: httpx.AsyncClient
) -> None:
    dedicated: ServerProcess = start_server(
        STREAMSVC_WARM_POOL_SIZE="1", STREAMSVC_WARM_POOL_KEYS="1"
    )
    for memory_mb in (64, 96):
        await execute(client, dedicated, body(HOSTNAME, memory_mb=memory_mb))
        pool_full(dedicated)
        assert pool(dedicated)["keys"] == 1
        wait_until(lambda: len(warm_ids(dedicated)) == 1, 10)
        [ready] = warm_ids(dedicated)
        assert inspect(ready)["HostConfig"]["Memory"] == memory_mb * MiB


async def test_shutdown_and_the_next_start_remove_warm_containers(
    start_server: Any, client: httpx.AsyncClient
) -> None:
    stopped: ServerProcess = start_server(STREAMSVC_WARM_POOL_SIZE="2")
    await execute(client, stopped, body(HOSTNAME))
    pool_full(stopped)
    assert len(sandboxes(stopped)) >= 2
    assert stopped.stop() == 0
    assert sandboxes(stopped) == []  # gone before the process exited

    crashed: ServerProcess = start_server(STREAMSVC_WARM_POOL_SIZE="2")
    await execute(client, crashed, body(HOSTNAME))
    pool_full(crashed)
    assert len(sandboxes(crashed)) >= 2
    left = sandboxes(crashed)
    crashed.signal(signal.SIGKILL)
    crashed.process.wait(10)
    start_server()  # a new server removes a dead process's containers at start-up
    assert [c for c in left if docker("ps", "-aq", "--filter", f"id={c}").strip()] == []


async def test_pool_size_zero_keeps_nothing_warm(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    await execute(client, server, body(HOSTNAME))
    assert pool(server)["size"] == 0 and pool(server)["ready"] == 0
    assert warm_ids(server) == set()


# -- the bookkeeping, without an engine --------------------------------------------------


def test_end_lines_are_found_across_chunks_and_kept_out_of_the_output() -> None:
    from streamsvc.sandbox.docker.warm_protocol import EndLines as _EndLines

    ends = _EndLines("abc123")
    line = b'\x1estreamsvc-end abc123 {"exit_code": 3, "oom_killed": false}\n'
    out = ends.feed(1, b"hello \x1e")  # may start the marker: held back
    out += ends.feed(1, b"not the marker\n")
    assert out == b"hello \x1enot the marker\n"
    stdout = ends.feed(1, b"last" + line[:10]) + ends.feed(1, line[10:] + b"after the end")
    assert stdout == b"last" and not ends.complete
    assert ends.feed(2, b"err\n" + line) == b"err\n" and ends.complete
    verdict = ends.verdict()
    assert verdict is not None and (verdict.exit_code, verdict.oom_killed) == (3, False)
    assert ends.feed(1, b"a leftover process") == b""

    forged = _EndLines("abc123")
    forged.feed(1, b'\x1estreamsvc-end wrongnonce {"exit_code": 0}\n')
    assert not forged.complete  # without the run's nonce it is only output
    unfinished = _EndLines("abc123")
    assert unfinished.feed(2, b"tail \x1estreamsvc-e") == b"tail "
    assert unfinished.leftover(2) == b"\x1estreamsvc-e"  # the stream ended: it was output


async def test_the_pool_hands_each_sandbox_out_once_and_keeps_the_recent_keys() -> None:
    from streamsvc.sandbox.warm_pool import WarmPool

    made: list[str] = []
    discarded: list[str] = []
    broken: dict[str, anyio.Event] = {}

    async def fill(key: str) -> str:
        name = f"{key}-{len(made)}"
        made.append(name)
        broken[name] = anyio.Event()
        return name

    async def discard(sandbox: str) -> None:
        discarded.append(sandbox)

    async def watch(sandbox: str) -> None:
        await broken[sandbox].wait()

    async def settle() -> None:
        for _ in range(50):
            await anyio.lowlevel.checkpoint()

    pool: WarmPool[str, str] = WarmPool(2, 2, fill=fill, discard=discard, watch=watch)
    async with anyio.create_task_group() as tg:
        pool.start(tg)
        assert await pool.take("a", refill=False) is None  # nothing ready yet
        pool.touch("a")
        await settle()
        assert pool.ready("a") == 2
        first = await pool.take("a", refill=False)
        second = await pool.take("a", refill=False)
        assert {first, second} == {"a-0", "a-1"} and await pool.take("a") is None
        await settle()  # that take refilled
        broken["a-2"].set()  # an idle sandbox goes bad: dropped, replaced
        await settle()
        assert "a-2" in discarded and pool.ready("a") == 2
        pool.touch("b")
        pool.touch("c")  # a third key: the least recently used ("a") goes
        await settle()
        assert pool.stats()["keys"] == 2 and pool.ready("a") == 0
        assert {"a-2", "a-3", "a-4"} <= set(discarded)
        await pool.close()
        assert set(made) - {first, second} == set(discarded)  # every idle one destroyed
        assert pool.stats()["hits"] == 2
        tg.cancel_scope.cancel()
