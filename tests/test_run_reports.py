"""What a run reports besides its output: files it wrote, resource usage, clean tracebacks.

Real containers on the real engine (``docker`` marker), cold (the session's server) and warm
(a server with a warm pool).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import subprocess
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from streamsvc.sandbox.docker.warm_protocol import EndLines
from streamsvc.sandbox.runner.runner import END_MARKER
from streamsvc.sandbox.types import Usage
from tests.harness import (
    ServerProcess,
    asgi_client,
    body,
    docker,
    eventually,
    execute,
    owner,
    pool,
    pool_full,
    sse_events,
    stream,
)

FILES_PROGRAM = """
import hashlib, json, os
out = os.environ["STREAMSVC_OUTPUT_DIR"]
with open(os.path.join(out, "report.csv"), "w") as handle:
    handle.write("a,b\\n1,2\\n")
os.makedirs(os.path.join(out, "sub"))
big = os.urandom(1100 * 1024)
with open(os.path.join(out, "sub", "big.bin"), "wb") as handle:
    handle.write(big)
os.symlink("/etc/passwd", os.path.join(out, "link"))
os.symlink("/etc", os.path.join(out, "dirlink"))
os.mkfifo(os.path.join(out, "pipe"))
with open(os.path.join(out, "..", "escape.txt"), "w") as handle:
    handle.write("not an output")
