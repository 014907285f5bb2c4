"""Output files past the inline cap, downloaded from their run (issue 15 point 4).

A real server on the real engine: a program writes a small file (inline), a 3 MiB one
(downloadable) and one past the download cap (refused by the runner, inside the sandbox);
owner keys, the read token, 404s, path tricks, ETag and DELETE; the client library's download.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import redis

from streamsvc.client import AsyncClient, Client, ClientError, OutputFile, RunResult
from streamsvc.commands import save_files
from streamsvc.sandbox.runner.runner import MAX_DOWNLOAD_BYTES
from tests.harness import ExecutorProcess, ServerProcess, body, connector_file, streamsvc

ALICE, BOB = "key-alice-0123456789", "key-bob-0123456789"

PROGRAM = """
import hashlib, json, os
out = os.environ["STREAMSVC_OUTPUT_DIR"]
big = os.urandom(3 * 1024 * 1024)
with open(os.path.join(out, "big.bin"), "wb") as handle:
    handle.write(big)
with open(os.path.join(out, "small.txt"), "w") as handle:
    handle.write("small")
digest = hashlib.sha256()
with open(os.path.join(out, "huge.bin"), "wb") as handle:  # 3 + 30 MiB: past the 32 MiB cap
    for _ in range(30):
        chunk = os.urandom(1024 * 1024)
        digest.update(chunk)
        handle.write(chunk)
print(json.dumps({"ok": True, "result": {"big": hashlib.sha256(big).hexdigest(),
                                          "huge": digest.hexdigest()}}))
"""


@pytest.mark.docker
async def test_large_files_are_downloaded_from_their_run_by_their_owner_only(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient, tmp_path: Path
) -> None:
    server = start_server(STREAMSVC_API_KEYS=f"{ALICE},{BOB}")
    alice, bob = {"authorization": f"Bearer {ALICE}"}, {"x-api-key": BOB}
    payload: dict[str, Any] = body(PROGRAM)
    response = await client.post(server.url + "/execute-connector", json=payload, headers=alice)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["ok"] is True, answer
    run_id = answer["run_id"]
    files = {item["name"]: item for item in answer["files"]}
    assert sorted(files) == ["big.bin", "huge.bin", "small.txt"]

    small = files["small.txt"]
    assert small["content_base64"] == "c21hbGw=" and small["url"] is None

    big = files["big.bin"]
    assert big["content_base64"] is None and big["error"] is None
    assert big["size"] == 3 * 1024 * 1024 and big["sha256"] == answer["result"]["big"]
    assert big["url"] == f"/runs/{run_id}/files/big.bin"

    # Past the download cap: refused by the runner (never sent out), hashed all the same.
    huge = files["huge.bin"]
    assert huge["url"] is None and huge["content_base64"] is None
    assert huge["error"]["code"] == "too_large_to_download"
    assert str(MAX_DOWNLOAD_BYTES) in huge["error"]["message"]
    assert huge["sha256"] == answer["result"]["huge"]

    url = server.url + big["url"]
    got = await client.get(url, headers=alice)
    assert got.status_code == 200
    assert hashlib.sha256(got.content).hexdigest() == big["sha256"]
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-length"] == str(3 * 1024 * 1024)
    assert got.headers["content-disposition"].startswith("attachment;")
    assert got.headers["etag"] == f'"{big["sha256"]}"'
    again = await client.get(url, headers={**alice, "if-none-match": got.headers["etag"]})
    assert again.status_code == 304 and again.content == b""

    # The run's read token opens its files (the playground links them); nothing else does.
    run = (await client.get(f"{server.url}/runs/{run_id}", headers=alice)).json()
    token = run["events_url"].partition("?token=")[2]
    assert (await client.get(f"{url}?token={token}")).status_code == 200
    assert (await client.get(f"{url}?token={token[:-2]}xx")).status_code == 404
    assert (await client.get(url, headers=bob)).status_code == 404
    assert (await client.get(url)).status_code == 401

    base = f"{server.url}/runs/{run_id}/files/"
    for name in ("nope.bin", "small.txt", "huge.bin", "%2e%2e/%2e%2e/etc/passwd", "%2e/big.bin"):
        missing = await client.get(base + name, headers=alice)
        assert missing.status_code == 404, name
        assert missing.json()["error"]["code"] == "file_not_found", name
    unknown = await client.get(f"{server.url}/runs/nope/files/big.bin", headers=alice)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")

    # The client library (what `streamsvc run --save` uses): inline written, large downloaded.
    result = msgspec.json.decode(response.content, type=RunResult)
    lines = await anyio.to_thread.run_sync(
        lambda: save_files(result, tmp_path / "out", Client(server.url, ALICE))
    )
    assert (tmp_path / "out" / "small.txt").read_bytes() == b"small"
    saved = (tmp_path / "out" / "big.bin").read_bytes()
    assert hashlib.sha256(saved).hexdigest() == big["sha256"]
    assert any("not saved: huge.bin" in line for line in lines), lines
    await AsyncClient(server.url, ALICE).download(result.files[0], tmp_path / "async.bin")
    assert (tmp_path / "async.bin").read_bytes() == saved
    with pytest.raises(ClientError):  # another key: the server's 404
        await anyio.to_thread.run_sync(
            lambda: Client(server.url, BOB).download(result.files[0], tmp_path / "b.bin")
        )
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.part").exists()

    # DELETE takes the files with the run.
    assert (await client.delete(f"{server.url}/runs/{run_id}", headers=alice)).status_code == 204
    assert (await client.get(url, headers=alice)).status_code == 404


def test_the_client_refuses_names_and_urls_that_leave_their_place(tmp_path: Path) -> None:
    forged = [
        OutputFile("../escape.bin", 1, url="/runs/r/files/escape.bin"),
        OutputFile("/etc/passwd", 1, url="/runs/r/files/passwd"),
        OutputFile("ok.bin", 1, url="https://elsewhere.example/steal"),
        OutputFile("ok2.bin", 1, url="//elsewhere.example/runs/x"),
    ]
    client = Client("http://127.0.0.1:9", "key")  # never reached: refused before any request
    lines = save_files(RunResult(ok=True, files=forged), tmp_path / "out", client)
    assert "not a plain relative name" in lines[0] and "not a plain relative name" in lines[1]
    assert "no download url of this server" in lines[2]
    assert "no download url of this server" in lines[3]
    assert not any(tmp_path.rglob("*.bin*"))


CLI_PROGRAM = """
import json, os
out = os.environ["STREAMSVC_OUTPUT_DIR"]
os.makedirs(os.path.join(out, "data"))
with open(os.path.join(out, "data", "rows.csv"), "w") as handle:
    handle.write("n\\n" + "".join(f"{i}\\n" for i in range(400_000)))
