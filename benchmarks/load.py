"""Load test: connector executions and chat streams at once, every answer checked.

Run as ``python -m benchmarks.load``; ``--help`` gives the method (``METHOD``). It exits 1
if any answer was wrong or anything leaked, and a watchdog bounds the whole run. One
module, in the order a run goes: requests and their checks, processes, figures, main.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.common import ROOT, load_average, machine_facts, percentile
from tests.harness import ServerProcess, parse_sse_lines, read_sse

METHOD = """\
Everything runs on loopback, bounded in count and time. It starts

- a fake Azure OpenAI upstream (`python -m tests.fake_azure`, its own process): it
  echoes `"echo: <prompt>"` word by word, one chunk every `--chunk-interval-ms`;
- the server (`python -m streamsvc` via `tests.harness.ServerProcess`) with an
  explicit environment: Azure settings pointing at the fake, JSON logs, no warm pool,
  and `STREAMSVC_MAX_CONCURRENT_RUNS` / `STREAMSVC_QUEUE_SIZE` equal to
  `--executions`, so every run is admitted (a 429 counts as a failure);

then fires `--executions` streamed executions and `--chats` streamed chats at the
same moment, all on their own connections, and checks every answer in full:

- execution: status 200, SSE ids 1..n, phases `validated`/`starting`/`running`,
  the connector's progress lines (4 lines over ~1 s) on `stdout` in order, one line on
  `stderr`, a final `done` with `ok`, exit code 0, `stdout` equal to the streamed
  lines, and `result` equal to what the load test computed from the request (the sum of
  a per-request list from `configuration` plus an offset from
  `configuration_overrides`);
- chat: status 200, SSE ids 1..n, deltas that concatenate to exactly the final
  `content` and to `"echo: <prompt>"` (each prompt distinct), `finish_reason`
  `stop`, `usage.completion_tokens` equal to the number of deltas, last event `done`;
- both, once the load is over: the run's stored log (`GET /runs/{X-Run-ID}/events`,
  replayed from the first event) equal to the stream as it was received, event by
  event (issue 13: every event of every run stored once, in order).

Meanwhile a thread samples the server's RSS and open files every 50 ms. Afterwards: no
container with the server's owner label (`streamsvc.owner=<host>:<pid>`) may remain
(removal runs in the background after each answer: 15 s allowed), `/health` must say
`ok`, one more chat and one more execution must succeed, the server's log must hold
no warning or error, and SIGTERM must stop it with exit status 0 and nothing left.
It prints throughput, latency percentiles (time to first token / first stdout line
too), failures by kind, the server's peak RSS, open files and CPU seconds (and the
fake's, the load generator's and the Docker daemons'), the kernel's listen-queue
overflows, client connections the server still holds, and the containers left; it
exits 1 if anything failed or leaked. `--raw DIR` keeps every request's timings and
the server's log; `--set NAME=VALUE` overrides a server setting.

    .venv/bin/python -m benchmarks.load                 # 20 executions + 200 chats
    .venv/bin/python -m benchmarks.load --quick         # 4 + 40, shorter streams
    .venv/bin/python -m benchmarks.load --executions 30 --chats 400

A hard deadline (`--deadline`, default 300 s) bounds the whole run: requests still
open 60 s before it are cancelled and count as failed (the checks after the load get
those 60 s); at the deadline a watchdog stops the server and the fake (SIGTERM, then
SIGKILL after 10 s) and exits 3.
"""
UPSTREAM_KEY = "load-upstream-key-0123456789"
IMAGE = "streamsvc-sandbox:latest"
OWNER_LABEL = "streamsvc.owner"

# The connector: progress lines over ~1 s, a stderr line, then a result computed from
# its input (the context file holds the configuration with the overrides merged).
CONNECTOR = """\
import json, os, sys, time

context = json.load(open(os.environ["STREAMSVC_CONTEXT_FILE"]))
config = context["connector"]["configuration"]
numbers, partial = config["numbers"], 0
for step, chunk in enumerate([numbers[i::4] for i in range(4)]):
    partial += sum(chunk)
    print(f"request {config['request']} step {step}: partial {partial}", flush=True)
    time.sleep(0.25)
