"""Attacks on the HTTP side (issue 12: High 3, Medium 6 and 7, Low 11), against a real server.

Clients that never read, bodies sent slowly or many at once, cross-site, DNS-rebinding and
malformed-Host requests,
forged log lines and hang-ups mid-body, each over real sockets. Each test fails
without its guard (send timeout, body deadline, Host/Origin/JSON checks, escaping).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.fake_azure import FakeAzure, Reply
from tests.harness import ServerProcess, server_env, wait_until

BODY_TIMEOUT = 1.0
SEND_TIMEOUT = 2.0
MiB = 1024 * 1024
HEALTH_LIMIT = 0.1  # seconds /health may take while under attack


@pytest.fixture(scope="module")
def guarded(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    env = server_env(
        fake_azure,
        STREAMSVC_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
        STREAMSVC_SEND_TIMEOUT_SECONDS=str(SEND_TIMEOUT),
        STREAMSVC_ALLOWED_HOSTS="api.example.com",
        STREAMSVC_CORS_ORIGINS="https://app.example.com",
        # Room for test_slow_bodies_do_not_stay_in_memory's 20 bodies of 4 MiB at once.
        STREAMSVC_MAX_BODY_BYTES_IN_FLIGHT=str(24 * 4 * MiB),
        # glibc's dynamic mmap threshold keeps freed body buffers in the heap, so RSS stays
        # up without a leak; a fixed threshold returns them at once and RSS tracks the bodies.
        MALLOC_MMAP_THRESHOLD_=str(64 * 1024),
        MALLOC_TRIM_THRESHOLD_=str(128 * 1024),
    )
    process = ServerProcess(env)
    yield process
    process.close()


def connect(server: ServerProcess, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connecting, so the advertised window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", server.port))
    return sock


def head(
    server: ServerProcess, path: str, length: int, extra: str = "", method: str = "POST"
) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{server.port}\r\n"
        f"content-type: application/json\r\ncontent-length: {length}\r\n{extra}\r\n"
    ).encode()


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (fails on the socket's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def error_of(raw: bytes) -> tuple[int, str]:
    status_line, _, rest = raw.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body)["error"]["code"]


def timed_health(http: httpx.Client, url: str) -> tuple[float, Any]:
    started = time.perf_counter()
    response = http.get(url + "/health")
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    return elapsed, response.json()


# ---- Medium 6: a slowly sent body -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/execute-connector", "/chat", "/v1/chat/completions"])
def test_a_body_sent_slowly_is_cut_off_at_its_deadline(guarded: ServerProcess, path: str) -> None:
    with connect(guarded) as sock:
        sock.sendall(head(guarded, path, 4 * MiB) + b"[" * 65536)  # then silence
        started = time.monotonic()
        raw = read_all(sock)  # the server answers and closes; without a deadline: timeout
        waited = time.monotonic() - started
    assert BODY_TIMEOUT - 0.1 <= waited < BODY_TIMEOUT + 3
    status, code = error_of(raw)
    assert (status, code) == (408, "body_timeout")
    assert b"connection: close" in raw.lower()


def slow_bodies(server: ServerProcess, count: int) -> list[bytes]:
    """``count`` bodies of nearly 4 MiB each, the last 64 KiB never sent; the answers."""
    socks = [connect(server) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(head(server, "/chat", 4 * MiB) + b" " * (4 * MiB - 65536))
        return [read_all(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_slow_bodies_do_not_stay_in_memory(guarded: ServerProcess) -> None:
    """Each round's 76 MiB is let go after its deadline: later rounds reuse it.

    A leak keeps a round's bodies: two more rounds would add about 150 MiB. The
    allocator keeps some of a freed round (fragmentation) until it levels off, so the
    baseline is taken after two rounds, and half a round of growth is allowed.
    """
    first = slow_bodies(guarded, 20) + slow_bodies(guarded, 20)
    after_first = guarded.rss()
    later = slow_bodies(guarded, 20) + slow_bodies(guarded, 20)
    assert all(error_of(raw)[0] == 408 for raw in first + later)
    round_bytes = 20 * (4 * MiB - 65536)
    # A handler lets its body go just after its 408 is sent: allow it a moment.
    grown: list[int] = []

    def settled() -> bool:
        grown.append(guarded.rss() - after_first)
        return grown[-1] < round_bytes // 2

    try:
        wait_until(settled, timeout=5)
    except AssertionError:
        raise AssertionError(f"RSS grew {grown[-1] / MiB:.0f} MiB over two rounds") from None


BUDGET = 3 * 4 * MiB  # three bodies of the default cap


def send_some(sock: socket.socket, data: bytes, within: float = 0.2) -> None:
    """Send what the server reads of ``data`` within ``within`` seconds, the rest never."""
    sock.settimeout(within)
    # TimeoutError: the server stopped reading; the others: it answered and closed.
    with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
    sock.settimeout(15)


def answer_of(sock: socket.socket) -> bytes:
    """What the server answered before closing, even if it reset the connection after."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # closed with our bytes unread: its answer came first
        pass
    return data


