"""Execution on the real engine, through the real server: containers, limits, output.

Issue 3 (items 4 and 5) and the hardening of issue 4 (item 1): a fresh
container per run, files over stdin, memory = memory+swap = memoryMb, the
wall clock, the network per network_mode, stdout and stderr apart and in
order, the ``run(context)`` contract and the context file, and every
hardening setting checked twice: from inside the sandbox and in the engine's
own record of the container.
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

import anyio
import httpx
import pytest

from tests.harness import (
    HARDENING_REPORT,
    ServerProcess,
    assert_healthy,
    assert_no_sandboxes,
    body,
    docker,
    execute,
    inspect,
    result_line,
    sandboxes,
    seed_request,
    sse_events,
    stream,
)

pytestmark = pytest.mark.docker

SEED = seed_request()


async def test_seed_example_streamed_and_unstreamed(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    answer = await stream(client, server, SEED)
    # A cache miss says it installs first (then how long so far, every 2 s); a hit only
    # that the set is ready.
    statuses = [e.data for e in answer.named("status")]
    phases = [
        s["phase"]
        for s in statuses
        if not (s["phase"] == "installing_dependencies" and "elapsed_ms" in s)
    ]
    assert phases in (
        ["validated", "installing_dependencies", "dependencies_ready", "starting", "running"],
        ["validated", "dependencies_ready", "starting", "running"],
    ), phases
    ids = [int(e.id or 0) for e in answer.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    done = answer.last.data
    assert done["ok"] is True and done["result"] == {"hello": "world"}, done
    assert done["exit_code"] == 0 and not done["timed_out"] and not done["oom_killed"]
    assert "".join(e.data["text"] for e in answer.named("stdout")) == done["stdout"]

    plain = await execute(client, server, {**SEED, "stream": False})
    assert plain["ok"] is True and plain["result"] == {"hello": "world"}
    assert_no_sandboxes(server)


async def test_stdout_and_stderr_are_separate_events_in_order(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = """
        import sys, time
        for i in range(3):
            print(f"out {i}", flush=True)
            time.sleep(0.1)
            print(f"err {i}", file=sys.stderr, flush=True)
            time.sleep(0.1)
        print('{"ok": true, "result": "done"}')
    """
    answer = await stream(client, server, body(code))
    chunks = [(e.event, e.data["text"]) for e in answer.events if e.event in ("stdout", "stderr")]
    expected = []
    for i in range(3):
        expected += [("stdout", f"out {i}\n"), ("stderr", f"err {i}\n")]
    assert chunks == [*expected, ("stdout", '{"ok": true, "result": "done"}\n')]
    done = answer.last.data
    assert done["stderr"] == "err 0\nerr 1\nerr 2\n"
    assert done["stdout"].startswith("out 0\nout 1\nout 2\n")
    assert done["ok"] is True


async def test_output_is_live_one_event_per_line(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = """
        import sys, time
        print("first")
        time.sleep(1)
        sys.stdout.write("partial")
        sys.stdout.flush()
        time.sleep(1)
        print(" line")
    """
    answer = await stream(client, server, body(code))
    stdout = answer.named("stdout")
    assert [e.data["text"] for e in stdout] == ["first\n", "partial", " line\n"]
    assert stdout[1].at - stdout[0].at > 0.8  # each arrived when written, not at the end
    assert stdout[2].at - stdout[1].at > 0.8


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_run_context_contract_and_context_file(
    kind: str, server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = f"""
        import asyncio, json, os
        with open(os.environ["STREAMSVC_CONTEXT_FILE"]) as handle:
            from_file = json.load(handle)
        print("loaded", os.path.basename(os.environ["STREAMSVC_CONTEXT_FILE"]))

        {"async " if kind == "async" else ""}def run(context):
            {"await asyncio.sleep(0.01)" if kind == "async" else "pass"}
            return {{
                "sheet": context["connector"]["configuration"]["sheetName"],
                "same_as_file": context == from_file,
                "cwd": os.getcwd(),
            }}
    """
    payload = body(code, configuration={"sheetName": "Sheet1"})
    payload["configuration_overrides"] = {"sheetName": "Overridden"}
    answer = await execute(client, server, payload)
    assert answer["result"] == {"sheet": "Overridden", "same_as_file": True, "cwd": "/work"}
    assert answer["stdout"].startswith("loaded context.json\n")
    assert answer["ok"] is True


async def test_every_run_gets_a_fresh_container(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = """
        import json, socket
        print(json.dumps({"ok": True, "result": socket.gethostname()}))
    """
    first = result_line(await execute(client, server, body(code)))
    second = result_line(await execute(client, server, body(code)))
    assert first != second
    assert_no_sandboxes(server)


async def test_memory_limit_is_memory_mb_without_swap(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = """
        import json, os
        def read(path):
            try:
                return open(path).read().strip()
            except OSError:
                return None
        v1 = "/sys/fs/cgroup/memory/"
        print(json.dumps({"ok": True, "result": {
            "limit": read(v1 + "memory.limit_in_bytes") or read("/sys/fs/cgroup/memory.max"),
            "with_swap": read(v1 + "memory.memsw.limit_in_bytes"),
            "swap_v2": read("/sys/fs/cgroup/memory.swap.max"),
        }}))
    """
    limits = result_line(await execute(client, server, body(code, memory_mb=96)))
    assert int(limits["limit"]) == 96 * 1024 * 1024
    if limits["with_swap"] is not None:  # cgroup v1: memory + swap
        assert int(limits["with_swap"]) == 96 * 1024 * 1024
    else:  # cgroup v2: swap alone
        assert limits["swap_v2"] == "0"


async def test_timeout_kills_the_run(server: ServerProcess, client: httpx.AsyncClient) -> None:
    code = """
        print("spinning", flush=True)
        while True:
            pass
    """
    answer = await execute(client, server, body(code, timeout_ms=1500))
    assert answer["timed_out"] is True and answer["ok"] is False
    assert answer["exit_code"] is None
    assert answer["error"]["code"] == "timeout"
    assert 1500 <= answer["duration_ms"] < 1500 + 5000
    assert answer["stdout"] == "spinning\n"
    assert_no_sandboxes(server)


async def test_network_none_has_only_loopback(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = """
        import json, os
        print(json.dumps({"ok": True, "result": sorted(os.listdir("/sys/class/net"))}))
    """
    assert result_line(await execute(client, server, body(code))) == ["lo"]


LISTENER = """
    import json, os, socket
    server = socket.socket()
    server.bind(("0.0.0.0", 8080))
    server.listen()
    server.settimeout(20)
    me = {
        "hostname": socket.gethostname(),
        "address": socket.gethostbyname(socket.gethostname()),
        "nets": sorted(os.listdir("/sys/class/net")),
    }
    print(json.dumps(me), flush=True)
    peers = []
    while True:
        connection, peer = server.accept()
        peers.append(peer[0])
        if connection.recv(16) == b"quit":
            break
    print(json.dumps({"ok": True, "result": peers}))
