"""``streamsvc run --detach``, ``streamsvc runs ...``, re-attachment and Ctrl-C, for real.

The command runs as a subprocess against the session's server (real Docker). A small TCP
proxy between them cuts the first connection mid-stream, as a dropped Wi-Fi or an idle-cutting
proxy would: the command must re-attach by itself with nothing lost or repeated.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamsvc.client import Attachment, Client, run_event
from tests.fake_azure import FakeAzure, Reply
from tests.harness import (
    COMMAND,
    ServerProcess,
    cli_env,
    connector_file,
    sandboxes,
    streamsvc,
    wait_until,
)

pytestmark = pytest.mark.docker

NUMBERED = """import time
for i in range(200):
    print(f"line {i}", flush=True)
    time.sleep(0.01)
print('{"ok": true, "result": 200}')
"""
EXPECTED = "".join(f"line {i}\n" for i in range(200)) + '{"ok": true, "result": 200}\n'

TICKING = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.2)\n"


class DroppingProxy:
    """Forwards TCP connections to ``port``; cuts the first answer carrying ``marker`` after it."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.port, self.marker = port, marker
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.port))
                self._sockets += [near, far]
                threading.Thread(target=self._pump, args=(near, far, False), daemon=True).start()
                threading.Thread(target=self._pump, args=(far, near, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answer: bool) -> None:
        seen = b""
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                seen = (seen + chunk)[-4096:]
                if answer and self.cuts == 0 and self.marker in seen:
                    self.cuts += 1
                    for end in (source, sink):
                        end.shutdown(socket.SHUT_RDWR)
                        end.close()
                    return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[DroppingProxy]:
    dropping = DroppingProxy(int(server.url.rsplit(":", 1)[1]), b"line 50\\n")
    yield dropping
    dropping.close()


def test_run_reattaches_after_a_drop_with_nothing_lost_or_repeated(
    proxy: DroppingProxy, tmp_path: Path
) -> None:
    path = connector_file(tmp_path, NUMBERED)
    done = streamsvc("run", str(path), "--url", proxy.url, cwd=tmp_path)
    assert proxy.cuts == 1
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXPECTED
    reattached = [line for line in done.stderr.splitlines() if "re-attaching to run" in line]
    assert len(reattached) == 1, done.stderr
    assert done.stderr.splitlines()[-1].startswith("[streamsvc] ok in ")


def test_the_library_reattaches_too(proxy: DroppingProxy, tmp_path: Path) -> None:
    at = Attachment()
    client = Client(proxy.url, api_key="")
    body = json.loads(connector_file(tmp_path, NUMBERED).read_text())
    frames = list(client.frames("/execute-connector", {"connector": body, "stream": True}, at))
    assert proxy.cuts == 1 and at.resumed == 1
    ids = [int(f.id or 0) for f in frames]
    assert ids == list(range(1, len(ids) + 1))  # every event once, in order
    text = "".join(json.loads(f.data)["text"] for f in frames if f.event == "stdout")
    assert text == EXPECTED
    assert frames[-1].event == "done"
    assert client.get_run(at.run_id or "").status == "completed"


def test_detach_then_logs_show_and_list(server: ServerProcess, tmp_path: Path) -> None:
    path = connector_file(tmp_path, "print('from the background')\nprint('{\"ok\": true}')\n")
    started = streamsvc("run", str(path), "--detach", "--url", server.url, cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    assert run_id and "\n" not in run_id
    assert f"streamsvc runs logs {run_id} --follow" in started.stderr

    followed = streamsvc("runs", "logs", run_id, "--follow", "--url", server.url, cwd=tmp_path)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.startswith("from the background\n")
    again = streamsvc("runs", "logs", run_id, "--url", server.url, cwd=tmp_path)
    assert again.stdout == followed.stdout  # the whole log of a finished run, once more

    shown = streamsvc("runs", "show", run_id, "--url", server.url, cwd=tmp_path)
    record = json.loads(shown.stdout)
    assert record["id"] == run_id and record["status"] == "completed"
    assert record["result"]["stdout"].startswith("from the background\n")

    listed = streamsvc("runs", "list", "--json", "--url", server.url, cwd=tmp_path)
    assert run_id in [run["id"] for run in json.loads(listed.stdout)["runs"]]
    table = streamsvc("runs", "list", "--kind", "connector", "--url", server.url, cwd=tmp_path)
    assert any(
        line.startswith(run_id) and "completed" in line for line in table.stdout.splitlines()
    )

    missing = streamsvc("runs", "show", "no-such-run", "--url", server.url, cwd=tmp_path)
    assert missing.returncode == 2 and "404 not_found" in missing.stderr


def test_runs_cancel_stops_a_detached_run(server: ServerProcess, tmp_path: Path) -> None:
    path = connector_file(tmp_path, TICKING, timeoutMs=120_000)
    started = streamsvc("run", str(path), "--detach", "--url", server.url, cwd=tmp_path)
    run_id = started.stdout.strip()
    client = Client(server.url, api_key="")
    wait_until(lambda: client.get_run(run_id).last_event_id > 3, 60)
    cancelled = streamsvc("runs", "cancel", run_id, "--url", server.url, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == f"{run_id}: cancelled\n"
    wait_until(lambda: not sandboxes(server), 20)


def test_ctrl_c_cancels_the_run(server: ServerProcess, tmp_path: Path) -> None:
    path = connector_file(tmp_path, TICKING, timeoutMs=120_000)
    process = subprocess.Popen(
        [*COMMAND, "run", str(path), "--url", server.url],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        assert process.stdout.readline() == "tick\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
        stderr = process.stderr.read()
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    run_id = stderr.rsplit("cancelled run ", 1)[1].split()[0]
    # Cancelled at once, not left to the server's grace for a run without a reader.
    assert Client(server.url, api_key="").get_run(run_id).status == "cancelled"
    wait_until(lambda: not sandboxes(server), 20)


async def test_the_async_client_reattaches_too(proxy: DroppingProxy, tmp_path: Path) -> None:
    from streamsvc.client import AsyncClient, Output, RunDone

    at = Attachment()
    body = json.loads(connector_file(tmp_path, NUMBERED).read_text())
    frames = [
        frame
        async for frame in AsyncClient(proxy.url, api_key="").frames(
            "/execute-connector", {"connector": body, "stream": True}, at
        )
    ]
    assert proxy.cuts == 1 and at.resumed == 1
    assert [int(f.id or 0) for f in frames] == list(range(1, len(frames) + 1))
    events = [run_event(frame) for frame in frames]
    assert "".join(e.text for e in events if isinstance(e, Output)) == EXPECTED
    assert isinstance(events[-1], RunDone) and events[-1].result.result == 200


def test_runs_logs_prints_a_chat_run(
    server: ServerProcess, azure: FakeAzure, tmp_path: Path
) -> None:
    azure.push(Reply(text_chunks=["first ", "second"]))
    at = Attachment()
    client = Client(server.url, api_key="")
    frames = list(
        client.frames(
            "/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, at
        )
    )
    assert frames[-1].event == "done" and at.run_id is not None
    logs = streamsvc("runs", "logs", at.run_id, "--url", server.url, cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "first second\n"
