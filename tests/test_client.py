"""``streamsvc run`` and ``streamsvc chat``: the real command against a real server.

Each test runs the installed ``streamsvc`` command as a subprocess (the way a
user does) against the session's server, pointed at the fake Azure upstream;
connectors run in the real Docker engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from streamsvc.client import Frame, parse_sse
from streamsvc.commands import UsageError, build_request, parse_set
from tests.fake_azure import FakeAzure, Reply
from tests.harness import (
    COMMAND,
    SEED_EXAMPLE,
    ServerProcess,
    cli_env,
    connector_file,
    free_port,
    server_env,
    streamsvc,
)


def progress(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[streamsvc]")]


# ---------------------------------------------------------------- pure parts


def test_parse_sse_skips_keepalives_and_joins_data_lines() -> None:
    lines = [": ping", "", "event: delta", "id: 1", 'data: {"a":', "data: 1}", "", "data: x", ""]
    assert list(parse_sse(iter(lines))) == [
        Frame("delta", '{"a":\n1}', "1"),
        Frame("message", "x", None),
    ]
    # An event the stream ended in the middle of is dropped, as the SSE rules say.
    assert list(parse_sse(iter(["id: 2", 'data: {"text": "li']))) == []


def test_parse_set_reads_json_values_and_dotted_keys() -> None:
    assert parse_set("a.b=3") == (["a", "b"], 3)
    assert parse_set("name=Hello world") == (["name"], "Hello world")
    assert parse_set('quoted="5"') == (["quoted"], "5")
    assert parse_set("flag=true") == (["flag"], True)
    for bad in ("novalue", "=x", "a..b=1"):
        with pytest.raises(UsageError):
            parse_set(bad)


def test_build_request_accepts_a_connector_or_a_whole_body() -> None:
    seed = json.loads(SEED_EXAMPLE.read_text())
    body = build_request(seed, {"EXTRA": "1"}, ["valueToInsert=Hi", "deep.x=1"], "none")
    assert body["connector"] == seed["connector"]
    assert body["env"] == {**seed["env"], "EXTRA": "1"}
    assert body["configuration_overrides"] == {"valueToInsert": "Hi", "deep": {"x": 1}}
    assert body["network_mode"] == "none"
    assert body["stream"] is True
    bare = build_request(seed["connector"], {}, [], None)
    assert bare["connector"] == seed["connector"]
    assert "network_mode" not in bare


# ---------------------------------------------------------------- streamsvc run


@pytest.mark.docker
def test_run_the_seed_example(server: ServerProcess, tmp_path: Path) -> None:
    done = streamsvc("run", str(SEED_EXAMPLE), "--url", server.url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"ok": true, "result": {"hello": "world"}}\n'
    lines = progress(done.stderr)
    assert lines[0] == "[streamsvc] validated: the connector is valid"
    assert any(
        line.startswith("[streamsvc] dependencies ready:") and "requests==2.32.3" in line
        for line in lines
    ), lines
    phases = [line.split(":")[0] for line in lines]
    assert phases.index("[streamsvc] starting") < phases.index("[streamsvc] running")
    assert lines[-1].startswith("[streamsvc] ok in ")


LIVE = """import sys, time
print("first", flush=True)
print("oops", file=sys.stderr, flush=True)
time.sleep(2.5)
print("second", flush=True)
"""


def start_run(path: Path, server: ServerProcess, stderr: int) -> subprocess.Popen[str]:
    """``streamsvc run PATH`` in the background, its stdout piped, Ctrl-C at its default.

    A suite started as a background job has SIGINT ignored, and a child inherits
    that (Python then never raises KeyboardInterrupt); a handler, unlike "ignored",
    is reset by exec.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [*COMMAND, "run", str(path), "--url", server.url],
            cwd=path.parent,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.docker
