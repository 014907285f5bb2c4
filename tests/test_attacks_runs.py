"""Attacks on the /runs API (red-team pass on the run records), against a real server.

Event-id cursors a client makes up (``Last-Event-ID``, ``?after=``) and a ``before=`` page
cursor naming another key's run: each is refused or answered as if the run did not exist,
never with a 500 or a hint that another key's run exists. Each test fails without its guard.
"""

from __future__ import annotations

import socket
import time
import tracemalloc
from collections.abc import Callable

import httpx
import pytest

from streamsvc.runs.live import LiveLog
from streamsvc.runs.store import StoredEvent
from tests.fake_azure import FakeAzure, Reply
from tests.harness import ServerProcess

CHAT = {"messages": [{"role": "user", "content": "hi"}], "background": True}
ALICE = {"authorization": "Bearer key-alice-0123456789"}
BOB = {"x-api-key": "key-bob-0123456789"}


def finished_run(http: httpx.Client, server: ServerProcess, headers: dict[str, str]) -> str:
    run_id: str = http.post(server.url + "/chat", json=CHAT, headers=headers).json()["id"]
    with http.stream("GET", f"{server.url}/runs/{run_id}/events", headers=headers) as response:
        assert response.status_code == 200
        response.read()  # to its end: the run is finished
    return run_id


@pytest.mark.parametrize(
    "header",
    ["²", "¹²", "9" * 5000, "-1", "1e3", "12x", "99999999999999999999999999"],
    ids=["superscript", "superscripts", "5000-digits", "negative", "exponent", "junk", "huge"],
)
def test_a_made_up_last_event_id_is_refused(
    server: ServerProcess, azure: FakeAzure, header: str
) -> None:
    with httpx.Client(timeout=15) as http:
        run_id = finished_run(http, server, {})
        raw = header.encode("latin-1")  # as a client sends it; the server decodes latin-1
        answer = http.get(f"{server.url}/runs/{run_id}/events", headers=[(b"last-event-id", raw)])
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "validation_error"
    assert answer.json()["error"]["path"] == "$.headers"


@pytest.mark.parametrize("after", ["-1", "²", "9" * 5000, "99999999999999999999999999", "x"])
def test_a_made_up_after_is_refused(server: ServerProcess, azure: FakeAzure, after: str) -> None:
    with httpx.Client(timeout=15) as http:
        run_id = finished_run(http, server, {})
        answer = http.get(f"{server.url}/runs/{run_id}/events", params={"after": after})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "validation_error"


def test_a_large_but_valid_cursor_reads_nothing_and_ends(
    server: ServerProcess, azure: FakeAzure
) -> None:
    with httpx.Client(timeout=15) as http:
        run_id = finished_run(http, server, {})
        answer = http.get(f"{server.url}/runs/{run_id}/events", headers={"last-event-id": "9" * 15})
    assert answer.status_code == 200
    assert "event:" not in answer.text


def test_a_page_cursor_of_another_keys_run_reveals_nothing(
    start_server: Callable[..., ServerProcess], azure: FakeAzure
) -> None:
    server = start_server(STREAMSVC_API_KEYS="key-alice-0123456789,key-bob-0123456789")
    with httpx.Client(timeout=15) as http:
        mine = finished_run(http, server, ALICE)
        theirs = finished_run(http, server, BOB)  # newer than alice's run
        own = http.get(server.url + "/runs", params={"before": mine}, headers=ALICE)
        foreign = http.get(server.url + "/runs", params={"before": theirs}, headers=ALICE)
        unknown = http.get(server.url + "/runs", params={"before": "no-such-run"}, headers=ALICE)
    assert own.status_code == foreign.status_code == unknown.status_code == 200
    assert own.json()["runs"] == []
    # Answered as an unknown cursor is: bob's run does not exist for alice.
    assert foreign.json() == unknown.json() == {"runs": [], "next": None}