print(json.dumps({"ok": True, "result": {"out": out, "big": hashlib.sha256(big).hexdigest()}}))
"""


def _check_files(answer: dict[str, Any]) -> None:
    assert answer["ok"] is True, answer
    assert answer["result"]["out"] == "/work/out"
    files = {item["name"]: item for item in answer["files"]}
    assert sorted(files) == ["dirlink", "link", "pipe", "report.csv", "sub/big.bin"]
    assert answer["files_omitted"] == 0
    report = files["report.csv"]
    assert base64.b64decode(report["content_base64"]) == b"a,b\n1,2\n"
    assert report["size"] == 8
    assert report["sha256"] == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    assert report["media_type"] == "text/csv"
    assert report["error"] is None
    big = files["sub/big.bin"]
    assert big["size"] == 1100 * 1024
    assert big["sha256"] == answer["result"]["big"]
    assert big["content_base64"] is None and big["error"] is None
    assert big["url"] == f"/runs/{answer['run_id']}/files/sub/big.bin"
    for name, kind in (("link", "link"), ("dirlink", "link"), ("pipe", "FIFO")):
        assert files[name]["error"]["code"] == "not_a_regular_file", files[name]
        assert kind in files[name]["error"]["message"]
        assert files[name]["content_base64"] is None and files[name]["sha256"] is None


@pytest.mark.docker
async def test_files_written_to_the_output_directory_come_back_cold(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    _check_files(await execute(client, server, body(FILES_PROGRAM)))


@pytest.mark.docker
async def test_files_and_usage_come_back_from_a_warm_sandbox(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    warm = start_server(STREAMSVC_WARM_POOL_SIZE="1")
    empty = body("import json; print(json.dumps({'ok': True}))")
    await execute(client, warm, empty)  # the key is kept warm from now on
    await anyio.to_thread.run_sync(pool_full, warm)
    streamed = await stream(client, warm, {**body(FILES_PROGRAM), "stream": True})
    _check_files(streamed.last.data)
    starting = [e.data for e in streamed.named("status") if e.data["phase"] == "starting"]
    assert starting == [{"phase": "starting", "message": "using a warm sandbox", "start": "warm"}]
    assert pool(warm)["hits"] == 1
    # The next warm sandbox starts empty: nothing of the earlier run's files.
    await anyio.to_thread.run_sync(pool_full, warm)
    second = await execute(client, warm, empty)
    assert pool(warm)["hits"] == 2
    assert second["files"] == [] and second["usage"]["cpu_ms"] is not None, second


@pytest.mark.docker
async def test_files_are_collected_with_the_standard_library_not_the_programs_modules(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    # Modules of the program named like the ones the runner imports to collect files.
    shadows = {f"{name}.py": "raise SystemExit('shadowed')\n" for name in ("base64", "hashlib")}
    shadows["mimetypes.py"] = "def guess_type(name):\n    return ('x/shadowed', None)\n"
    code = """
        import json, os
        with open(os.path.join(os.environ["STREAMSVC_OUTPUT_DIR"], "a.txt"), "w") as f:
            f.write("hello")
        print(json.dumps({"ok": True}))
    """
    warm = start_server(STREAMSVC_WARM_POOL_SIZE="1")
    for target in (warm, warm):  # the first run cold-starts the key's sandbox, the next is warm
        answer = await execute(client, target, body(code, files=shadows))
        assert answer["ok"] is True, answer
        [item] = answer["files"]
        assert (item["media_type"], item["content_base64"]) == ("text/plain", "aGVsbG8="), item
        assert item["sha256"] == hashlib.sha256(b"hello").hexdigest()
        await anyio.to_thread.run_sync(pool_full, warm)
    assert pool(warm)["hits"] >= 1


@pytest.mark.docker
async def test_the_count_cap_lists_the_first_files_by_name_and_counts_the_rest(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = """
        import json, os
        for i in range(40):
            with open(os.path.join(os.environ["STREAMSVC_OUTPUT_DIR"], f"f{i:02d}.txt"), "w") as f:
                f.write(str(i))
        print(json.dumps({"ok": True}))
    """
    answer = await execute(client, server, body(code))
    assert [item["name"] for item in answer["files"]] == [f"f{i:02d}.txt" for i in range(32)]
    assert answer["files_omitted"] == 8
    assert base64.b64decode(answer["files"][5]["content_base64"]) == b"5"


@pytest.mark.docker
async def test_a_file_named_out_is_refused_as_reserved(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    payload = body("print('{}')", files={"out/x.txt": "x"})
    response = await client.post(server.url + "/execute-connector", json=payload)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "unsafe_file_name"


@pytest.mark.docker
async def test_usage_reports_cpu_time_memory_peak_and_wall_clock(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = """
        import json, time
        start = time.process_time()
        while time.process_time() - start < 1.0:
            pass
        busy = time.process_time() - start
        block = b"x" * (120 * 1024 * 1024)
        time.sleep(0.3)
        print(json.dumps({"ok": True, "result": {"busy_ms": int(busy * 1000)}}))
    """
    answer = await execute(client, server, body(code, memory_mb=256))
    assert answer["ok"] is True, answer
    usage, busy = answer["usage"], answer["result"]["busy_ms"]
    assert busy * 0.9 <= usage["cpu_ms"] <= busy + 1000, (usage, busy)
    assert 120 <= usage["memory_peak_mb"] <= 256, usage
    assert usage["wall_ms"] >= busy + 300, usage
    assert usage["wall_ms"] <= answer["duration_ms"] + 50, (usage, answer["duration_ms"])

    idle = await execute(client, server, body("import json, time; time.sleep(0.5); print('{}')"))
    assert idle["usage"]["cpu_ms"] < 400, idle["usage"]
    assert idle["usage"]["memory_peak_mb"] < 100, idle["usage"]


@pytest.mark.docker
async def test_an_out_of_memory_run_exits_137_and_reports_its_peak(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    code = "blocks = []\nwhile True:\n    blocks.append(b'x' * (8 * 1024 * 1024))\n"
    answer = await execute(client, server, body(code, memory_mb=64))
    assert (answer["exit_code"], answer["oom_killed"]) == (137, True), answer
    assert answer["error"]["code"] == "out_of_memory"
    assert 48 <= answer["usage"]["memory_peak_mb"] <= 64, answer["usage"]


@pytest.mark.docker
async def test_a_killed_run_reports_its_wall_clock_only(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    answer = await execute(client, server, body("while True: pass", timeout_ms=1500))
    assert answer["timed_out"] is True and answer["exit_code"] is None
    assert answer["usage"]["cpu_ms"] is None and answer["usage"]["memory_peak_mb"] is None
    assert answer["usage"]["wall_ms"] == answer["duration_ms"]


@pytest.mark.docker
@pytest.mark.parametrize(
    "code",
    [
        "def fail():\n    raise ValueError('bad value')\n\nfail()\n",
        "def run(context):\n    raise ValueError('bad value')\n",
        "async def run(context):\n    raise ValueError('bad value')\n",
    ],
    ids=["script", "run", "async-run"],
)
async def test_tracebacks_start_at_the_programs_own_code(
    server: ServerProcess, client: httpx.AsyncClient, code: str
) -> None:
    answer = await execute(client, server, body(code))
    assert answer["exit_code"] == 1
    stderr = answer["stderr"]
    assert stderr.startswith('Traceback (most recent call last):\n  File "/work/main.py"'), stderr
    assert "runner.py" not in stderr and "runpy" not in stderr, stderr
    assert stderr.rstrip().endswith("ValueError: bad value"), stderr


@pytest.mark.docker
async def test_a_syntax_error_still_names_the_line(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    answer = await execute(client, server, body("x = (\n"))
    assert answer["exit_code"] == 1
    assert 'File "/work/main.py", line 1' in answer["stderr"], answer["stderr"]
    assert "SyntaxError" in answer["stderr"]


# -- secrets ---------------------------------------------------------------------------

SECRETS_PROGRAM = """
    import json, os, sys
    print("mode", os.environ["MODE"], "secret", os.environ["CLIENT_SECRET"])
    print("pin", os.environ["PIN"], file=sys.stderr)
    print(json.dumps({"ok": True, "result": {
        "status": os.environ["MODE"] + " ready",
        "secret": os.environ["CLIENT_SECRET"],
        "pin": os.environ["PIN"],
    }}))
