"""Attacks on the client side: a hostile server, and connector folders and --save targets.

The server here is a raw socket that answers what it likes (an event that never ends, an id
``int`` refuses, a refusal of any size); the client library must stay bounded and fail with its
own errors. Each test fails without its guard.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from streamsvc import client as client_module
from streamsvc.authoring import MAX_FILE_BYTES, AuthoringError, load_folder
from streamsvc.client import (
    AsyncClient,
    Client,
    OutputFile,
    RequestRefused,
    RunResult,
    StreamFailed,
)
from streamsvc.commands import _summary as summary_lines
from streamsvc.commands import save_files
from streamsvc.web.examples import folder_example

MiB = 1024 * 1024
Script = Callable[[socket.socket], None]


class HostileServer:
    """Answers each connection with ``script`` (after reading the request's head)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sent = 0
        self.answered = threading.Event()  # set when a script has ended
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                    head += chunk
                with contextlib.suppress(OSError):  # the client hung up, as a bounded one does
                    self.script(conn)
                self.answered.set()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def hostile() -> Iterator[Callable[[Script], HostileServer]]:
    made: list[HostileServer] = []

    def make(script: Script) -> HostileServer:
        made.append(HostileServer(script))
        return made[-1]

    yield make
    for server in made:
        server.close()


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def endless_line(server_of: list[HostileServer]) -> Script:
    def script(conn: socket.socket) -> None:
        conn.sendall(STREAM_HEAD + b"event: delta\ndata: ")
        for _ in range(16):  # 16 MiB, then the connection closes
            conn.sendall(b"x" * MiB)
            server_of[0].sent += MiB

    return script


@pytest.mark.parametrize("shape", ["one line", "many lines"])
def test_an_event_without_end_is_cut_off(
    hostile: Callable[[Script], HostileServer], monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    monkeypatch.setattr(client_module, "MAX_EVENT_BYTES", 2 * MiB)
    holder: list[HostileServer] = []
    line = b"x" * MiB if shape == "one line" else b"x" * 1000 + b"\ndata: "

    def script(conn: socket.socket) -> None:
        conn.sendall(STREAM_HEAD + b"event: delta\ndata: ")
        for _ in range(16 * MiB // len(line)):  # 16 MiB of one event, then a close
            conn.sendall(line)
            holder[0].sent += len(line)

    holder.append(hostile(script))
    with pytest.raises(StreamFailed, match="over 2097152 bytes"):
        for _ in Client(holder[0].url).frames("/chat", CHAT):
            pass


def test_the_async_client_cuts_it_off_too(
    hostile: Callable[[Script], HostileServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_EVENT_BYTES", 2 * MiB)
    holder: list[HostileServer] = []
    holder.append(hostile(endless_line(holder)))

    async def main() -> None:
        async for _ in AsyncClient(holder[0].url).frames("/chat", CHAT):
            pass

    with pytest.raises(StreamFailed, match="over 2097152 bytes"):
        anyio.run(main)


@pytest.mark.parametrize("event_id", ["²", "9" * 5000, "-3"])
def test_an_event_id_that_is_no_number_is_ignored(
    hostile: Callable[[Script], HostileServer], event_id: str
) -> None:
    def script(conn: socket.socket) -> None:
        conn.sendall(
            STREAM_HEAD
            + f"id: {event_id}\nevent: delta\ndata: {{}}\n\n".encode()
            + b'id: 2\nevent: done\ndata: {"content": "ok"}\n\n'
        )

    server = hostile(script)
    frames = list(Client(server.url).frames("/chat", CHAT))
    assert [f.event for f in frames] == ["delta", "done"]


def test_a_huge_refusal_is_read_only_in_part(hostile: Callable[[Script], HostileServer]) -> None:
    holder: list[HostileServer] = []

    def script(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\r\n")
        for _ in range(64):  # 64 MiB, unless the client stops reading first
            conn.sendall(b"y" * MiB)
            holder[0].sent += MiB

    holder.append(hostile(script))
    with pytest.raises(RequestRefused) as caught:
        for _ in Client(holder[0].url).frames("/chat", CHAT):
            pass
    assert caught.value.body is not None
    assert len(caught.value.body) <= client_module.MAX_ERROR_BYTES
    assert holder[0].answered.wait(10)
    assert holder[0].sent < 16 * MiB  # the rest was never asked for


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_huge_json_answer_is_cut_off(
    hostile: Callable[[Script], HostileServer], monkeypatch: pytest.MonkeyPatch, flavour: str
) -> None:
    monkeypatch.setattr(client_module, "MAX_EVENT_BYTES", 2 * MiB)
    holder: list[HostileServer] = []

    def script(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n[")
        for _ in range(64):  # 64 MiB of a JSON array, unless the client stops first
            conn.sendall(b"1," * (MiB // 2))
            holder[0].sent += MiB

    holder.append(hostile(script))
    with pytest.raises(StreamFailed, match="over 2097152 bytes"):
        if flavour == "sync":
            Client(holder[0].url).get_run("x")
        else:
            anyio.run(AsyncClient(holder[0].url).get_run, "x")
    assert holder[0].answered.wait(10)
    assert holder[0].sent < 16 * MiB


# ---- connector folders (streamsvc run DIR, the playground's examples) and --save ------------


def linked_folder(tmp_path: Path) -> Path:
    """A connector folder whose ``data`` is a link to a folder outside it holding a secret."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("PRIVATE KEY\n")
    (outside / "stolen.py").write_text("KEY = 1\n")
    folder = tmp_path / "connector"
    folder.mkdir()
    (folder / "main.py").write_text("print('hi')\n")
    (folder / "data").symlink_to(outside)
    return folder


@pytest.mark.parametrize("pattern", ["data/*", "data/id_rsa", "../outside/*", "/etc/host*"])
def test_a_folder_sends_nothing_from_outside_it(tmp_path: Path, pattern: str) -> None:
    folder = linked_folder(tmp_path)
    (folder / "connector.json").write_text(json.dumps({"include": [pattern]}))
    with pytest.raises(AuthoringError, match=r"out of the folder|leaves the folder"):
        load_folder(folder)
    assert folder_example(folder) is None  # the server's example menu reads it the same way


def test_save_writes_nothing_outside_its_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    save = tmp_path / "save"
    save.mkdir()
    (save / "sub").symlink_to(outside)
    (save / "report.csv").symlink_to(outside / "victim")
    x = base64.b64encode(b"x").decode()
    result = RunResult(
        ok=True,
        files=[
            OutputFile("sub/victim", 1, content_base64=x),
            OutputFile("sub/new/file", 1, content_base64=x),
            OutputFile("report.csv", 1, content_base64=x),
            OutputFile("a", 1, content_base64=x),
            OutputFile("a/b", 1, content_base64=x),  # over a file just written: no crash
            OutputFile("\x1b]0;pwned\x07\x1b[2J.txt", 1, content_base64=x),
            OutputFile("bad-base64", 1, content_base64="a"),
            OutputFile("nul\x00name", 1, content_base64=x),
        ],
    )
    lines = save_files(result, save)
    assert (outside / "victim").read_text() == "untouched"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (save / "a").read_bytes() == b"x"
    assert sorted(p.name for p in save.iterdir()) == ["a", "report.csv", "sub"]
    assert len(lines) == 8 and sum("[streamsvc] saved" in line for line in lines) == 1
    assert all(line.isprintable() for line in lines)


def test_summary_lines_escape_control_characters() -> None:
    result = RunResult(ok=True, exit_code=0, files=[OutputFile("\x1b[2Jx.txt", 1)])
    assert all(line.isprintable() for line in summary_lines(result))


def test_a_fifo_or_a_huge_file_in_a_folder_is_refused_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "connector"
    folder.mkdir()
    (folder / "main.py").write_text("print('hi')\n")
    os.mkfifo(folder / "pipe.py")  # reading it would wait for a writer forever
    with pytest.raises(AuthoringError, match="not a regular file"):
        load_folder(folder)
    (folder / "pipe.py").unlink()
    with (folder / "huge.py").open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(AuthoringError, match="larger than"):
        load_folder(folder)