def test_unfinished_runs_are_capped_per_key_and_in_all(
    start_server: Callable[..., ServerProcess], azure: FakeAzure
) -> None:
    """Background chats that never end, and streamed ones dropped into their grace, count until
    they end; past the key's cap or the process's, a new run is 429 too_many_runs."""
    server = start_server(
        STREAMSVC_API_KEYS="key-alice-0123456789,key-bob-0123456789",
        STREAMSVC_MAX_ACTIVE_RUNS="5",
        STREAMSVC_MAX_ACTIVE_RUNS_PER_KEY="3",
        STREAMSVC_RUN_GRACE_CHAT_SECONDS="30",
        STREAMSVC_IDLE_TIMEOUT_SECONDS="30",
    )
    azure.push(*[Reply(text_chunks=["a", "b"], hang_after=1) for _ in range(6)])
    with httpx.Client(timeout=15) as http:
        started = [http.post(server.url + "/chat", json=CHAT, headers=ALICE) for _ in range(2)]
        with http.stream(  # streamed, then dropped: in its grace it still counts
            "POST", server.url + "/chat", json=CHAT | {"background": False, "stream": True},
            headers=ALICE,
        ) as dropped:  # fmt: skip
            assert dropped.status_code == 200
        refused = http.post(server.url + "/chat", json=CHAT, headers=ALICE)
        others = [http.post(server.url + "/chat", json=CHAT, headers=BOB) for _ in range(3)]
        assert [r.status_code for r in started] == [202, 202]
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_runs"
        # Bob is not held back by alice's runs, but by the process's cap (5 in all).
        assert [r.status_code for r in others] == [202, 202, 429]
        assert others[2].json()["error"]["code"] == "too_many_runs"
        # A run that ends gives its place back.
        cancelled = http.post(f"{server.url}{started[0].json()['url']}/cancel", headers=ALICE)
        assert cancelled.json()["status"] == "cancelled"
        assert http.post(server.url + "/chat", json=CHAT, headers=ALICE).status_code == 202


async def test_a_reader_of_a_long_log_holds_no_copy_of_it() -> None:
    """Many slow readers of one long run: each holds a few events, not a copy of the log."""
    log = LiveLog()
    log.add([StoredEvent(i, "output", b"{}") for i in range(1, 100_001)])
    log.finish()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        readers = [log.follow(0) for _ in range(100)]
        for reader in readers:
            assert (await anext(reader)).id == 1  # then each waits, as a slow client does
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * 1024 * 1024, f"{held} bytes for 100 readers"  # a copy each: 80 MB
    for reader in readers:
        await reader.aclose()  # type: ignore[attr-defined]


def test_a_read_token_is_in_no_log_line(server: ServerProcess, azure: FakeAzure) -> None:
    """The access log prints the path, never the query: an events_url's token stays out."""
    with httpx.Client(timeout=15) as http:
        accepted = http.post(server.url + "/chat", json=CHAT).json()
        token = accepted["events_url"].partition("?token=")[2]
        assert http.get(server.url + accepted["events_url"]).status_code == 200
        wrong = http.get(f"{server.url}/runs/{accepted['id']}/events?token={token[:-2]}xx")
        assert wrong.status_code == 404
    log = server.log()
    assert f"/runs/{accepted['id']}/events" in log  # the reads were logged
    assert token not in log and token[:-2] not in log


def test_a_reader_that_never_reads_a_runs_events_is_dropped(
    start_server: Callable[..., ServerProcess], azure: FakeAzure
) -> None:
    """/runs/{id}/events has the send timeout of every stream: an 8 MiB log read by nobody."""
    server = start_server(STREAMSVC_SEND_TIMEOUT_SECONDS="2")
    azure.push(Reply(text_chunks=["x" * 65536] * 128))
    with httpx.Client(timeout=15) as http:
        run_id = finished_run(http, server, {})
    mark = len(server.log())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    with sock:
        sock.settimeout(15)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(
            f"GET /runs/{run_id}/events HTTP/1.1\r\nhost: 127.0.0.1:{server.port}\r\n\r\n".encode()
        )
        started = time.monotonic()
        while "it was dropped" not in server.log()[mark:]:
            assert time.monotonic() - started < 2 + 10, server.log()[mark:]
            time.sleep(0.1)
    assert "Traceback" not in server.log()[mark:]
