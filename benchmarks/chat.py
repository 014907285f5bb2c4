"""Chat streaming benchmark: straight to the upstream, through streamsvc, through LiteLLM.

Run as ``python -m benchmarks.chat``; ``--help`` gives the method (``METHOD``). The same
module is also the load generator, the paced upstream and the floor, each started as a
process of its own by a hidden flag.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from benchmarks.common import (
    BENCH,
    ROOT,
    load_average,
    machine_facts,
    markdown_table,
    percentile,
    write_docs_section,
)
from tests.fake_azure import MODEL, _echo_chunks, _sse, _stream_chunks, _usage

if TYPE_CHECKING:
    from tests.harness import ServerProcess

METHOD = """\
Everything runs on loopback, each piece in its own process so its CPU is its own:

- the upstream: `PacedUpstream` in benchmarks/chat.py (`--upstream`), which sends the exact bytes
  of `tests/fake_azure.py`'s stream (Azure's wire format), one content chunk every
  `--interval-ms`, at a few microseconds per chunk (`--fake-upstream` uses the fake
  itself, which misses its own pace past a few hundred streams on 2 CPUs); the
  request's message picks the number of chunks;
- streamsvc: `python -m streamsvc` pointed at the upstream (POST `--streamsvc-path`);
- LiteLLM's proxy (`litellm[proxy]`, pinned, installed into `.bench/litellm-venv` by
  this benchmark), its `azure/` provider pointed at the same upstream;
- the floor (`--floor`): hypercorn + Starlette + aiohttp passing the bytes through and
  nothing else, on the same number of worker processes: the least any server built on
  this stack can cost, so streamsvc's own share is the difference;
- the load generator: this module again (`--loadgen`), a raw asyncio HTTP/1.1 client
  with keep-alive connections that timestamps every content event as it is parsed.

Phases, for each path: a warm-up; time to first token over sequential requests (the
"added" TTFT is the path's percentile minus the direct path's); then, for each level
in `--levels`, that many streams kept open at once for `--duration` seconds (each
client slot starts a new stream when one ends; the slots start evenly over `--ramp`
seconds, by default one stream's length, so streams begin at a steady rate rather than
in cohorts that start and end together), recording the gaps between content chunks, the
proxy's CPU seconds and its peak RSS (with its children).

A level is *sustained* when every stream completed without error and the inter-chunk
p99 is within `--slack-ms` (default 50) of the upstream's own pace.

    .venv/bin/python -m benchmarks.chat                 # full run (~15 minutes)
    .venv/bin/python -m benchmarks.chat --quick         # short run (~5 minutes)
    .venv/bin/python -m benchmarks.chat --no-litellm --levels 100
    .venv/bin/python -m benchmarks.chat --write-docs    # also record docs/benchmarks.md