BUDGET_BODY_TIMEOUT = 4.0


def test_bodies_in_flight_have_a_budget(start_server: Callable[..., ServerProcess]) -> None:
    """Three slow bodies take the budget; 30 more are refused after their headers."""
    server = start_server(
        STREAMSVC_MAX_BODY_BYTES_IN_FLIGHT=str(BUDGET),
        STREAMSVC_BODY_TIMEOUT_SECONDS=str(BUDGET_BODY_TIMEOUT),
    )
    with httpx.Client(timeout=10) as http:
        timed_health(http, server.url)  # the connection is open before measuring
        before = server.rss()
        slow = [connect(server) for _ in range(3)]
        extra = [connect(server) for _ in range(30)]
        try:
            started = time.monotonic()
            for sock in slow:
                sock.sendall(head(server, "/chat", 4 * MiB) + b" " * (4 * MiB - 65536))
            time.sleep(0.3)  # the server has seen the slow ones' headers
            for sock in extra:  # as much of the same body as the server takes in 0.2 s
                send_some(sock, head(server, "/chat", 4 * MiB) + b" " * (4 * MiB - 65536))
            refused = [answer_of(sock) for sock in extra]  # without a budget: 408s, later
            refused_within = time.monotonic() - started
            latency = max(timed_health(http, server.url)[0] for _ in range(5))
            held = server.rss() - before
            answers = [read_all(sock) for sock in slow]
        finally:
            for sock in slow + extra:
                sock.close()
        assert held < BUDGET + 16 * MiB, held  # without a budget: all 33 bodies, 4 MiB each
        assert all(error_of(raw) == (429, "busy") for raw in refused), refused[0][:300]
        assert all(b"\r\nretry-after: 1\r\n" in raw.lower() for raw in refused)
        assert all(b"\r\nconnection: close\r\n" in raw.lower() for raw in refused)
        assert refused_within < BUDGET_BODY_TIMEOUT / 2
        assert latency < HEALTH_LIMIT
        assert all(error_of(raw) == (408, "body_timeout") for raw in answers)
        # Their bytes given back, a new body is read (and found wrong: past the budget).
        response = http.post(server.url + "/chat", json={"messages": []})
        assert response.status_code == 422, response.text


def chunked(server: ServerProcess, size: int) -> bytes:
    """A request with no Content-Length and one chunk of ``size`` bytes, never ended."""
    return (
        f"POST /chat HTTP/1.1\r\nhost: 127.0.0.1:{server.port}\r\n"
        f"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{size:x}\r\n"
    ).encode() + b" " * size


