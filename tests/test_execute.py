"""POST /execute-connector end to end: the seed example and the program's context.

These run real containers on the real engine (``docker`` marker).
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from tests.harness import SEED_EXAMPLE, ServerProcess, read_sse, seed_request


def without_duration(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer without what differs between two runs of one program (time, run id)."""
    return {key: value for key, value in answer.items() if key not in {"duration_ms", "run_id"}}


# -- the seed example ------------------------------------------------------------------


@pytest.mark.docker
async def test_the_seed_example_answers_hello_world(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    url = server.url + "/execute-connector"
    plain = await client.post(
        url, content=SEED_EXAMPLE.read_bytes(), headers={"content-type": "application/json"}
    )
    assert plain.status_code == 200
    assert plain.headers["content-type"] == "application/json"
    answer = plain.json()
    assert answer["ok"] is True
    assert answer["result"] == {"hello": "world"}
    assert answer["error"] is None
    assert answer["exit_code"] == 0
    assert (answer["timed_out"], answer["oom_killed"]) == (False, False)
    assert answer["stdout"] == '{"ok": true, "result": {"hello": "world"}}\n'
    assert answer["stderr"] == ""
    assert isinstance(answer["duration_ms"], int)

    streamed = await read_sse(client, url, {**seed_request(), "stream": True})
    assert streamed.status == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert [int(event.id or 0) for event in streamed.events] == list(
        range(1, len(streamed.events) + 1)
    )
    phases = [event.data["phase"] for event in streamed.named("status")]
    assert phases == ["validated", "installing_dependencies", "starting", "running"]
    assert "requests==2.32.3" in streamed.named("status")[1].data["message"]
    assert [event.data for event in streamed.named("stdout")] == [{"text": answer["stdout"]}]
    assert streamed.named("stderr") == []
    done = streamed.last
    assert done.event == "done"
    assert without_duration(done.data) == without_duration(answer)
    assert set(done.data) == set(answer)


@pytest.mark.docker
async def test_accept_event_stream_streams_and_the_body_flag_wins(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    url = server.url + "/execute-connector"
    body = seed_request()
    by_header = await read_sse(client, url, body)  # Accept: text/event-stream, no flag
    assert by_header.last.event == "done"
    assert by_header.last.data["result"] == {"hello": "world"}
    by_flag = await client.post(url, json={**body, "stream": True})
    assert by_flag.headers["content-type"].startswith("text/event-stream")
    assert "event: done" in by_flag.text
    refused = await read_sse(client, url, {**body, "stream": False})
    assert refused.events == []
    assert refused.body["result"] == {"hello": "world"}


LIVE_PROGRAM = """\
import sys, time
print("one", flush=True)
print("two", file=sys.stderr, flush=True)
time.sleep(1)
print("three", flush=True)
print('{"ok": true, "result": 3}')
"""


@pytest.mark.docker
async def test_output_is_streamed_live_in_order_with_stderr_apart(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    body = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py"},
            "files": {"main.py": LIVE_PROGRAM},
        },
        "stream": True,
    }
    response = await read_sse(client, server.url + "/execute-connector", body)
    output = [(e.event, e.data["text"]) for e in response.events if e.event in {"stdout", "stderr"}]
    assert "".join(text for name, text in output if name == "stdout") == (
        'one\nthree\n{"ok": true, "result": 3}\n'
    )
    assert [text for name, text in output if name == "stderr"] == ["two\n"]
    order = [text for _, text in output]
    assert order.index("two\n") < next(i for i, t in enumerate(order) if t.startswith("three"))
    first = next(e for e in response.events if e.event == "stdout")
    three = next(e for e in response.events if e.event == "stdout" and "three" in e.data["text"])
    assert first.data["text"] == "one\n"
    assert three.at - first.at > 0.8  # "one" reached the client before "three" was printed
    assert response.last.data["stderr"] == "two\n"
    assert response.last.data["result"] == 3


# -- what the program gets ------------------------------------------------------------------

CONTEXT_PROGRAM = """\
import hashlib, json, os
with open(os.environ["STREAMSVC_CONTEXT_FILE"]) as handle:
    context = json.load(handle)
connector = context["connector"]
secret = os.environ["CLIENT_SECRET"]
print("region is", os.environ["REGION"])
print(json.dumps({"ok": True, "result": {
    "region": os.environ["REGION"],
    "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(),
    "configuration": connector["configuration"],
    "auth": {"user": connector["auth"]["user"],
             "token_sha256": hashlib.sha256(connector["auth"]["token"].encode()).hexdigest()},
    "settings_file": open("conf/settings.ini").read(),
    "cwd": os.getcwd(),
    "has_files_key": "files" in connector,
}}))
"""
SECRET = "s3cret-value-42"


@pytest.mark.docker
async def test_the_program_gets_env_overrides_and_substituted_placeholders(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    body: dict[str, Any] = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py", "timeoutMs": 20000},
            "configuration": {
                "sheet": {"name": "Sheet1", "range": "A1:B2"},
                "columns": [1, 2],
                "region": "{{env:REGION}}",
            },
            "auth": {"user": "u-{{env:REGION}}", "token": "{{env:CLIENT_SECRET}}"},
            "files": {
                "main.py": CONTEXT_PROGRAM,
                "conf/settings.ini": "region={{env:REGION}}\nunknown={{env:NOT_GIVEN}}\n",
            },
            "displayName": "context test",
        },
        "env": {"REGION": "eu-1", "CLIENT_SECRET": SECRET, "NOT_GIVEN_ELSEWHERE": "x"},
        "configuration_overrides": {"sheet": {"range": "C1:D9"}, "columns": [3]},
        "network_mode": "none",
    }
    # NOT_GIVEN is referenced by a file, so it is required:
    missing = await client.post(server.url + "/execute-connector", json=body)
    assert missing.status_code == 400
    assert missing.json()["error"]["details"]["missing_env"] == ["NOT_GIVEN"]

    body["env"]["NOT_GIVEN"] = "given"
    response = await client.post(server.url + "/execute-connector", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["ok"] is True, answer
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    assert answer["result"] == {
        "region": "eu-1",
        "secret_sha256": digest,
        "configuration": {
            "sheet": {"name": "Sheet1", "range": "C1:D9"},
            "columns": [3],
            "region": "eu-1",
        },
        "auth": {"user": "u-eu-1", "token_sha256": digest},
        "settings_file": "region=eu-1\nunknown=given\n",
        "cwd": "/work",
        "has_files_key": False,
    }
    assert answer["stdout"].startswith("region is eu-1\n")


RUN_PROGRAM = """\
import os

def run(context):
    configuration = context["connector"]["configuration"]
    return {"sheet": configuration["sheetName"], "user": os.environ["USER_NAME"]}
"""


@pytest.mark.docker
async def test_an_entry_point_defining_run_gets_called_with_the_context(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    body = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py"},
            "configuration": {"sheetName": "Sheet1"},
            "files": {"main.py": RUN_PROGRAM},
        },
        "env": {"USER_NAME": "ana"},
        "configuration_overrides": {"sheetName": "Sheet9"},
    }
    answer = (await client.post(server.url + "/execute-connector", json=body)).json()
    assert answer["ok"] is True, answer
    assert answer["result"] == {"sheet": "Sheet9", "user": "ana"}