print(json.dumps({"ok": True}))
"""


@pytest.mark.docker
def test_run_save_downloads_the_large_files(server: ServerProcess, tmp_path: Path) -> None:
    path = connector_file(tmp_path, CLI_PROGRAM)
    done = streamsvc("run", str(path), "--save", "out", "--url", server.url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "out" / "data" / "rows.csv").read_text()
    assert len(rows) > 1024 * 1024  # past the inline cap: it came by its url
    assert rows.splitlines()[-1] == "399999"
    assert "[streamsvc] saved out/data/rows.csv" in done.stderr
    assert not list((tmp_path / "out").rglob("*.part"))


TWO_MIB = """
import hashlib, json, os
data = os.urandom(2 * 1024 * 1024)
deep = os.path.join(os.environ["STREAMSVC_OUTPUT_DIR"], "deep")
os.makedirs(deep)
with open(os.path.join(deep, "my data ü%.bin"), "wb") as handle:
    handle.write(data)
print(json.dumps({"ok": True, "result": hashlib.sha256(data).hexdigest()}))
"""


async def _round_trip(
    client: httpx.AsyncClient, runs_on: ServerProcess, read_on: ServerProcess
) -> None:
    """Run on one server, download and delete through another (or the same)."""
    answer = await client.post(runs_on.url + "/execute-connector", json=body(TWO_MIB))
    assert answer.status_code == 200, answer.text
    listed = answer.json()["files"][0]
    assert listed["name"] == "deep/my data ü%.bin"  # quoted in its url, found by its name
    assert listed["url"].endswith("/files/deep/my%20data%20%C3%BC%25.bin"), listed["url"]
    assert listed["sha256"] == answer.json()["result"]
    got = await client.get(read_on.url + listed["url"])
    assert got.status_code == 200
    assert hashlib.sha256(got.content).hexdigest() == listed["sha256"]
    run_id = answer.json()["run_id"]
    assert (await client.delete(f"{read_on.url}/runs/{run_id}")).status_code == 204
    for server in (runs_on, read_on):
        assert (await client.get(server.url + listed["url"])).status_code == 404


@pytest.mark.docker
async def test_files_kept_in_sqlite_are_downloaded_then_deleted(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient, tmp_path: Path
) -> None:
    server = start_server(STREAMSVC_RUN_STORE=f"sqlite:///{tmp_path}/runs.db")
    await _round_trip(client, server, server)


@pytest.mark.docker
@pytest.mark.redis
async def test_files_kept_in_redis_are_served_by_another_node(
    start_server: Callable[..., ServerProcess], client: httpx.AsyncClient, redis_url: str
) -> None:
    prefix = f"streamsvc-test:{uuid.uuid4().hex[:12]}:"
    store = f"{redis_url}?prefix={prefix}"
    # Two API nodes and the executor that runs the connector (issue 16): the file goes from
    # the executor into Redis, and either node serves it.
    executor = ExecutorProcess({"STREAMSVC_RUN_STORE": store})
    try:
        first, second = (
            start_server(STREAMSVC_RUN_STORE=store),
            start_server(STREAMSVC_RUN_STORE=store),
        )
        await _round_trip(client, first, second)
    finally:
        executor.close()
        with redis.Redis.from_url(redis_url) as r:
            keys = list(r.scan_iter(match=f"{prefix}*", count=500))
            if keys:
                r.delete(*keys)