"""
SECRET = "s3cr3t-Value-9"


@pytest.mark.docker
async def test_only_secrets_are_redacted_and_the_answer_says_so(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    env = {"MODE": "production", "CLIENT_SECRET": SECRET, "PIN": "4321"}
    answer = await execute(client, server, body(SECRETS_PROGRAM, env=env))
    assert answer["ok"] is True, answer
    # CLIENT_SECRET looks secret; MODE and PIN do not and were not declared.
    assert answer["result"] == {"status": "production ready", "secret": "[REDACTED]", "pin": "4321"}
    assert answer["stdout"].startswith("mode production secret [REDACTED]\n")
    assert answer["stderr"] == "pin 4321\n"
    assert SECRET not in answer["stdout"] and answer["redacted"] is True

    declared = {**body(SECRETS_PROGRAM, env=env), "secrets": ["PIN"], "stream": True}
    streamed = await stream(client, server, declared)
    assert streamed.last.data["result"]["pin"] == "[REDACTED]"
    assert streamed.last.data["result"]["status"] == "production ready"
    assert [event.data for event in streamed.named("stderr")] == [{"text": "pin [REDACTED]\n"}]
    text = "".join(event.data["text"] for event in streamed.named("stdout"))
    assert SECRET not in text and "4321" not in text and "production" in text


@pytest.mark.docker
async def test_an_answer_with_nothing_masked_is_not_flagged(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    env = {"API_TOKEN": SECRET, "MODE": "production"}
    answer = await execute(client, server, body("print('{\"ok\": true}')", env=env))
    assert answer["ok"] is True and answer["redacted"] is False, answer


async def test_a_declared_secret_must_be_in_env() -> None:
    async with asgi_client({}) as http:
        payload = {**body("print('{}')", env={"MODE": "x"}), "secrets": ["MODE", "NOPE"]}
        response = await http.post("/execute-connector", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_secret"
    assert error["path"] == "secrets[1]"


# -- progress ------------------------------------------------------------------------


@pytest.mark.docker
async def test_status_events_say_install_then_cache_hit_and_cold_start(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    # A set no earlier run installed: the specifier excludes a version that never existed.
    unique = f"0.0.{secrets.randbelow(10**9)}"
    requirement = f"six!={unique},>=1.16"  # as the service writes it (sorted)
    payload = {
        **body("import six, json; print(json.dumps({'ok': True}))", dependencies=[requirement]),
        "network_mode": "bridge",
        "stream": True,
    }
    try:
        first = await stream(client, server, payload)
        assert first.last.data["ok"] is True, first.last.data
        statuses = [event.data for event in first.named("status")]
        assert statuses[1]["phase"] == "installing_dependencies", statuses
        assert (statuses[1]["cache"], statuses[1]["requested"]) == ("miss", 1)
        assert "installing 1 package: " + requirement in statuses[1]["message"]
        ticks = [s for s in statuses if s["phase"] == "installing_dependencies"][1:]
        elapsed = [tick["elapsed_ms"] for tick in ticks]
        assert elapsed == sorted(elapsed) and all(ms >= 2000 for ms in elapsed), ticks
        ready = next(s for s in statuses if s["phase"] == "dependencies_ready")
        assert (ready["cache"], ready["requested"], ready["packages"]) == ("miss", 1, 1), ready
        assert ready["elapsed_ms"] >= max(elapsed, default=0) and ready["size_kb"] > 0, ready
        assert "dependencies installed in" in ready["message"], ready
        starting = next(s for s in statuses if s["phase"] == "starting")
        assert starting["start"] == "cold", starting  # the session's server keeps none warm

        again = await stream(client, server, payload)
        phases = [event.data["phase"] for event in again.named("status")]
        assert phases == ["validated", "dependencies_ready", "starting", "running"], phases
        hit = again.named("status")[1].data
        assert (hit["cache"], hit["packages"]) == ("hit", 1), hit
        assert hit["size_kb"] >= ready["size_kb"], hit  # bytecode is compiled after the install
        assert "dependencies cached: " + requirement in hit["message"]
        assert "elapsed_ms" not in hit
    finally:
        await anyio.to_thread.run_sync(_remove_volumes_of, unique)


def _run_containers(server: ServerProcess) -> list[str]:
    """The server's containers that are not its warm pool's (runs, early sandboxes)."""
    out = docker(
        "ps", "-a", "--filter", f"label=streamsvc.owner={owner(server)}",
        "--format", '{{.ID}} {{.Label "streamsvc.role"}}',
    )  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if not line.endswith(" warm")]


@pytest.mark.docker
async def test_a_client_that_leaves_during_the_install_leaves_nothing_behind(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    # Its own server with a warm pool: a sandbox is made while the set installs, and the
    # set's volume is held. The run outlives its client for the grace period (issue 13),
    # then ends (finished, or cancelled as abandoned); its containers must go either way.
    own = start_server(STREAMSVC_WARM_POOL_SIZE="1")
    unique = f"0.0.{secrets.randbelow(10**9)}"
    code = "import six, json; print(json.dumps({'ok': True, 'result': six.__version__}))"
    payload = {
        **body(code, dependencies=[f"six!={unique},>=1.16"]),
        "network_mode": "bridge",
        "stream": True,
    }
    try:
        seen = []
        async with contextlib.aclosing(sse_events(client, own, payload)) as events:
            async for _event, data in events:
                seen.append(data.get("phase"))
                if data.get("phase") == "installing_dependencies":
                    break  # hang up
        assert seen == ["validated", "installing_dependencies"], seen

        async def ended() -> bool:
            listed = (await client.get(own.url + "/runs")).json()["runs"]
            return bool(listed) and listed[0]["status"] in {"completed", "cancelled"}

        started = anyio.current_time()
        while not await ended():
            assert anyio.current_time() - started < 60, "the run never ended"
            await anyio.sleep(0.2)
        await eventually(lambda: not _run_containers(own), 30)
        await eventually(lambda: pool(own)["filling"] == 0, 30)
        deps = (await client.get(own.url + "/health")).json()["components"]["sandbox"]["deps"]
        assert deps["installing"] == 0, deps
        # The set is usable afterwards (installed again, or found complete).
        again = await stream(client, own, payload)
        assert again.last.data["ok"] is True, again.last.data
    finally:
        await anyio.to_thread.run_sync(_remove_volumes_of, unique)


def _remove_volumes_of(unique: str) -> None:
    """Remove this test's dependency set (its volume names its requirements in a label)."""
    found = docker("volume", "ls", "-q", "--filter", "label=streamsvc.deps")
    for name in found.split():
        labels = docker("volume", "inspect", "-f", "{{json .Labels}}", name)
        if unique + "\\" in labels or unique + '"' in labels:
            subprocess.run(["docker", "volume", "rm", name], capture_output=True, check=False)