# -- health and disconnects ------------------------------------------------------------------


@pytest.mark.docker
async def test_health_reports_the_sandbox_ready(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    health = (await client.get(server.url + "/health")).json()
    sandbox = health["components"]["sandbox"]
    assert sandbox["state"] == "ready"
    assert sandbox["image"] == "streamsvc-sandbox:latest"
    assert sandbox["running"] >= 0
    assert sandbox["queued"] >= 0
    assert health["status"] == "ok"


async def poll(condition: Callable[[], bool], within: float) -> None:
    """Wait until ``condition()`` holds, failing after ``within`` seconds."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - the condition is outside this process
            await anyio.sleep(0.1)


def containers_of(server: ServerProcess) -> list[str]:
    import socket

    owner = f"label=streamsvc.owner={socket.gethostname()}:{server.process.pid}"
    output = subprocess.run(
        ["docker", "ps", "-aq", "--filter", owner, "--filter", "label=streamsvc.role=run"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return output.split()


@pytest.mark.docker
async def test_a_client_leaving_an_unstreamed_run_stops_it(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    body = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py", "timeoutMs": 60000},
            "files": {"main.py": "import time\ntime.sleep(60)\nprint('{}')"},
        },
        "stream": False,
    }
    leaving = asyncio.create_task(
        client.post(server.url + "/execute-connector", json=body, timeout=4)
    )
    await poll(lambda: bool(containers_of(server)), within=30)  # the run really started
    with pytest.raises(httpx.ReadTimeout):
        await leaving
    # Generous for a loaded box; typically well under 2 s.
    await poll(lambda: not containers_of(server), within=10)
    # The server is fine and runs the next request.
    again = await client.post(server.url + "/execute-connector", json=seed_request())
    assert again.json()["result"] == {"hello": "world"}