The markdown table is printed at the end (and raw JSON goes to .bench/last-run.json).
"""
MODULE = "benchmarks.chat"
LITELLM_VERSION = "1.106.12"
LITELLM_VENV = BENCH / "litellm-venv"
API_KEY = "bench-upstream-key-0123456789"
DEPLOYMENT = "gpt-4o"
API_VERSION = "2024-10-21"
UPSTREAM_PID: list[int | None] = [None]  # set once the upstream runs
PROXY_KEY = "sk-bench-proxy-key-0123456789abcdef"  # both proxies check a client key

# ==== the load generator (runs in its own process) ============================================


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    """The part of an OpenAI chat-completion chunk the client reads."""

    choices: list[_Choice] = []


@dataclass
class StreamOutcome:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    chunks: int = 0
    error: str | None = None


class Client:
    """Raw HTTP/1.1 over asyncio streams: one keep-alive connection per slot."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.host, self.port = job["host"], job["port"]
        self.named_events = job["format"] == "streamsvc"
        body = json.dumps(job["body"]).encode()
        head = [
            f"POST {job['path']} HTTP/1.1",
            f"host: {self.host}:{self.port}",
            "content-type: application/json",
            "accept: text/event-stream",
            f"content-length: {len(body)}",
            *(f"{k}: {v}" for k, v in job["headers"].items()),
        ]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.timeout = job["timeout"]
        self.decode = msgspec.json.Decoder(_Chunk).decode
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].transport.abort()
            self.conn = None

    def is_content(self, event: bytes) -> bool:
        if self.named_events:
            return b"event: delta" in event
        if b'"content"' not in event:
            return False
        data = event[event.index(b"data: ") + 6 :]
        for choice in self.decode(data).choices:
            if choice.delta is not None and choice.delta.content:
                return True
        return False

    async def stream(self) -> StreamOutcome:
        outcome = StreamOutcome()
        try:
            async with asyncio.timeout(self.timeout):
                await self._stream(outcome)
        except Exception as exc:  # timeouts, resets, bad answers: all count as errors
            outcome.error = f"{type(exc).__name__}: {exc}"[:200]
            self.close()
        return outcome

    async def _stream(self, outcome: StreamOutcome) -> None:
        if self.conn is None:
            self.conn = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        reader, writer = self.conn
        started = time.perf_counter()
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lowered = head.lower()
        keep_alive = b"connection: close" not in lowered
        if b"transfer-encoding: chunked" not in lowered:
            length = re.search(rb"content-length: *(\d+)", lowered)
            body = await reader.readexactly(int(length[1])) if length else b""
            raise RuntimeError(f"status {status}, not chunked: {body[:120]!r}")
        if status != 200:
            raise RuntimeError(f"status {status}")
        buffer = b""
        last = 0.0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            buffer += data[:-2]
            while (cut := buffer.find(b"\n\n")) >= 0:
                event, buffer = buffer[:cut], buffer[cut + 2 :]
                if event.startswith((b'data: {"error"', b"event: error")) or (
                    b"\nevent: error" in event
                ):
                    raise RuntimeError(f"error event: {event[:160]!r}")
                if not self.is_content(event):
                    continue
                now = time.perf_counter()
                if outcome.ttft is None:
                    outcome.ttft = now - started
                else:
                    outcome.gaps.append(now - last)
                last = now
                outcome.chunks += 1
        if outcome.ttft is None:
            raise RuntimeError("the stream carried no content")
        if not keep_alive:
            self.close()