"""

DIALER = """
    import socket
    def run(context):
        target = context["connector"]["configuration"]["target"]
        try:
            socket.create_connection((target, 8080), timeout=3).close()
            return "connected"
        except OSError as exc:
            return type(exc).__name__
"""


def _dial(address: str, message: bytes) -> None:
    with socket.create_connection((address, 8080), timeout=10) as sock:
        sock.sendall(message)


async def test_bridge_is_the_service_network_and_sandboxes_cannot_reach_each_other(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    network = json.loads(docker("network", "inspect", "streamsvc-sandbox"))[0]
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    listening = anyio.Event()
    seen: dict[str, Any] = {}

    async def listen() -> None:
        async with contextlib.aclosing(
            sse_events(client, server, body(LISTENER, network="bridge"))
        ) as events:
            async for name, data in events:
                if name == "stdout" and "me" not in seen:
                    seen["me"] = json.loads(data["text"])
                    listening.set()
                elif name == "done":
                    seen["answer"] = data

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await listening.wait()
            me = seen["me"]
            assert me["nets"] == ["eth0", "lo"]
            networks = inspect(me["hostname"])["NetworkSettings"]["Networks"]
            assert list(networks) == ["streamsvc-sandbox"]
            await anyio.to_thread.run_sync(_dial, me["address"], b"hello")  # the host can
            dialer = body(DIALER, network="bridge", configuration={"target": me["address"]})
            verdict = result_line(await execute(client, server, dialer))  # a sandbox cannot
            await anyio.to_thread.run_sync(_dial, me["address"], b"quit")

    assert verdict in ("timeout", "TimeoutError", "ConnectionRefusedError"), verdict
    peers = seen["answer"]["result"]
    assert len(peers) == 2 and peers[0] == peers[1] == network["IPAM"]["Config"][0]["Gateway"]


async def test_hardening_seen_from_inside_and_by_the_engine(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    payload = body(HARDENING_REPORT, memory_mb=128)
    async with contextlib.aclosing(sse_events(client, server, payload)) as events:
        async for name, data in events:
            if name == "stdout":
                report = json.loads(data["text"])
                break
        record = inspect(report["hostname"])
        logs = docker("logs", report["hostname"], check=False)
    assert_no_sandboxes(server)  # hanging up removed it

    # Inside: an unprivileged user with nothing to escalate with.
    assert (report["uid"], report["euid"], report["gid"]) == (10001, 10001, 10001)
    assert report["groups"] in ([], [10001])
    assert set(report["caps"].values()) == {"0000000000000000"}, report["caps"]
    assert report["no_new_privs"] == "1"
    assert report["seccomp"] == "2"  # Docker's default profile (filter mode)
    # The root filesystem is read-only; the writable places are size-capped tmpfs.
    mounts = report["mounts"]
    assert "ro" in mounts["/"]["options"]
    for place in ("/work", "/tmp", "/dev/shm"):
        assert mounts[place]["type"] == "tmpfs"
        assert {"nosuid", "nodev", "noexec"} <= set(mounts[place]["options"])
        assert report["sizes"][place] == 64 * 1024 * 1024
    assert "/bundle" not in mounts and "/opt/deps" not in mounts  # files come over stdin
    assert report["pids_max"] == "128"
    assert report["nofile"] == [256, 256]
    assert report["fsize"] == [64 * 1024 * 1024] * 2
    assert report["cpu"] in (["100000", "100000"], "100000 100000")
    assert report["sockets"] == []

    # The engine's record of the same container.
    host = record["HostConfig"]
    assert record["Config"]["User"] == "10001:10001"
    assert record["Config"]["Labels"]["streamsvc.managed"] == "true"
    assert record["Config"]["Labels"]["streamsvc.role"] == "run"
    assert record["Config"]["Labels"]["streamsvc.owner"].endswith(f":{server.process.pid}")
    assert host["ReadonlyRootfs"] is True and host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Memory"] == host["MemorySwap"] == 128 * 1024 * 1024
    assert host["NanoCpus"] == 1_000_000_000
    assert host["PidsLimit"] == 128
    assert host["Init"] is True
    assert host["NetworkMode"] == "none"
    assert host["LogConfig"] == {"Type": "none", "Config": {}}
    assert not host["Binds"]
    assert all(mount["Type"] == "volume" for mount in record["Mounts"]), record["Mounts"]
    assert record["Mounts"] == []  # no volume: the files came over stdin
    assert sorted(host["Tmpfs"]) == ["/tmp", "/work"]
    assert {u["Name"]: u["Hard"] for u in host["Ulimits"]} == {
        "nofile": 256,
        "fsize": 64 * 1024 * 1024,
    }
    assert logs == ""  # no json-file log: nothing on the host's disk


async def test_bridge_only_when_allowed_and_limits_follow_the_settings(
    start_server: Any, client: httpx.AsyncClient
) -> None:
    locked = start_server(
        STREAMSVC_ALLOW_BRIDGE="false",
        STREAMSVC_CPUS="0.5",
        STREAMSVC_PIDS_LIMIT="40",
        STREAMSVC_TMPFS_MB="16",
    )
    code = """
        import json, os
        def read(path):
            return open(path).read().strip()
        stat = os.statvfs("/work")
        print(json.dumps({"ok": True, "result": {
            "quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            "pids": read("/sys/fs/cgroup/pids/pids.max"),
            "work": stat.f_blocks * stat.f_frsize,
        }}))
    """
    response = await client.post(
        locked.url + "/execute-connector", json=body(code, network="bridge")
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "network_not_allowed"
    assert not sandboxes(locked)
    limits = result_line(await execute(client, locked, body(code)))
    assert limits == {"quota": "50000", "pids": "40", "work": 16 * 1024 * 1024}
    assert_healthy(locked)