def test_run_prints_output_live_and_stderr_apart(server: ServerProcess, tmp_path: Path) -> None:
    path = connector_file(tmp_path, LIVE)
    process = start_run(path, server, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    arrivals = {}
    for line in process.stdout:
        arrivals[line] = time.monotonic()
    stderr = process.stderr.read()
    process.wait(60)
    process.stdout.close()
    process.stderr.close()
    assert list(arrivals) == ["first\n", "second\n"]
    # The first line was printed by the client while the program still slept.
    assert arrivals["second\n"] - arrivals["first\n"] > 1.0
    assert "oops\n" in stderr
    assert stderr.index("[streamsvc] running") < stderr.index("oops")
    assert "oops" not in "".join(arrivals)
    # The program printed no JSON: the run fails, but its exit code was 0.
    assert process.returncode == 0
    assert "no_result" in progress(stderr)[-1]


@pytest.mark.docker
def test_run_exits_with_the_programs_exit_code(server: ServerProcess, tmp_path: Path) -> None:
    path = connector_file(tmp_path, "import sys\nprint('bye')\nsys.exit(3)\n")
    done = streamsvc("run", str(path), "--url", server.url, cwd=tmp_path)
    assert done.returncode == 3
    assert done.stdout == "bye\n"
    assert "nonzero_exit" in progress(done.stderr)[-1]


@pytest.mark.docker
def test_run_json_prints_the_final_object_only(server: ServerProcess, tmp_path: Path) -> None:
    done = streamsvc("run", str(SEED_EXAMPLE), "--json", "--url", server.url, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout.count("\n") == 1
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert result["result"] == {"hello": "world"}
    assert result["exit_code"] == 0
    assert result["stdout"] == '{"ok": true, "result": {"hello": "world"}}\n'


CONFIGURED = """def run(context):
    return {
        "region": context["connector"]["configuration"]["region"],
        "limit": context["connector"]["configuration"]["limit"],
        "kept": context["connector"]["configuration"]["kept"],
    }
"""


@pytest.mark.docker
def test_run_set_overrides_the_configuration(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "connector.json"
    connector = {
        "runtime": {"language": "python", "entryPoint": "main.py"},
        "configuration": {"kept": "yes", "limit": 1},
        "files": {"main.py": CONFIGURED},
    }
    path.write_text(json.dumps(connector))
    missing = streamsvc("run", str(path), "--url", server.url, cwd=tmp_path)
    assert missing.returncode == 2
    assert "missing_connector_paths" in missing.stderr
    assert "connector.configuration.region" in missing.stderr

    done = streamsvc(
        "run", str(path), "--json", "--set", "region=eu-west", "--set", "limit=25",
        "--url", server.url, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout)["result"] == {"region": "eu-west", "limit": 25, "kept": "yes"}


SECRET = """import hashlib, json, os
token = os.environ["API_TOKEN"]
print(json.dumps({"ok": True, "result": hashlib.sha256(token.encode()).hexdigest()}))
"""


@pytest.mark.docker
def test_run_env_file_provides_the_env(server: ServerProcess, tmp_path: Path) -> None:
    path = connector_file(tmp_path, SECRET)
    missing = streamsvc("run", str(path), "--url", server.url, cwd=tmp_path)
    assert missing.returncode == 2
    assert "missing_env" in missing.stderr
    assert "env.API_TOKEN" in missing.stderr

    env_file = tmp_path / "secrets.env"
    env_file.write_text("# the connector's secrets\nAPI_TOKEN='tok-0123456789'\n")
    done = streamsvc(
        "run", str(path), "--env-file", str(env_file), "--json", "--url", server.url, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout
    expected = hashlib.sha256(b"tok-0123456789").hexdigest()
    assert json.loads(done.stdout)["result"] == expected


def _containers(server: ServerProcess) -> list[str]:
    owner = f"{socket.gethostname()}:{server.process.pid}"
    labels = [
        "--filter",
        "label=streamsvc.managed=true",
        "--filter",
        f"label=streamsvc.owner={owner}",
    ]
    listed = subprocess.run(
        ["docker", "ps", "-a", "-q", *labels],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return listed.stdout.split()


@pytest.mark.docker
def test_interrupting_run_stops_the_container(server: ServerProcess, tmp_path: Path) -> None:
    path = connector_file(
        tmp_path, "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.2)\n"
    )
    process = start_run(path, server, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    try:
        assert process.stdout.readline() == "tick\n"
        assert _containers(server)
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
    finally:
        process.kill()  # a no-op once it has exited
        process.wait()
        process.stdout.close()
    deadline = time.monotonic() + 20
    while _containers(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _containers(server) == []


def test_run_reports_refusals_and_unreachable_servers(
    server: ServerProcess, tmp_path: Path
) -> None:
    path = connector_file(tmp_path, "print(1)", language="ruby")
    refused = streamsvc("run", str(path), "--url", server.url, "--json", cwd=tmp_path)
    assert refused.returncode == 2
    assert json.loads(refused.stdout)["error"]["code"] == "unsupported_language"
    assert "unsupported_language" in refused.stderr

    nowhere = streamsvc("run", str(path), "--url", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert nowhere.returncode == 1
    assert "cannot reach" in nowhere.stderr

    absent = streamsvc("run", str(tmp_path / "absent.json"), "--url", server.url, cwd=tmp_path)
    assert absent.returncode == 2
    assert "cannot read" in absent.stderr


# ---------------------------------------------------------------- streamsvc chat


def test_chat_streams_the_reply(server: ServerProcess, azure: FakeAzure, tmp_path: Path) -> None:
    azure.push(Reply(text_chunks=["alpha ", "beta ", "gamma"], chunk_delay=1.0))
    process = subprocess.Popen(
        [*COMMAND, "chat", "Say three words", "--url", server.url],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = os.read(process.stdout.fileno(), 1024)
    assert first == b"alpha "
    assert process.poll() is None  # the rest is still on its way
    rest = process.stdout.read()
    assert process.wait(30) == 0
    assert rest == b"beta gamma\n"
    process.stdout.close()
    process.stderr.close()
    assert azure.requests[-1].body["messages"] == [{"role": "user", "content": "Say three words"}]


def test_chat_json_prints_the_result(
    server: ServerProcess, azure: FakeAzure, tmp_path: Path
) -> None:
    done = streamsvc(
        "chat", "hello there", "--json", "--system", "Be brief.", "--temperature", "0.2",
        "--url", server.url, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["content"] == "echo: hello there"
    assert result["finish_reason"] == "stop"
    body = azure.requests[-1].body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["temperature"] == 0.2


def test_url_and_key_come_from_options_or_the_environment(
    start_server: Callable[..., ServerProcess], azure: FakeAzure, tmp_path: Path
) -> None:
    key = "client-key-0123456789"
    server = start_server(STREAMSVC_API_KEYS=key)
    anonymous = streamsvc("chat", "hi", cwd=tmp_path, env=cli_env(STREAMSVC_URL=server.url))
    assert anonymous.returncode == 2
    assert "401 unauthorized" in anonymous.stderr

    from_env = streamsvc(
        "chat", "hi", cwd=tmp_path, env=cli_env(STREAMSVC_URL=server.url, STREAMSVC_API_KEY=key)
    )
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout == "echo: hi\n"

    from_options = streamsvc("chat", "hi", "--url", server.url, "--api-key", key, cwd=tmp_path)
    assert from_options.returncode == 0, from_options.stderr
    assert azure.requests[-1].body["messages"][-1]["content"] == "hi"

    bad = streamsvc("chat", "hi", cwd=tmp_path, env=cli_env(STREAMSVC_URL="localhost:1"))
    assert bad.returncode == 2
    assert "STREAMSVC_URL" in bad.stderr


def test_serve_starts_a_server_the_client_can_use(fake_azure: FakeAzure, tmp_path: Path) -> None:
    fake_azure.reset()
    served = ServerProcess(server_env(fake_azure), args=["serve"])
    try:
        done = streamsvc("chat", "are you there", "--url", served.url, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "echo: are you there\n"
    finally:
        served.close()