print(f"request {config['request']} done", file=sys.stderr, flush=True)
total = partial + config["offset"]
print(json.dumps({"ok": True, "result": {"request": config["request"], "sum": total}}))
"""


# ---- requests and their checks ------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    kind: str  # "execution" or "chat"
    index: int
    started: float = 0.0
    ended: float | None = None
    first: float | None = None  # first stdout line / first delta
    chunks: int = 0  # stdout events / delta events
    failure: str | None = None  # the first thing found wrong
    detail: str | None = None  # an exception's message (kept with --raw)
    run_id: str | None = None  # X-Run-ID: the stored log must be the stream's (issue 13)
    seen: list[tuple[str | None, str, Any]] = dataclasses.field(default_factory=list)

    @property
    def latency(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


def execution_body(index: int, rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request, and the answer's expected ``result`` and ``stdout``."""
    numbers = [rng.randint(-1000, 1000) for _ in range(rng.randint(4, 40))]
    offset = index * 1000
    body = {
        "connector": {
            "runtime": {
                "language": "python",
                "entryPoint": "main.py",
                "timeoutMs": 60_000,
                "memoryMb": 128,
            },
            "configuration": {"request": index, "numbers": numbers, "offset": 0},
            "files": {"main.py": CONNECTOR},
        },
        "configuration_overrides": {"offset": offset},
        "network_mode": "none",
        "stream": True,
    }
    lines, partial = [], 0
    for step in range(4):
        partial += sum(numbers[step::4])
        lines.append(f"request {index} step {step}: partial {partial}\n")
    result = {"request": index, "sum": sum(numbers) + offset}
    stdout = "".join(lines) + json.dumps({"ok": True, "result": result}) + "\n"
    return body, {"result": result, "stdout": stdout}


def chat_prompt(index: int, words: int) -> str:
    return f"load request {index:04d} " + " ".join(f"w{index}x{n}" for n in range(words))


def check_ids(events: list[Any]) -> str | None:
    ids = [event.id for event in events]
    if ids != [str(n) for n in range(1, len(events) + 1)]:
        return "ids_not_increasing"
    return None


def check_execution(response: Any, expected: dict[str, Any], outcome: Outcome) -> str | None:
    if response.status != 200:
        return f"http_{response.status}"
    if response.body is not None or not response.events:
        return "not_a_stream"
    if response.last.event == "error":
        return f"error_event:{response.last.data.get('code')}"
    if response.last.event != "done":
        return "no_done_event"
    problem = check_ids(response.events)
    if problem:
        return problem
    phases = [event.data.get("phase") for event in response.named("status")]
    if phases[:1] != ["validated"] or phases[-2:] != ["starting", "running"]:
        return "wrong_phases"
    stdout = [event.data["text"] for event in response.named("stdout")]
    stderr = "".join(event.data["text"] for event in response.named("stderr"))
    outcome.chunks = len(stdout)
    done = response.last.data
    if "".join(stdout) != expected["stdout"]:
        return "wrong_stdout"
    if "".join(stdout) != done.get("stdout"):
        return "stdout_events_differ_from_done"
    if stderr != f"request {outcome.index} done\n" or done.get("stderr") != stderr:
        return "wrong_stderr"
    flags = ("timed_out", "oom_killed", "output_limit_exceeded", "pids_limited")
    if done.get("ok") is not True or done.get("exit_code") != 0 or any(done.get(f) for f in flags):
        return "run_not_ok"
    if done.get("result") != expected["result"]:
        return "wrong_result"
    return None


def check_chat(response: Any, prompt: str, outcome: Outcome) -> str | None:
    if response.status != 200:
        return f"http_{response.status}"
    if response.body is not None or not response.events:
        return "not_a_stream"
    if response.last.event == "error":
        return f"error_event:{response.last.data.get('code')}"
    if response.last.event != "done":
        return "no_done_event"
    problem = check_ids(response.events)
    if problem:
        return problem
    if [event.event for event in response.events[:-1]] != ["delta"] * (len(response.events) - 1):
        return "unexpected_event"
    text = "".join(event.data["content"] for event in response.named("delta"))
    done = response.last.data
    outcome.chunks = len(response.named("delta"))
    if text != done.get("content"):
        return "deltas_differ_from_content"
    if text != "echo: " + prompt:
        return "wrong_echo"
    if done.get("finish_reason") != "stop":
        return "wrong_finish_reason"
    if (done.get("usage") or {}).get("completion_tokens") != outcome.chunks:
        return "wrong_usage"
    return None