def test_chunked_bodies_are_counted_as_they_arrive(
    start_server: Callable[..., ServerProcess],
) -> None:
    """Without a declared length the bytes are reserved as they come: the third goes past."""
    server = start_server(
        STREAMSVC_MAX_BODY_BYTES=str(MiB),
        STREAMSVC_MAX_BODY_BYTES_IN_FLIGHT=str(2 * MiB),
        STREAMSVC_BODY_TIMEOUT_SECONDS=str(BUDGET_BODY_TIMEOUT),
    )
    slow = [connect(server) for _ in range(2)]
    try:
        for sock in slow:
            sock.sendall(chunked(server, MiB - 65536))
        time.sleep(0.3)  # the server has read them
        with connect(server) as third:
            started = time.monotonic()
            send_some(third, chunked(server, MiB // 4))
            raw = answer_of(third)
        assert time.monotonic() - started < BUDGET_BODY_TIMEOUT / 2
        assert error_of(raw) == (429, "busy")
        assert all(error_of(read_all(sock)) == (408, "body_timeout") for sock in slow)
    finally:
        for sock in slow:
            sock.close()
    with connect(server) as fourth:  # the budget is whole again
        body = b'{"messages": []}'
        sock_data = chunked(server, len(body))[: -len(body)] + body + b"\r\n0\r\n\r\n"
        fourth.sendall(sock_data)
        assert fourth.recv(65536).startswith(b"HTTP/1.1 422 ")


# ---- Medium 7: cross-site requests and DNS rebinding ----------------------------------------


@pytest.mark.parametrize("path", ["/execute-connector", "/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_posts_must_be_json(guarded: ServerProcess, path: str, content_type: str | None) -> None:
    """What a no-cors ``fetch`` of any page may send without a preflight is refused."""
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    response = httpx.post(guarded.url + path, content=body, headers=headers, timeout=10)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert response.headers["connection"] == "close"


@pytest.mark.parametrize("path", ["/health", "/execute-connector", "/chat", "/"])
def test_a_foreign_host_is_refused(guarded: ServerProcess, path: str) -> None:
    """DNS rebinding: the attacker's name resolves to 127.0.0.1, the Host header keeps it."""
    method = "GET" if path in ("/health", "/") else "POST"
    response = httpx.request(
        method, guarded.url + path, headers={"host": "evil.example:80"}, json={}, timeout=10
    )
    assert response.status_code == 421
    assert response.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host",
    ["localhost:evil", "localhost:", "127.0.0.1:80x", "[::1]:evil", "[::1]x", "::1", "localhost:²"],
)
def test_a_malformed_host_is_refused(guarded: ServerProcess, host: str) -> None:
    """A port must be all digits; an IPv6 address must be bracketed."""
    with connect(guarded) as sock:
        raw = f"GET /health HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
        sock.sendall(raw.encode("latin-1"))
        assert error_of(read_all(sock)) == (421, "host_not_allowed")


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST.", "127.0.0.1", "[::1]", "api.example.com"]
)
def test_allowed_hosts_are_served(guarded: ServerProcess, host: str) -> None:
    headers = {"host": f"{host}:{guarded.port}"}
    assert httpx.get(guarded.url + "/health", headers=headers, timeout=10).status_code == 200


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1"])
def test_a_foreign_origin_is_refused(guarded: ServerProcess, origin: str) -> None:
    """A page of another site, even one posting JSON (a preflighted CORS request)."""
    for method, path in (("POST", "/chat"), ("OPTIONS", "/chat"), ("GET", "/health")):
        response = httpx.request(
            method, guarded.url + path, headers={"origin": origin}, json={}, timeout=10
        )
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "origin_not_allowed"


def test_same_origin_and_configured_origins_are_served(guarded: ServerProcess) -> None:
    for origin in (guarded.url, "https://app.example.com"):
        response = httpx.get(guarded.url + "/health", headers={"origin": origin}, timeout=10)
        assert response.status_code == 200, origin
    # The playground's own POST (same origin, JSON) gets past the gate to validation.
    response = httpx.post(
        guarded.url + "/chat", headers={"origin": guarded.url}, json={"messages": []}, timeout=10
    )
    assert response.status_code == 422


# ---- Low 11: logs --------------------------------------------------------------------------


def test_a_path_cannot_forge_log_lines(guarded: ServerProcess) -> None:
    forged = "2026-01-01 00:00:00,000 ERROR streamsvc: forged-by-the-client"
    response = httpx.get(guarded.url + "/nothing%0d%0a" + forged.replace(" ", "%20"), timeout=10)
    assert response.status_code == 404
    time.sleep(0.3)
    lines = guarded.log().splitlines()
    assert not any(line.startswith(forged) for line in lines), guarded.log()[-2000:]
    assert any("/nothing\\r\\n2026" in line for line in lines)


def test_a_hang_up_mid_body_is_one_quiet_line(guarded: ServerProcess) -> None:
    mark = len(guarded.log())
    for path in ("/execute-connector", "/chat"):
        with connect(guarded) as sock:
            sock.sendall(head(guarded, path, 10_000) + b'{"connector": ')
            time.sleep(0.2)
    time.sleep(0.5)
    log = guarded.log()[mark:]
    assert "Traceback" not in log and "unhandled error" not in log, log
    assert log.count("client disconnected during POST") == 2, log
    assert log.count(" 499 {") == 2, log


# ---- High 3: clients that never read ---------------------------------------------------------

WRITE_4_MIB = """
import sys
for _ in range(4096):
    sys.stdout.write("x" * 1023 + "\\n")
sys.stdout.flush()
"""


def run_body(code: str) -> dict[str, Any]:
    runtime = {"language": "python", "entryPoint": "main.py", "timeoutMs": 20000, "memoryMb": 128}
    connector = {"runtime": runtime, "configuration": {}, "files": {"main.py": code}}
    return {"connector": connector, "env": {}, "network_mode": "none", "stream": True}


@pytest.mark.docker
def test_clients_that_never_read_give_their_run_slots_back(
    start_server: Callable[..., ServerProcess],
) -> None:
    slots = 2
    server = start_server(
        STREAMSVC_MAX_CONCURRENT_RUNS=str(slots),
        STREAMSVC_QUEUE_SIZE="0",  # a run that finds no free slot is refused at once
        STREAMSVC_SEND_TIMEOUT_SECONDS=str(SEND_TIMEOUT),
    )
    payload = json.dumps(run_body(WRITE_4_MIB)).encode()
    readers = [connect(server, rcvbuf=1024) for _ in range(slots)]
    latencies: list[float] = []
    try:
        with httpx.Client(timeout=10) as http:
            timed_health(http, server.url)  # the connection is open before measuring
            started = time.monotonic()
            for sock in readers:  # each starts a streamed run and never reads
                sock.sendall(head(server, "/execute-connector", len(payload)) + payload)
            busy_seen = freed_at = None
            while time.monotonic() - started < 60:
                elapsed, health = timed_health(http, server.url)
                latencies.append(elapsed)
                running = health["components"]["sandbox"]["running"]
                if running == slots and busy_seen is None:
                    busy_seen = time.monotonic()
                if busy_seen is not None and running == 0:
                    freed_at = time.monotonic()
                    break
                time.sleep(0.05)
            assert busy_seen is not None, "the runs never started"
            assert freed_at is not None, f"slots still taken: {health}"
            # The programs end within seconds; then each send waits SEND_TIMEOUT at most.
            assert freed_at - busy_seen < SEND_TIMEOUT + 10
            answer = http.post(server.url + "/execute-connector", json=run_body("print(1)"))
            assert answer.status_code == 200, answer.text  # admitted: not 429 busy
            assert "done" in answer.text
            latencies.append(timed_health(http, server.url)[0])
            # The runs no longer wait for their readers (issue 13: a run outlives its
            # connection); the readers that never read are still dropped by the send timeout.
            deadline = time.monotonic() + SEND_TIMEOUT + 10
            while server.log().count("it was dropped") < slots and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        for sock in readers:
            sock.close()
    assert max(latencies) < HEALTH_LIMIT, [round(x, 3) for x in latencies]
    assert server.log().count("it was dropped") == slots, server.log()[-3000:]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_chat_client_that_never_reads_is_dropped(
    guarded: ServerProcess, azure: FakeAzure, stream: bool
) -> None:
    """Streamed, the upstream call is stopped; unstreamed, the 8 MiB answer is let go."""
    # Streamed, the upstream then stays open (silent) until the server lets it go.
    azure.push(Reply(text_chunks=["x" * 65536] * 128, hang_after=64 if stream else None))
    payload = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream})
    mark = len(guarded.log())
    with connect(guarded, rcvbuf=1024) as sock:
        sock.sendall(head(guarded, "/chat", len(payload)) + payload.encode())
        started = time.monotonic()
        while "it was dropped" not in guarded.log()[mark:]:
            assert time.monotonic() - started < SEND_TIMEOUT + 10, guarded.log()[mark:]
            time.sleep(0.1)
    if stream:
        assert azure.wait_disconnect(timeout=5)
    assert "Traceback" not in guarded.log()[mark:]