# -- the end lines that carry them ---------------------------------------------------


def _end_line(nonce: str, **fields: Any) -> bytes:
    return END_MARKER + nonce.encode() + b" " + json.dumps(fields).encode() + b"\n"


def test_the_stdout_end_line_carries_usage_and_large_inline_files_in_chunks() -> None:
    nonce = "ab" * 16
    content = base64.b64encode(b"x" * (1024 * 1024)).decode()
    item = {"name": "a.bin", "size": 1 << 20, "sha256": "0" * 64, "media_type": None,
            "content_base64": content, "error": None}  # fmt: skip
    usage = {"cpu_ms": 5, "memory_peak_mb": 9, "wall_ms": 7}
    line = _end_line(nonce, exit_code=0, oom_killed=False, usage=usage, files=[item])
    ends = EndLines(nonce)
    data = b"output\n" + line + b"after the end"
    kept = b"".join(ends.feed(1, data[i : i + 32768]) for i in range(0, len(data), 32768))
    assert kept == b"output\n" and not ends.complete
    assert ends.feed(2, b"err\n" + _end_line(nonce, exit_code=0, oom_killed=False)) == b"err\n"
    verdict = ends.verdict()
    assert verdict is not None and verdict.usage == Usage(5, 9, 7)
    assert verdict.files[0].content_base64 == content and verdict.files_omitted == 0