async def one_execution(
    client: httpx.AsyncClient, url: str, index: int, rng: random.Random, limit: float
) -> Outcome:
    body, expected = execution_body(index, rng)
    outcome = Outcome("execution", index)
    await _run(
        client,
        url + "/execute-connector",
        body,
        outcome,
        limit,
        lambda response: check_execution(response, expected, outcome),
        "stdout",
    )
    return outcome


async def one_chat(
    client: httpx.AsyncClient, url: str, index: int, words: int, limit: float
) -> Outcome:
    prompt = chat_prompt(index, words)
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True}
    outcome = Outcome("chat", index)
    await _run(
        client,
        url + "/chat",
        body,
        outcome,
        limit,
        lambda response: check_chat(response, prompt, outcome),
        "delta",
    )
    return outcome


async def _run(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    outcome: Outcome,
    limit: float,
    check: Any,
    first_event: str,
) -> None:
    outcome.started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            response = await read_sse(client, url, body)
    except TimeoutError:
        outcome.failure = "timeout"
        return
    except asyncio.CancelledError:
        outcome.failure = "deadline"  # the overall deadline cancelled it
        return
    except Exception as exc:  # resets, protocol errors, bad JSON in an event
        outcome.failure = f"exception:{type(exc).__name__}"
        outcome.detail = repr(exc)[:300]
        return
    outcome.ended = response.last.at if response.events else time.monotonic()
    firsts = response.named(first_event)
    outcome.first = firsts[0].at if firsts else None
    try:
        outcome.failure = check(response)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        outcome.failure = f"malformed_event:{type(exc).__name__}"
    outcome.run_id = response.headers.get("x-run-id")
    outcome.seen = [(e.id, e.event, e.data) for e in response.events]


async def check_stored(client: httpx.AsyncClient, url: str, outcome: Outcome) -> None:
    """The run's stored log, replayed, is exactly the stream it was seen as: every event
    stored once, in order."""
    if outcome.failure is not None:
        return
    if outcome.run_id is None:
        outcome.failure = "no_run_id"
        return
    stored: list[tuple[str | None, str, Any]] = []
    async with client.stream("GET", f"{url}/runs/{outcome.run_id}/events") as response:
        block: list[str] = []
        async for line in response.aiter_lines():
            if line:
                block.append(line)
                continue
            fields, _ = parse_sse_lines(block)
            block = []
            if "data" in fields:
                data = json.loads(fields["data"])
                stored.append((fields.get("id"), fields.get("event", "message"), data))
    if stored != outcome.seen:
        outcome.failure = "stored_log_differs"