def _pct(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


async def _loadgen(job: dict[str, Any]) -> dict[str, Any]:
    ttfts: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    completed = chunks = 0
    end = time.perf_counter() + job["duration"]
    concurrency = job["concurrency"]
    limit = job.get("requests")  # a fixed number of streams instead of a duration
    started = 0

    async def slot(index: int) -> None:
        nonlocal completed, chunks, started
        await asyncio.sleep(job["ramp"] * index / concurrency)
        client = Client(job)
        try:
            while time.perf_counter() < end if limit is None else started < limit:
                started += 1
                outcome = await client.stream()
                chunks += outcome.chunks
                if outcome.error is not None:
                    errors.append(outcome.error)
                    await asyncio.sleep(0.05)
                    continue
                completed += 1
                assert outcome.ttft is not None
                ttfts.append(outcome.ttft)
                gaps.extend(outcome.gaps)
        finally:
            client.close()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(slot(i) for i in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "completed": completed,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "chunks": chunks,
        "ttft": {q: _pct(ttfts, p) for q, p in (("p50", 0.5), ("p99", 0.99))},
        "gap": {q: _pct(gaps, p) for q, p in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "client_cpu": cpu,
        "wall": wall,
    }


def loadgen_main() -> None:
    job = json.loads(sys.stdin.read())
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    print(json.dumps(asyncio.run(_loadgen(job))))


# ==== the paced upstream (runs in its own process) ==============================================


class PacedUpstream(asyncio.Protocol):
    """Azure OpenAI's streamed chat wire format, paced, at a few microseconds per chunk.

    ``tests/fake_azure.py`` builds every chunk with ``json.dumps`` and runs a task and a
    timer per stream; at 500+ streams on 2 CPUs that alone misses its pace. Here the
    bytes of a stream (the fake's own chunks, for N words) are built once and cached,
    and each chunk is one ``call_at`` timer and one ``transport.write``. HTTP/1.1 with
    keep-alive; the last user message's word count picks the number of chunks (like
    the fake's echo); any ``POST .../chat/completions`` is served, and the api-key
    (or bearer) is checked.
    """

    cache: ClassVar[dict[tuple[int, int, bool], tuple[bytes, list[bytes], bytes]]] = {}
    interval = 0.1
    api_key = API_KEY

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").lower()
        length = re.search(r"content-length: *(\d+)", head)
        size = int(length[1]) if length else 0
        if len(self.buffer) < end + 4 + size:
            return
        body, self.buffer = self.buffer[end + 4 : end + 4 + size], self.buffer[end + 4 + size :]
        assert self.transport is not None
        authorised = f"api-key: {self.api_key}" in head or f"bearer {self.api_key}" in head
        if not head.startswith("post ") or "/chat/completions" not in head.split("\r\n")[0]:
            self.answer(404, b'{"error": {"code": "404", "message": "Resource not found"}}')
        elif not authorised:
            self.answer(401, b'{"error": {"code": "401", "message": "Access denied"}}')
        else:
            request = json.loads(body)
            if not request.get("stream"):
                self.answer(400, b'{"error": {"code": "400", "message": "stream only"}}')
                return
            self.stream(request)

    def answer(self, status: int, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def stream(self, request: dict[str, Any]) -> None:
        words = _echo_chunks(request)
        options = request.get("stream_options") or {}
        usage_wanted = options.get("include_usage") is True
        prompt = _usage(request, len(words))["prompt_tokens"]
        key = (len(words), prompt, usage_wanted)
        if key not in self.cache:
            usage = _usage(request, len(words)) if usage_wanted else None
            preamble, content, tail = _stream_chunks(MODEL, words, "stop", usage)
            head = (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
            ) + b"".join(_sse(event) for event in preamble)
            end = b"".join(_sse(event) for event in tail) + _sse("[DONE]") + b"0\r\n\r\n"
            self.cache[key] = (head, [_sse(event) for event in content], end)
        head, chunks, end = self.cache[key]
        assert self.transport is not None
        self.transport.write(head)
        loop = asyncio.get_running_loop()
        due = loop.time()

        def emit(index: int) -> None:
            nonlocal due
            self.timer = None
            if self.transport is None:
                return
            if index == len(chunks):
                self.transport.write(end)
                return
            self.transport.write(chunks[index])
            due += self.interval
            self.timer = loop.call_at(due, emit, index + 1)

        due += self.interval
        self.timer = loop.call_at(due, emit, 0)


def upstream_main(interval_ms: float) -> None:
    PacedUpstream.interval = interval_ms / 1000

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(
            PacedUpstream, "127.0.0.1", 0, backlog=4096
        )
        print(f"paced upstream on http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        sys.stdout.flush()
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# ==== the floor: the fixed stack alone (runs in its own processes) ================================


def floor_app(upstream: str) -> Any:
    """hypercorn + Starlette + aiohttp and nothing else: the request's bytes go up, the answer's
    bytes come back as they arrive (no SDK, parsing, validation, auth, logging or sse-starlette).
    Whatever this costs, any server on this stack costs at least as much."""
    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    path = f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
    sessions: list[aiohttp.ClientSession] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            sessions.append(session)
            yield

    async def chat(request: Request) -> StreamingResponse:
        answer = await sessions[0].post(
            upstream + path,
            data=await request.body(),
            headers={"api-key": API_KEY, "content-type": "application/json"},
        )

        async def body() -> Any:
            try:
                async for piece in answer.content.iter_any():
                    yield piece
            finally:
                answer.release()

        return StreamingResponse(body(), media_type="text/event-stream")

    routes = [Route("/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


def floor_worker(upstream: str, fd: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{fd}"]
    config.backlog = 4096
    config.accesslog = config.errorlog = None
    with contextlib.suppress(KeyboardInterrupt):
        import uvloop

        uvloop.run(serve(floor_app(upstream), config))


def floor_main(upstream: str, workers: int) -> None:
    """Open the socket, print its port, run ``workers`` floor workers on it.

    Started in a session of its own: ``stop_group`` ends it and its workers together."""
    import socket

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    fd = listener.fileno()
    children = [
        subprocess.Popen(
            [sys.executable, "-m", MODULE, "--floor-worker", str(fd), "--upstream-url", upstream],
            cwd=ROOT,
            pass_fds=(fd,),
        )
        for _ in range(workers)
    ]
    print(f"floor on port {listener.getsockname()[1]}", flush=True)
    for child in children:
        child.wait()


# ==== the orchestrator ===========================================================================


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """One path under test: where to send, how it answers, and the process behind it."""

    name: str
    host: str
    port: int
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    format: str  # "streamsvc" (named events) or "openai" (data-only chunks)
    pid: int | None  # the proxy's process (None: nothing between client and upstream)

    def job(self, words: int, **extra: Any) -> dict[str, Any]:
        body = json.loads(json.dumps(self.body))
        body["messages"] = [{"role": "user", "content": " ".join(["w"] * words)}]
        return {
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "headers": self.headers,
            "body": body,
            "format": self.format,
            **extra,
        }


class Sampler:
    """Peak RSS of a process tree, sampled every 50 ms on a thread."""

    def __init__(self, pid: int | None) -> None:
        import psutil

        self.process = psutil.Process(pid) if pid else None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tree(self) -> list[Any]:
        assert self.process is not None
        return [self.process, *self.process.children(recursive=True)]

    def cpu(self) -> float:
        if self.process is None:
            return 0.0
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(Exception):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = 0
            for proc in self.tree():
                with contextlib.suppress(Exception):
                    rss += proc.memory_info().rss
            self.peak = max(self.peak, rss)

    def __enter__(self) -> Sampler:
        if self.process is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_loadgen(job: dict[str, Any], pid: int | None) -> dict[str, Any]:
    upstream = Sampler(UPSTREAM_PID[0])
    with Sampler(pid) as sampler:
        cpu, upstream_cpu = sampler.cpu(), upstream.cpu()
        done = subprocess.run(
            [sys.executable, "-m", MODULE, "--loadgen"],
            cwd=ROOT,
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=job.get("hard_timeout", 600),
            check=False,
        )
        cpu, upstream_cpu = sampler.cpu() - cpu, upstream.cpu() - upstream_cpu
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["server_cpu"] = cpu if pid else None
    result["upstream_cpu"] = upstream_cpu
    result["peak_rss"] = sampler.peak if pid else None
    return result


def start_upstream(interval_ms: float, fake: bool) -> tuple[subprocess.Popen[str], str, int]:
    if fake:
        command = ["-m", "tests.fake_azure", "--port", "0", "--api-key", API_KEY]
    else:
        command = ["-m", MODULE, "--upstream"]
    process = subprocess.Popen(
        [sys.executable, *command, "--interval-ms", str(interval_ms)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"http://([\d.]+):(\d+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"the fake upstream did not start: {line!r}")
    return process, match[1], int(match[2])


def start_streamsvc(upstream: str, extra: list[str]) -> ServerProcess:
    """streamsvc on the upstream; ``extra`` holds ``NAME=VALUE`` settings (``--streamsvc-env``)."""
    # Imported here, not at the top: the floor's workers and the load generator run this
    # module too, and their memory and CPU figures should hold only what they measure.
    from tests.harness import ServerProcess

    env = {
        "AZURE_OPENAI_API_KEY": API_KEY,
        "AZURE_OPENAI_ENDPOINT": upstream,
        "AZURE_OPENAI_DEPLOYMENT": DEPLOYMENT,
        "AZURE_OPENAI_API_VERSION": API_VERSION,
        "STREAMSVC_API_KEYS": PROXY_KEY,
    }
    env |= dict(item.split("=", 1) for item in extra)  # after --workers: these win
    return ServerProcess(env)


def ensure_litellm() -> Path:
    """LiteLLM's proxy in its own virtualenv (pinned: a known release, installed once)."""
    binary = LITELLM_VENV / "bin/litellm"
    stamp = LITELLM_VENV / f".installed-{LITELLM_VERSION}"
    if stamp.exists() and binary.exists():
        return binary
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (once)")
    BENCH.mkdir(exist_ok=True)
    if not (LITELLM_VENV / "bin/python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run(
        [
            str(LITELLM_VENV / "bin/python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            f"litellm[proxy]=={LITELLM_VERSION}",
        ],
        check=True,
    )
    stamp.touch()
    return binary


def start_litellm(upstream: str, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    import httpx

    from tests.harness import free_port

    binary = ensure_litellm()
    config = BENCH / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {DEPLOYMENT}\n"
        "    litellm_params:\n"
        f"      model: azure/{DEPLOYMENT}\n"
        f"      api_base: {upstream}\n"
        f"      api_key: {API_KEY}\n"
        f'      api_version: "{API_VERSION}"\n'
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {PROXY_KEY}\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map at start-up
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
    }
    logfile = (BENCH / "litellm.log").open("wb")
    process = subprocess.Popen(
        [
            str(binary),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(workers),
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=BENCH,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"litellm exited {process.returncode}; see {BENCH / 'litellm.log'}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).is_success:
                return process, port
        time.sleep(0.25)
    stop_group(process)
    raise RuntimeError("litellm did not start in 180 s")


def start_floor(upstream: str, workers: int) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            MODULE,
            "--floor",
            "--upstream-url",
            upstream,
            "--workers",
            str(workers),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    match = re.search(r"port (\d+)", process.stdout.readline())
    if not match:
        stop_group(process)
        raise RuntimeError("the floor proxy did not start")
    time.sleep(1.0)  # its workers import and start serving
    return process, int(match[1])


def stop_group(process: subprocess.Popen[Any]) -> None:
    """Stop a process started with its own session, and its children (by its group id)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    timeout = args.chunks * args.interval_ms / 1000 + 30
    log(f"{target.name}: warm-up")
    run_loadgen(
        target.job(
            args.chunks - 1, concurrency=20, duration=0, ramp=0.2, requests=40, timeout=timeout
        ),
        target.pid,
    )
    log(f"{target.name}: time to first token over {args.ttft_requests} sequential requests")
    ttft = run_loadgen(
        target.job(
            1, concurrency=1, duration=0, ramp=0, requests=args.ttft_requests, timeout=timeout
        ),
        target.pid,
    )
    levels: dict[int, dict[str, Any]] = {}
    for level in args.levels:
        log(f"{target.name}: {level} concurrent streams for {args.duration:g} s")
        job = target.job(
            args.chunks - 1,
            concurrency=level,
            duration=args.duration,
            ramp=args.ramp,
            timeout=timeout,
            hard_timeout=args.duration + args.ramp + 2 * timeout + 60,
        )
        result = run_loadgen(job, target.pid)
        result["sustained"] = sustained(result, args)
        levels[level] = result
        log(
            f"{target.name} @ {level}: {result['completed']} streams, {result['errors']} errors, "
            f"gap p99 {ms(result['gap']['p99'])} ms, client CPU "
            f"{100 * result['client_cpu'] / result['wall']:.0f}%, upstream CPU "
            f"{100 * result['upstream_cpu'] / result['wall']:.0f}%"
        )
        if result["errors"] > result["completed"]:
            log(f"{target.name}: mostly failing at {level}; skipping higher levels")
            break
    return {"ttft": ttft, "levels": levels}


def sustained(result: dict[str, Any], args: argparse.Namespace) -> bool:
    p99 = result["gap"]["p99"]
    return (
        result["errors"] == 0
        and result["completed"] > 0
        and p99 is not None
        and p99 * 1000 <= args.interval_ms + args.slack_ms
    )


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f}"


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    facts = machine_facts()
    direct = results.get("direct")
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), Python {facts['python']}, "
        f"{facts['os']}; load average {args.load_start} at the start and {facts['load']} at "
        f"the end (other work shares the machine); streamsvc at {facts['commit']}; "
        f"LiteLLM {LITELLM_VERSION} "
        f"(`litellm[proxy]`); {args.workers} worker process(es) each for streamsvc "
        "(`STREAMSVC_WORKERS`), LiteLLM (`--num_workers`) and the floor. "
        "The floor is hypercorn + Starlette + aiohttp passing the bytes through and nothing "
        "else (no SDK, parsing, validation, auth, logging or sse-starlette): what this stack "
        "costs before any work of ours. "
        f"Upstream: {upstream_name(args)} on loopback, "
        f"{args.chunks} content chunks per stream, one every {args.interval_ms:g} ms. "
        "Everything (upstream, proxy, load generator) shares the same CPUs.",
        "",
        f"Time to first token, {args.ttft_requests} sequential requests "
        "(includes the upstream's first pause; *added* = minus the direct path):",
        "",
    ]
    ttft_rows = []
    for name, result in results.items():
        t = result["ttft"]["ttft"]
        added = ["—", "—"]
        if direct is not None and name != "direct" and t["p50"] is not None:
            base = direct["ttft"]["ttft"]
            added = [ms(t[q] - base[q]) for q in ("p50", "p99")]
        ttft_rows.append([name, ms(t["p50"]), ms(t["p99"]), *added])
    headers = ["path", "TTFT p50 ms", "TTFT p99 ms", "added p50 ms", "added p99 ms"]
    lines += markdown_table(headers, "lrrrr", ttft_rows)
    lines += [
        "",
        f"Concurrent streams, each level held for {args.duration:g} s (new stream as one ends; "
        f"the streams opened evenly over the first {args.ramp:g} s); "
        f"sustained = no error and inter-chunk p99 <= pace + {args.slack_ms:g} ms "
        f"(<= {args.interval_ms + args.slack_ms:g} ms):",
        "",
    ]
    level_rows = []
    for name, result in results.items():
        for level, r in result["levels"].items():
            cpu = "—"
            if r["server_cpu"] is not None and r["chunks"]:
                cpu = f"{r['server_cpu'] / r['chunks'] * 1000:.3f}"
            rss = "—" if r["peak_rss"] is None else f"{r['peak_rss'] / 2**20:.0f}"
            row = [name, str(level), str(r["completed"]), str(r["errors"])]
            row += [ms(r["ttft"]["p50"]), ms(r["ttft"]["p99"])]
            row += [ms(r["gap"]["p50"]), ms(r["gap"]["p99"]), ms(r["gap"]["max"]), cpu, rss]
            row += [f"{100 * r['client_cpu'] / r['wall']:.0f}"]
            row += [f"{100 * r['upstream_cpu'] / r['wall']:.0f}"]
            level_rows.append([*row, "yes" if r["sustained"] else "no"])
    headers = ["path", "streams", "completed", "errors", "TTFT p50 ms", "TTFT p99 ms"]
    headers += ["inter-chunk p50 ms", "inter-chunk p99 ms", "max ms"]
    headers += ["proxy CPU s / 1000 chunks", "proxy peak RSS MiB", "load-gen CPU %"]
    headers += ["upstream CPU %", "sustained"]
    lines += markdown_table(headers, "l" + "r" * 12 + "l", level_rows)
    best = {
        name: max((lvl for lvl, r in res["levels"].items() if r["sustained"]), default=0)
        for name, res in results.items()
    }
    lines += ["", "Sustained concurrent streams (highest level tried that held): "]
    lines[-1] += ", ".join(f"{name} {count}" for name, count in best.items()) + "."
    if "streamsvc" in results:
        lines += ["", "Targets (issue 6):", ""]
        t = results["streamsvc"]["ttft"]["ttft"]
        if direct is not None and t["p50"] is not None:
            added = (t["p50"] - direct["ttft"]["ttft"]["p50"]) * 1000
            lines.append(f"- added TTFT p50 <= 2 ms: {added:.2f} ms, {_verdict(added <= 2)}")
            if "floor" in results:
                floor = results["floor"]["ttft"]["ttft"]["p50"] - direct["ttft"]["ttft"]["p50"]
                lines.append(f"  (the floor adds {floor * 1000:.2f} ms)")
        top = results["streamsvc"]["levels"].get(1000)
        if top is not None:
            p99 = top["gap"]["p99"]
            lines.append(
                f"- 1000 concurrent streams, inter-chunk p99 within the slack: {ms(p99)} ms "
                f"({top['errors']} errors), {_verdict(top['sustained'])}"
            )
            floor_top = results.get("floor", {}).get("levels", {}).get(1000)
            if floor_top is not None:
                lines.append(
                    f"  (the floor: {ms(floor_top['gap']['p99'])} ms, "
                    f"{floor_top['errors']} errors, sustained: {floor_top['sustained']})"
                )
        if "litellm" in best:
            mine, theirs = best["streamsvc"], best["litellm"]
            if theirs:
                verdict = f"{mine / theirs:.1f}x, {_verdict(mine >= 3 * theirs)}"
            else:
                verdict = "no ratio (LiteLLM sustained no level tried)"
            lines.append(f"- >= 3x LiteLLM's sustained streams: {mine} vs {theirs}, {verdict}")
            served = [
                f"{level}: {r['completed']} vs {results['litellm']['levels'][level]['completed']}"
                for level, r in results["streamsvc"]["levels"].items()
                if level in results["litellm"]["levels"]
            ]
            lines.append(
                "- streams completed in the same window, streamsvc vs LiteLLM, by level: "
                + "; ".join(served)
            )
    return "\n".join(lines)


def upstream_name(args: argparse.Namespace) -> str:
    if args.fake_upstream:
        return "`tests/fake_azure.py`"
    return "the script's paced upstream (the fake Azure's exact bytes, cached)"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


INTRO = """\
`python -m benchmarks.chat` (or `scripts/bench-chat`): the same streamed chat straight to a
paced upstream, through streamsvc and through LiteLLM's proxy, side by side in one run
(`--help` gives the method).
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=METHOD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-url", help=argparse.SUPPRESS)
    parser.add_argument(
        "--fake-upstream",
        action="store_true",
        help="use tests/fake_azure.py as the upstream (slower: misses its pace past ~300 streams)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short run: fewer requests, 5 s levels"
    )
    parser.add_argument(
        "--levels", default="10,25,50,100,200,300,500,1000", help="concurrency levels"
    )
    parser.add_argument("--duration", type=float, help="seconds each level is held (default 15)")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="upstream pace")
    parser.add_argument(
        "--slack-ms", type=float, default=50.0, help="allowed inter-chunk p99 over the pace"
    )
    parser.add_argument("--ttft-requests", type=int, help="sequential TTFT requests (default 200)")
    parser.add_argument(
        "--ramp",
        type=float,
        help="seconds over which a level's streams are opened (default: one stream's length)",
    )
    parser.add_argument(
        "--paths",
        default="direct,floor,streamsvc,litellm",
        help="direct, floor (the stack alone: hypercorn + Starlette + aiohttp), streamsvc, litellm",
    )
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes for streamsvc and for LiteLLM"
    )
    parser.add_argument(
        "--streamsvc-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a streamsvc setting for this run (repeatable), e.g. STREAMSVC_WORKERS=2",
    )
    parser.add_argument("--streamsvc-path", default="/chat", help="the streamsvc route to load")
    parser.add_argument("--write-docs", action="store_true", help="record docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.loadgen:
        loadgen_main()
        return
    if args.upstream:
        upstream_main(args.interval_ms)
        return
    if args.floor:
        floor_main(args.upstream_url, args.workers)
        return
    if args.floor_worker is not None:
        floor_worker(args.upstream_url, args.floor_worker)
        return
    args.levels = [int(x) for x in args.levels.split(",") if x]
    args.duration = args.duration or (5.0 if args.quick else 15.0)
    # Opening a level's streams over one stream's length makes arrivals steady, as in
    # service; a shorter ramp makes cohorts that start and end together (bursts).
    args.ramp = args.chunks * args.interval_ms / 1000 if args.ramp is None else args.ramp
    args.load_start = load_average()
    args.ttft_requests = args.ttft_requests or (40 if args.quick else 200)
    paths = [p for p in args.paths.split(",") if p and not (args.no_litellm and p == "litellm")]
    command = " ".join(["python -m benchmarks.chat", *sys.argv[1:]])
    BENCH.mkdir(exist_ok=True)

    upstream, host, port = start_upstream(args.interval_ms, args.fake_upstream)
    url = f"http://{host}:{port}"
    UPSTREAM_PID[0] = upstream.pid
    log(f"upstream {url}: one chunk every {args.interval_ms:g} ms, {args.chunks} per stream")
    results: dict[str, dict[str, Any]] = {}
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    try:
        for name in paths:
            if name == "direct":
                target = Target(
                    "direct",
                    host,
                    port,
                    f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}",
                    {"api-key": API_KEY},
                    {"stream": True, "stream_options": {"include_usage": True}},
                    "openai",
                    None,
                )
                results[name] = measure(target, args)
            elif name == "streamsvc":
                server = start_streamsvc(
                    url, [f"STREAMSVC_WORKERS={args.workers}", *args.streamsvc_env]
                )
                try:
                    events = args.streamsvc_path == "/chat"
                    target = Target(
                        "streamsvc",
                        "127.0.0.1",
                        server.port,
                        args.streamsvc_path,
                        auth,
                        {"stream": True} if events else {"model": DEPLOYMENT, "stream": True},
                        "streamsvc" if events else "openai",
                        server.process.pid,
                    )
                    results[name] = measure(target, args)
                finally:
                    server.close()
            elif name == "floor":
                floor, fport = start_floor(url, args.workers)
                try:
                    target = Target(
                        "floor",
                        "127.0.0.1",
                        fport,
                        "/chat/completions",
                        {},
                        {
                            "model": DEPLOYMENT,
                            "stream": True,
                            "stream_options": {"include_usage": True},
                        },
                        "openai",
                        floor.pid,
                    )
                    results[name] = measure(target, args)
                finally:
                    stop_group(floor)
            elif name == "litellm":
                process, lport = start_litellm(url, args.workers)
                try:
                    target = Target(
                        "litellm",
                        "127.0.0.1",
                        lport,
                        "/chat/completions",
                        auth,
                        {"model": DEPLOYMENT, "stream": True},
                        "openai",
                        process.pid,
                    )
                    results[name] = measure(target, args)
                finally:
                    stop_group(process)
    finally:
        upstream.terminate()
        upstream.wait(10)
    (BENCH / "last-run.json").write_text(json.dumps(results, indent=1, default=str))
    table = report(results, args, command)
    print(table)
    if args.write_docs:
        log(f"wrote {write_docs_section('Chat', INTRO + chr(10) + table)}")


if __name__ == "__main__":
    main()