def test_end_lines_that_disagree_on_the_exit_are_no_verdict() -> None:
    nonce = "cd" * 16
    ends = EndLines(nonce)
    ends.feed(1, _end_line(nonce, exit_code=0, oom_killed=False, files=[]))
    ends.feed(2, _end_line(nonce, exit_code=3, oom_killed=False))
    assert ends.complete and ends.verdict() is None


def test_a_stderr_end_line_past_its_limit_is_not_one() -> None:
    nonce = "ef" * 16
    ends = EndLines(nonce)
    ends.feed(1, _end_line(nonce, exit_code=0))
    ends.feed(2, END_MARKER + nonce.encode() + b" " + b"x" * 5000)
    assert ends.verdict() is None


SECRET_FILES = """
    import json, os
    out, token = os.environ["STREAMSVC_OUTPUT_DIR"], os.environ["API_TOKEN"]
    with open(os.path.join(out, "small.txt"), "w") as f:
        f.write("token=" + token + "\\n")
    with open(os.path.join(out, "big.txt"), "w") as f:
        f.write(("x" * 1023 + "\\n") * 1200 + token)
    with open(os.path.join(out, "mode.txt"), "w") as f:
        f.write(os.environ["MODE"])
    print(json.dumps({"ok": True}))
"""


@pytest.mark.docker
async def test_secrets_in_output_files_are_masked_inline_and_for_download(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    token = "tok-" + secrets.token_hex(8)
    payload = body(SECRET_FILES) | {"env": {"API_TOKEN": token, "MODE": "production"}}
    answer = await execute(client, server, payload)
    assert answer["ok"] is True and answer["redacted"] is True, answer
    files = {item["name"]: item for item in answer["files"]}
    small = base64.b64decode(files["small.txt"]["content_base64"])
    assert small == b"token=[REDACTED]\n"
    assert files["small.txt"]["size"] == len(small)
    assert files["small.txt"]["sha256"] == hashlib.sha256(small).hexdigest()
    assert base64.b64decode(files["mode.txt"]["content_base64"]) == b"production"
    big = await client.get(server.url + files["big.txt"]["url"])
    assert big.status_code == 200
    assert big.content.endswith(b"[REDACTED]") and token.encode() not in big.content
    assert files["big.txt"]["sha256"] == hashlib.sha256(big.content).hexdigest()