# ---- the processes ------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Every ``interval`` seconds: the server's RSS, open files and accept queue (peaks)."""

    def __init__(self, pid: int, port: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(pid), interval
        self.port = f":{port:04X} "
        self.peak = self.peak_fds = self.peak_accept_queue = self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
                self.peak_fds = max(self.peak_fds, self.process.num_fds())
            except psutil.Error:
                return
            self.peak_accept_queue = max(self.peak_accept_queue, self.accept_queue())
            self.samples += 1
            self._halt.wait(self.interval)

    def accept_queue(self) -> int:
        """Connections waiting to be accepted (``/proc/net/tcp``: a listener's rx_queue)."""
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and (fields[1] + " ").endswith(self.port):
                return int(fields[4].split(":")[1], 16)
        return 0

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def listen_backlog(port: int) -> str:
    """The listening socket's backlog, as ``ss`` shows it (Send-Q of a listener)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    return out[2] if len(out) > 2 else "unknown"


def start_fake(interval_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    """The fake upstream in its own process; returns it and its URL."""
    command = [
        sys.executable,
        "-m",
        "tests.fake_azure",
        "--port",
        "0",
        "--api-key",
        UPSTREAM_KEY,
        "--interval-ms",
        str(interval_ms),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 15)
    line = process.stdout.readline().decode() if ready else ""
    if "listening on http://127.0.0.1:" not in line:
        process.kill()
        raise RuntimeError(f"the fake upstream did not start: {line!r}")
    return process, line.split("listening on ", 1)[1].split()[0]


def our_containers(owner: str) -> list[str]:
    """Every container (any state) carrying this server's owner label."""
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={OWNER_LABEL}={owner}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.split()


def server_log_problems(text: str) -> tuple[list[str], collections.Counter[str]]:
    """Log records at warning or above (or unparseable lines), and access-log statuses."""
    problems: list[str] = []
    statuses: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(line)  # hypercorn's own lines or a traceback
            continue
        if record.get("level") in ("warning", "error", "critical"):
            problems.append(line)
        if record.get("logger") == "streamsvc.access":
            statuses[f"{record.get('route')} {record.get('status')}"] += 1
    return problems, statuses


def engine_cpu() -> float:
    """CPU seconds of the Docker engine's daemons (dockerd, containerd) so far."""
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("dockerd", "containerd"):
            with contextlib.suppress(psutil.Error):
                total += sum(proc.cpu_times()[:2])
    return total


def client_sockets(process: psutil.Process, port: int) -> tuple[int, int]:
    """The server's sockets for client connections: all of them, and those in CLOSE_WAIT
    (the client has closed its end; the server has not yet)."""
    ours = [c for c in process.net_connections("tcp") if c.laddr and c.laddr.port == port]
    accepted = [c for c in ours if c.status != psutil.CONN_LISTEN]
    return len(accepted), sum(c.status == psutil.CONN_CLOSE_WAIT for c in accepted)


def listen_overflows() -> int:
    """The kernel's count of connections dropped for a full accept queue (all sockets)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(row.get("ListenOverflows", 0))
    return 0


def machine_busy(before: Any, after: Any) -> float:
    """The fraction of all CPUs busy between two ``psutil.cpu_times()`` readings."""
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    total = sum(after) - sum(before)
    return 1 - idle / total if total > 0 else 0.0


# ---- figures ------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    parts = [f"p{p}={percentile(values, p / 100) * 1000:.0f}" for p in (50, 90, 99)]
    return " ".join(parts) + f" max={max(values) * 1000:.0f} ms"


def workload_lines(name: str, outcomes: list[Outcome], unit: str) -> list[str]:
    done = [o for o in outcomes if o.failure is None and o.ended is not None]
    lines = [f"{name}: {len(done)}/{len(outcomes)} complete and correct"]
    if done:
        span = max(o.ended for o in done if o.ended) - min(o.started for o in outcomes)
        chunks = sum(o.chunks for o in done)
        lines.append(
            f"  throughput: {len(done) / span:.1f} requests/s, {chunks / span:.0f} {unit}/s"
            f" ({chunks} {unit} in {span:.2f} s)"
        )
        latencies = [o.latency or 0 for o in done]
        lines.append(f"  latency (request to last event): {percentiles(latencies)}")
        firsts = [o.first - o.started for o in done if o.first is not None]
        label = "time to first token" if name == "chat" else "time to first stdout line"
        lines.append(f"  {label}: {percentiles(firsts)}")
    return lines


# ---- main ---------------------------------------------------------------------------------------


async def fire(args: argparse.Namespace, url: str, deadline: float) -> list[Outcome]:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        tasks = [
            asyncio.create_task(one_execution(client, url, i, rng, args.request_timeout))
            for i in range(args.executions)
        ]
        tasks += [
            asyncio.create_task(one_chat(client, url, i, args.chat_words, args.request_timeout))
            for i in range(args.chats)
        ]
        _, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        outcomes = [task.result() for task in tasks]
        for outcome in outcomes:
            await check_stored(client, url, outcome)
    return outcomes


async def probe(url: str, rng: random.Random) -> list[str]:
    """After the load: health, one chat and one execution must still work."""
    problems = []
    async with httpx.AsyncClient(timeout=15) as client:
        health = await client.get(url + "/health")
        state = health.json()
        if health.status_code != 200 or state.get("status") != "ok":
            problems.append(f"health: {health.status_code} {state}")
        chat = await one_chat(client, url, 99_999, 3, 15)
        if chat.failure:
            problems.append(f"chat after the load: {chat.failure}")
        run = await one_execution(client, url, 99_999, rng, 20)
        if run.failure:
            problems.append(f"execution after the load: {run.failure}")
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=METHOD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--executions", type=int, default=None, help="default 20 (4 with --quick)")
    parser.add_argument("--chats", type=int, default=None, help="default 200 (40 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a small run to try the script")
    parser.add_argument(
        "--chat-words",
        type=int,
        default=None,
        help="words per prompt after 'load request N'; the echo streams one chunk per"
        " word, so a chat has this + 4 chunks (default 40, 10 with --quick)",
    )
    parser.add_argument(
        "--chunk-interval-ms",
        type=float,
        default=100.0,
        help="the fake upstream's pause before each chunk (default 100)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=180.0,
        help="seconds one request may take (default 180)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=300.0,
        help="seconds for the whole run, start-up included (default 300)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting over the script's own (e.g. STREAMSVC_WARM_POOL_SIZE=4)",
    )
    parser.add_argument(
        "--raw",
        type=Path,
        default=None,
        metavar="DIR",
        help="write every request's outcome (outcomes.json) and the server's log there",
    )
    parser.add_argument("--seed", type=int, default=20240611, help="for the execution inputs")
    args = parser.parse_args(argv)
    args.executions = args.executions if args.executions is not None else (4 if args.quick else 20)
    args.chats = args.chats if args.chats is not None else (40 if args.quick else 200)
    args.chat_words = args.chat_words if args.chat_words is not None else (10 if args.quick else 40)
    if not args.quick and (args.executions < 20 or args.chats < 200):
        parser.error("without --quick: at least 20 executions and 200 chats")
    if min(args.executions, args.chats) < 1 or args.chat_words < 1:
        parser.error("--executions, --chats and --chat-words must be at least 1")
    if not all("=" in item for item in args.set):
        parser.error("--set takes NAME=VALUE")
    if any(item.split("=", 1)[0] in ("STREAMSVC_HOST", "STREAMSVC_PORT") for item in args.set):
        parser.error("the server listens on a free loopback port of the script's choosing")
    if not 90 <= args.deadline <= 1800:
        parser.error("--deadline must be between 90 and 1800 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.deadline
    started_processes: list[subprocess.Popen[bytes]] = []

    def watchdog() -> None:  # the last resort: the deadline passed and cleanup hangs
        print(f"load-test: over the {args.deadline:.0f} s deadline; stopping", flush=True)
        for process in started_processes:
            process.terminate()
        for process in started_processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        os._exit(3)

    timer = threading.Timer(args.deadline, watchdog)
    timer.daemon = True
    timer.start()

    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        print(f"load-test: image {IMAGE} missing; run scripts/build-image", file=sys.stderr)
        return 2
    found = machine_facts() | {"load average": load_average(2)}
    keys = ("nproc", "cpu", "memory", "docker", "python", "kernel", "load average")
    facts = {key: found[key] for key in keys}
    fake, fake_url = start_fake(args.chunk_interval_ms)
    started_processes.append(fake)
    concurrency = str(max(args.executions, 1))
    env = {
        "AZURE_OPENAI_API_KEY": UPSTREAM_KEY,
        "AZURE_OPENAI_ENDPOINT": fake_url,
        "AZURE_OPENAI_DEPLOYMENT": "gpt-4o",
        "STREAMSVC_HOST": "127.0.0.1",
        "STREAMSVC_MAX_CONCURRENT_RUNS": concurrency,
        "STREAMSVC_QUEUE_SIZE": concurrency,
        # Every request is a run of one client (no keys): room for all of them at once.
        "STREAMSVC_MAX_ACTIVE_RUNS": str(args.executions + args.chats + 10),
        "STREAMSVC_MAX_ACTIVE_RUNS_PER_KEY": str(args.executions + args.chats + 10),
        "STREAMSVC_WARM_POOL_SIZE": "0",
        "STREAMSVC_LOG_FORMAT": "json",
        "STREAMSVC_LOG_LEVEL": "info",
        **dict(item.split("=", 1) for item in args.set),
    }
    server: ServerProcess | None = None
    failures: collections.Counter[str] = collections.Counter()
    notes: list[str] = []
    try:
        server = ServerProcess(env)
        started_processes.append(server.process)
        pid = server.process.pid
        owner = f"{socket.gethostname()}:{pid}"
        process = psutil.Process(pid)
        rss_before, fds_before = process.memory_info().rss, process.num_fds()
        cpu_before = sum(process.cpu_times()[:2])
        fake_cpu_before = sum(psutil.Process(fake.pid).cpu_times()[:2])
        sampler = RssSampler(pid, server.port)
        backlog = listen_backlog(server.port)
        sampler.start()
        self_cpu_before = time.process_time()
        engine_before, machine_before = engine_cpu(), psutil.cpu_times()
        overflows_before = listen_overflows()
        load_started = time.monotonic()
        outcomes = asyncio.run(fire(args, server.url, deadline - 60))
        load_seconds = time.monotonic() - load_started
        engine = engine_cpu() - engine_before
        busy = machine_busy(machine_before, psutil.cpu_times())
        overflows = listen_overflows() - overflows_before
        self_cpu = time.process_time() - self_cpu_before
        cpu_load = sum(process.cpu_times()[:2]) - cpu_before
        fake_cpu = sum(psutil.Process(fake.pid).cpu_times()[:2]) - fake_cpu_before
        for outcome in outcomes:
            if outcome.failure:
                failures[f"{outcome.kind}: {outcome.failure}"] += 1

        # Containers are removed in the background once a run ends: allow them 15 s.
        left_at_end = our_containers(owner)
        waited = time.monotonic()
        left = left_at_end
        while left and time.monotonic() - waited < 15:
            time.sleep(0.25)
            left = our_containers(owner)
        left_wait = time.monotonic() - waited
        if left:
            failures["containers left"] += len(left)

        for problem in asyncio.run(probe(server.url, random.Random(args.seed + 1))):
            failures["after the load"] += 1
            notes.append(problem)
        sampler.stop()
        rss_after, fds_after = process.memory_info().rss, process.num_fds()
        sockets_after, close_wait = client_sockets(process, server.port)
        cpu_total = sum(process.cpu_times()[:2])

        code = server.stop(timeout=30)
        if code != 0:
            failures["server exit status"] += 1
            notes.append(f"the server exited {code} on SIGTERM")
        after_stop = our_containers(owner)
        if after_stop:
            failures["containers left after SIGTERM"] += len(after_stop)
        log_problems, statuses = server_log_problems(server.log())
        if args.raw is not None:
            args.raw.mkdir(parents=True, exist_ok=True)
            (args.raw / "server.log").write_text(server.log())
            rows = [dataclasses.asdict(o) | {"t0": load_started} for o in outcomes]
            (args.raw / "outcomes.json").write_text(json.dumps(rows, indent=1))
        if log_problems:
            failures["server log warnings/errors"] += len(log_problems)
            notes += [f"server log: {line[:300]}" for line in log_problems[:10]]
    finally:
        if server is not None:
            server.close()
        fake.send_signal(signal.SIGTERM)
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
        timer.cancel()

    executions = [o for o in outcomes if o.kind == "execution"]
    chats = [o for o in outcomes if o.kind == "chat"]
    last_start = max(o.started for o in outcomes)
    first_end = min(o.ended or load_started + load_seconds for o in outcomes)
    mib = 1 / 2**20
    report = [
        "== streamsvc load test ==",
        "command: "
        + " ".join(
            [".venv/bin/python -m benchmarks.load", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
        f"load: {args.executions} executions + {args.chats} chat streams fired at once"
        f" ({args.chat_words + 4} chunks per chat, one every {args.chunk_interval_ms:.0f} ms"
        f" upstream); all {len(outcomes)} in flight together for {first_end - last_start:.2f} s;"
        f" last answer after {load_seconds:.2f} s",
        *workload_lines("execution", executions, "stdout lines"),
        *workload_lines("chat", chats, "chunks"),
        f"server peak RSS: {sampler.peak * mib:.1f} MiB"
        f" (before the load {rss_before * mib:.1f} MiB,"
        f" after {rss_after * mib:.1f} MiB; {sampler.samples} samples every 50 ms)",
        f"server open files: {fds_before} before the load, peak {sampler.peak_fds},"
        f" {fds_after} after it; client connections still open after the load and the"
        f" checks: {sockets_after} ({close_wait} in CLOSE_WAIT: closed by the client, not"
        " yet by the server)",
        f"server accept queue: peak {sampler.peak_accept_queue} waiting, backlog {backlog};"
        f" listen queue overflows during the load (kernel, every socket here): {overflows}",
        f"server CPU: {cpu_load:.2f} s during the load ({cpu_load / load_seconds:.2f} cores),"
        f" {cpu_total:.2f} s in all; fake upstream {fake_cpu:.2f} s;"
        f" load generator {self_cpu:.2f} s; dockerd+containerd {engine:.2f} s;"
        f" all {facts['nproc']} CPUs {busy:.0%} busy",
        f"containers left: {len(left_at_end)} when the last answer arrived, {len(left)} after"
        f" {left_wait:.1f} s, {len(after_stop)} after SIGTERM",
        "server access log: " + ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())),
        "failures: " + (", ".join(f"{k} x{v}" for k, v in sorted(failures.items())) or "none"),
        *notes,
        *(
            [
                f"warning: {close_wait} connections the clients closed are still open on the"
                " server (held until hypercorn's keep-alive timeout; see docs/load.md)"
            ]
            if close_wait
            else []
        ),
        f"total time: {time.monotonic() - started:.1f} s",
    ]
    print("\n".join(report), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
