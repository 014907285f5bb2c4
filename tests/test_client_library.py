"""``streamsvc.client`` as a library: ``Client`` and ``AsyncClient`` against a real server.

Connectors run on the real engine through the session's server; chat goes to the fake
Azure upstream. Decoding is checked on frames carrying fields this client does not know.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from streamsvc.client import (
    AsyncClient,
    ChatDone,
    Client,
    Delta,
    Frame,
    Output,
    RequestRefused,
    RunDone,
    RunEvent,
    RunResult,
    Status,
    StreamFailed,
    Unreachable,
    run_event,
)
from tests.fake_azure import FakeAzure, Reply
from tests.harness import ROOT, ServerProcess, free_port

SOURCE = (
    "import sys\nprint('one', flush=True)\nprint('warn', file=sys.stderr, flush=True)\n"
    "def run(context):\n    return {'who': context['connector']['configuration']['who']}\n"
)


def connector(source: str = SOURCE) -> dict[str, object]:
    return {
        "runtime": {"language": "python", "entryPoint": "main.py"},
        "configuration": {"who": "nobody"},
        "files": {"main.py": source},
    }


def test_the_final_object_decodes_with_fields_this_client_does_not_know() -> None:
    data = {
        "ok": True,
        "result": {"a": 1},
        "exit_code": 0,
        "duration_ms": 5,
        "brand_new_field": {"x": 1},
        "usage": {"cpu_ms": 12, "memory_peak_mb": 7.5, "wall_ms": 30, "io_bytes": 9},
        "files": [{"name": "r.csv", "size": 3, "sha256": "ab", "extra": True}],
    }
    event = run_event(Frame("done", msgspec.json.encode(data).decode(), "9"))
    assert isinstance(event, RunDone) and event.id == 9
    assert event.result.ok and event.result.result == {"a": 1}
    assert event.result.usage is not None and event.result.usage.cpu_ms == 12
    assert event.result.files[0].name == "r.csv" and event.result.files[0].size == 3
    assert run_event(Frame("some_future_event", "{}", "10")) is None
    with pytest.raises(StreamFailed) as failed:
        run_event(Frame("error", '{"error": {"code": "busy", "message": "later"}}'))
    assert failed.value.error is not None and failed.value.error.code == "busy"


@pytest.mark.docker
def test_run_returns_a_typed_result_and_shows_every_event(server: ServerProcess) -> None:
    seen: list[RunEvent] = []
    result = Client(server.url, api_key="").run(
        connector(), configuration_overrides={"who": "Ada"}, on_event=seen.append
    )
    assert isinstance(result, RunResult)
    assert result.ok and result.result == {"who": "Ada"} and result.exit_code == 0
    phases = [e.phase for e in seen if isinstance(e, Status)]
    assert phases[0] == "validated" and phases[-1] == "running"
    # The engine may deliver two quick writes as one chunk: compare each stream's whole text.
    stdout = "".join(e.text for e in seen if isinstance(e, Output) and e.stream == "stdout")
    stderr = "".join(e.text for e in seen if isinstance(e, Output) and e.stream == "stderr")
    assert stdout.startswith("one\n") and stderr == "warn\n"
    assert isinstance(seen[-1], RunDone) and seen[-1].result == result
    ids = [e.id or 0 for e in seen]
    assert ids == sorted(ids) and 0 not in ids


@pytest.mark.docker
def test_run_takes_a_connector_folder(server: ServerProcess) -> None:
    result = Client(server.url, api_key="").run(ROOT / "examples" / "hello", env={"X": "1"})
    assert result.result == {"greeting": "Hello, world!"}


@pytest.mark.docker
async def test_the_async_client_streams_the_same_events(server: ServerProcess) -> None:
    client = AsyncClient(server.url, api_key="")
    events = [event async for event in client.stream(connector())]
    assert isinstance(events[-1], RunDone) and events[-1].result.result == {"who": "nobody"}
    stdout = "".join(e.text for e in events if isinstance(e, Output) and e.stream == "stdout")
    assert stdout.startswith("one\n") and stdout == events[-1].result.stdout
    result = await client.run(connector(), configuration_overrides={"who": "Bo"})
    assert result.result == {"who": "Bo"}


def test_refusals_carry_the_servers_error(server: ServerProcess, tmp_path: Path) -> None:
    bad = connector()
    bad["runtime"] = {"language": "ruby", "entryPoint": "main.py"}
    with pytest.raises(RequestRefused) as refused:
        Client(server.url, api_key="").run(bad)
    assert refused.value.http_status == 400
    assert refused.value.error is not None and refused.value.error.code == "unsupported_language"
    with pytest.raises(Unreachable, match="cannot reach"):
        Client(f"http://127.0.0.1:{free_port()}", api_key="").run(connector())


def test_chat_sync_and_async(server: ServerProcess, azure: FakeAzure) -> None:
    azure.push(Reply(text_chunks=["al", "pha"]))
    deltas: list[str] = []
    client = Client(server.url, api_key="")
    result = client.chat(
        "Say it",
        system="Be brief.",
        on_event=lambda e: deltas.append(e.content) if isinstance(e, Delta) else None,
    )
    assert result.content == "alpha" and deltas == ["al", "pha"]
    assert result.finish_reason == "stop"
    assert azure.requests[-1].body["messages"][0] == {"role": "system", "content": "Be brief."}

    import anyio

    async def chat_async() -> list[object]:
        return [e async for e in AsyncClient(server.url, api_key="").chat_stream("hello")]

    events = anyio.run(chat_async)
    assert isinstance(events[-1], ChatDone) and events[-1].result.content == "echo: hello"


def test_save_writes_inline_files_and_refuses_other_names(tmp_path: Path) -> None:
    from streamsvc.client import ErrorInfo, OutputFile
    from streamsvc.commands import save_files

    result = RunResult(
        ok=True,
        files=[
            OutputFile("report.csv", 4, content_base64="YSxiCg=="),
            OutputFile("sub/notes.txt", 2, content_base64="aGk="),
            OutputFile("../escape.txt", 1, content_base64="eA=="),
            OutputFile("/etc/passwd", 1, content_base64="eA=="),
            OutputFile("big.bin", 10**9, error=ErrorInfo("file_too_large", "over the inline cap")),
        ],
    )
    lines = save_files(result, tmp_path / "out")
    assert (tmp_path / "out" / "report.csv").read_bytes() == b"a,b\n"
    assert (tmp_path / "out" / "sub" / "notes.txt").read_bytes() == b"hi"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["notes.txt", "report.csv"]
    assert len(lines) == 5
    assert "not saved: big.bin: over the inline cap" in lines[-1]
    assert sum("not a plain relative name" in line for line in lines) == 2
