"""The tests' one kit: the real server process, an SSE client, in-process apps and helpers.

Real-process tests use ``ServerProcess`` (``python -m streamsvc`` in an empty
directory, explicit environment); pure HTTP tests use ``asgi_client`` (the app
in-process over httpx's ASGI transport). No test module imports another.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import psutil
import redis

from streamsvc.settings import load_settings
from streamsvc.web.app import create_app
from streamsvc.web.openapi import openapi_document
from tests.fake_azure import FakeAzure

ROOT = Path(__file__).resolve().parent.parent
#: A directory when scripts/attack runs: every server's /health is polled (tests/health_watch.py).
HEALTH_WATCH = os.environ.get("STREAMSVC_TEST_HEALTH_WATCH", "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    def __init__(
        self,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        *,
        port: int | None = None,  # where to wait for it, when ``args`` pick the port
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._workdir = tempfile.TemporaryDirectory(prefix="streamsvc-test-")
        self.log_path = Path(self._workdir.name) / "server.log"
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AZURE_", "OPENAI_", "STREAMSVC_"))
        }
        # Each server its own run store (in its own directory) unless the test names one, and
        # no .env of the checkout's: a test server has only the settings its test gives it.
        base |= {
            "STREAMSVC_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            "XDG_STATE_HOME": self._workdir.name,
            "STREAMSVC_ENV_FILE": "none",
        }
        base |= env or {}
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamsvc", *(args or [])],
            cwd=self._workdir.name,
            env=base,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._watch: subprocess.Popen[bytes] | None = None
        self._wait_ready()
        if HEALTH_WATCH:  # scripts/attack: /health polled from outside while this server runs
            out = Path(HEALTH_WATCH, f"{self.port}-{self.process.pid}.txt")
            self._watch = subprocess.Popen(
                [sys.executable, "-m", "tests.health_watch", self.url, str(out)], cwd=ROOT
            )

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log()
                self.close()
                raise RuntimeError(f"server exited {self.process.returncode}:\n{log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        log = self.log()
        self.close()
        raise RuntimeError(f"server did not start:\n{log}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self._watch is not None:  # before the shutdown, which /health may well feel
            self._watch.terminate()
            self._watch.wait(10)
            self._watch = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        self._workdir.cleanup()


@dataclass
class SSEEvent:
    event: str
    data: Any
    id: str | None
    at: float  # time.monotonic() when the event was complete


@dataclass
class SSEResponse:
    status: int
    headers: httpx.Headers
    events: list[SSEEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    body: Any = None

    def named(self, name: str) -> list[SSEEvent]:
        return [e for e in self.events if e.event == name]

    @property
    def last(self) -> SSEEvent:
        return self.events[-1]


def parse_sse_lines(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    fields: dict[str, str] = {}
    comments: list[str] = []
    for line in lines:
        if line.startswith(":"):
            comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = fields[name] + "\n" + value if name in fields and name == "data" else value
    return fields, comments


async def sse_blocks(response: httpx.Response) -> AsyncIterator[tuple[dict[str, str], list[str]]]:
    """Each event block of an SSE answer as it arrives: its fields and its comments."""
    block: list[str] = []
    async for line in response.aiter_lines():
        if line:
            block.append(line)
        elif block:
            yield parse_sse_lines(block)
            block = []


async def read_sse(
    client: httpx.AsyncClient,
    url: str,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> SSEResponse:
    """POST ``body`` and read the SSE answer event by event (JSON answers too)."""
    request_headers = {"accept": "text/event-stream", **(headers or {})}
    async with client.stream("POST", url, json=body, headers=request_headers) as response:
        result = SSEResponse(response.status_code, response.headers)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            result.body = json.loads(await response.aread())
            return result
        async for fields, comments in sse_blocks(response):
            result.comments += comments
            if "data" in fields or "event" in fields:
                data = fields.get("data", "")
                result.events.append(
                    SSEEvent(
                        fields.get("event", "message"),
                        json.loads(data) if data else None,
                        fields.get("id"),
                        time.monotonic(),
                    )
                )
                if stop_after is not None and len(result.events) >= stop_after:
                    return result
        return result


#: The original contract's example request; the playground and the CLI serve this file.
SEED_EXAMPLE = ROOT / "streamsvc" / "web" / "static" / "seed-example.json"


def seed_request() -> dict[str, Any]:
    """A fresh copy of the seed's example request body."""
    body: dict[str, Any] = json.loads(SEED_EXAMPLE.read_text())
    return body


AZURE_KEY = "azure-test-key-0123456789"
#: The test servers' grace for runs whose last reader left (seconds).
RUN_GRACE = "1"


def server_env(fake: FakeAzure, **extra: str) -> dict[str, str]:
    """The environment of a server pointed at the fake upstream ``fake``."""
    return {
        "AZURE_OPENAI_API_KEY": AZURE_KEY,
        "AZURE_OPENAI_ENDPOINT": fake.url,
        "AZURE_OPENAI_DEPLOYMENT": "gpt-4o",
        "STREAMSVC_FIRST_TOKEN_TIMEOUT_SECONDS": "3",
        "STREAMSVC_IDLE_TIMEOUT_SECONDS": "2",
        "STREAMSVC_RETRY_MAX_WAIT_SECONDS": "3",
        "STREAMSVC_KEEPALIVE_SECONDS": "0.5",
        "STREAMSVC_SHUTDOWN_GRACE_SECONDS": "4",
        # The pool is on by default (2); tests that count every container of their server
        # need it off, and tests/test_warm_pool.py turns it on (as does a server's default).
        "STREAMSVC_WARM_POOL_SIZE": "0",
        # A run outlives a dropped connection this long, waiting for a reader to come back.
        "STREAMSVC_RUN_GRACE_CONNECTOR_SECONDS": RUN_GRACE,
        "STREAMSVC_RUN_GRACE_CHAT_SECONDS": RUN_GRACE,
        **({"STREAMSVC_RUN_STORE": TEST_RUN_STORE} if TEST_RUN_STORE else {}),
        **extra,
    }


#: Where an in-process app looks for a Docker engine: nowhere, so it never starts containers.
NO_DOCKER = "unix:///nonexistent/docker.sock"
#: The tests' Redis and second Docker engine (scripts/_lib.sh: ensure_redis, ensure_second_engine).
REDIS_URL = os.environ.get("STREAMSVC_TEST_REDIS_URL") or "redis://127.0.0.1:6390/0"
ENGINE2 = os.environ.get("STREAMSVC_TEST_DOCKER_HOST_2") or "unix:///run/streamsvc-docker2.sock"
#: The store of the test servers (e.g. redis://127.0.0.1:6390/0?prefix=t:); unset: the default.
TEST_RUN_STORE = os.environ.get("STREAMSVC_TEST_RUN_STORE")


@contextlib.asynccontextmanager
async def asgi_client(env: Mapping[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in-process (lifespan run), with settings from ``env`` and no Docker engine."""
    app = create_app(
        load_settings({"DOCKER_HOST": NO_DOCKER, "STREAMSVC_RUN_STORE": "memory://", **env}, None)
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client,
    ):
        yield client


# -- the OpenAPI document as a checker of real answers ------------------------------------

#: The content type every POST must carry (anything else is 415).
JSON_TYPE = {"content-type": "application/json"}

DOC = openapi_document()
SCHEMAS = DOC["components"]["schemas"]


def inline(schema: Any) -> Any:
    """``schema`` with every ``#/components/schemas/X`` reference replaced by X itself."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = inline(SCHEMAS[schema["$ref"].rsplit("/", 1)[1]])
            rest = {k: inline(v) for k, v in schema.items() if k != "$ref"}
            return {**target, **rest} if rest else target
        return {key: inline(value) for key, value in schema.items()}
    if isinstance(schema, list):
        return [inline(item) for item in schema]
    return schema


def validate(instance: Any, schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(inline(schema)).validate(instance)


def check_answer(path: str, method: str, response: httpx.Response) -> None:
    """The status, content type and body are ones the document gives for this operation."""
    responses = DOC["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status != "500", response.text
    assert status in responses, f"{method} {path}: undocumented {status}: {response.text[:300]}"
    media = response.headers.get("content-type", "").split(";")[0]
    content = responses[status]["content"]
    assert media in content, f"{method} {path} {status}: undocumented {media}"
    schema = content[media]["schema"]
    if media == "application/json":
        validate(response.json(), schema)
    elif media == "text/event-stream":
        check_stream(response.text, schema)


def check_stream(text: str, frame_schema: dict[str, Any]) -> None:
    blocks = [block.split("\n") for block in text.replace("\r\n", "\n").split("\n\n")]
    frames: list[dict[str, Any]] = []
    for lines in blocks:
        fields, _ = parse_sse_lines([line for line in lines if line])
        if "data" in fields:
            data = fields["data"]
            frames.append({"event": fields.get("event", "message"), "id": fields.get("id"),
                           "data": data if data == "[DONE]" else json.loads(data)})  # fmt: skip
    assert frames, text
    for frame in frames:
        validate(frame, frame_schema)
    if all(f["id"] is None and f["event"] == "message" for f in frames):
        # OpenAI's format (/v1): data only, ending with [DONE] or with an error object
        payloads = [f["data"] for f in frames]
        assert payloads[-1] == "[DONE]" or "error" in payloads[-1], text
        assert all(d != "[DONE]" and "error" not in d for d in payloads[:-1]), text
        return
    assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
    assert frames[-1]["event"] in {"done", "error"}
    assert all(f["event"] not in {"done", "error"} for f in frames[:-1])


# -- the Docker sandbox: request bodies, the engine's view, waiting -------------------------
#
# The engine is asked through the ``docker`` CLI (the tests' own view, independent of the
# code under test). Containers are found by the owner label a server puts on everything
# it creates (``host:pid`` of the server process).

IMAGE = os.environ.get("STREAMSVC_SANDBOX_IMAGE", "streamsvc-sandbox:latest")


#: Forks children that sleep until a fork is refused, then reports how many it made and why.
FORK_UNTIL_REFUSED = """
        import json, os, time
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError as exc:
            failure = type(exc).__name__
        print(json.dumps({"ok": True, "result": {"children": children, "failure": failure}}))
"""


def connector(
    code: str,
    *,
    timeout_ms: int = 20_000,
    memory_mb: int = 128,
    dependencies: Any = None,
    configuration: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    runtime: dict[str, Any] = {
        "language": "python",
        "entryPoint": "main.py",
        "timeoutMs": timeout_ms,
        "memoryMb": memory_mb,
    }
    if dependencies is not None:
        runtime["dependencies"] = dependencies
    return {
        "runtime": runtime,
        "configuration": configuration or {},
        "files": {"main.py": textwrap.dedent(code), **(files or {})},
    }


def body(code: str, *, network: str = "none", env: dict[str, str] | None = None, **kw: Any) -> Any:
    return {"connector": connector(code, **kw), "env": env or {}, "network_mode": network}


async def execute(client: httpx.AsyncClient, server: ServerProcess, payload: Any) -> Any:
    """The unstreamed answer (asserting a 200)."""
    response = await client.post(server.url + "/execute-connector", json=payload)
    assert response.status_code == 200, response.text
    return response.json()


async def stream(client: httpx.AsyncClient, server: ServerProcess, payload: Any) -> SSEResponse:
    """The streamed answer, every event; it must end with ``done``."""
    answer = await read_sse(client, server.url + "/execute-connector", payload)
    assert answer.status == 200, answer.body
    assert answer.events[-1].event == "done", [e.event for e in answer.events]
    return answer


async def sse_events(
    client: httpx.AsyncClient, server: ServerProcess, payload: Any
) -> AsyncGenerator[tuple[str, Any], None]:
    """``(event, data)`` pairs as they arrive; closing the generator hangs up."""
    headers = {"accept": "text/event-stream"}
    url = server.url + "/execute-connector"
    async with client.stream("POST", url, json=payload, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for fields, _ in sse_blocks(response):
            if "event" in fields:
                yield fields["event"], json.loads(fields.get("data") or "null")


def owner(server: ServerProcess) -> str:
    return f"{socket.gethostname()}:{server.process.pid}"


def docker(*args: str, host: str | None = None, check: bool = True) -> str:
    env = dict(os.environ)
    if host:
        env["DOCKER_HOST"] = host
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr}")
    return result.stdout


def sandboxes(server: ServerProcess, host: str | None = None) -> list[str]:
    """Ids of every container (any state) the server labelled as its own."""
    out = docker(
        "ps", "-aq", "--no-trunc", "--filter", f"label=streamsvc.owner={owner(server)}", host=host
    )
    return out.split()


def inspect(container: str, host: str | None = None) -> Any:
    return json.loads(docker("inspect", container, host=host))[0]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout} s: {predicate}")
        time.sleep(interval)
    return time.monotonic() - started


async def eventually(predicate: Callable[[], bool], limit: float) -> float:
    """``wait_until`` for async tests: the predicate runs in a thread, the loop keeps going."""
    started = time.monotonic()
    while not await anyio.to_thread.run_sync(predicate):
        if time.monotonic() - started > limit:
            raise AssertionError(f"not true after {limit} s: {predicate}")
        await anyio.sleep(0.05)
    return time.monotonic() - started


def assert_no_sandboxes(server: ServerProcess, timeout: float = 10.0) -> None:
    """Every container of this server is gone (removal follows the answer closely)."""
    wait_until(lambda: not sandboxes(server), timeout)


def assert_healthy(server: ServerProcess) -> None:
    assert server.process.poll() is None, server.log()
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["components"]["sandbox"]["state"] == "ready", health


def result_line(answer: Any) -> Any:
    """The program's own result object (runs print ``{"ok": true, "result": ...}``)."""
    assert answer["ok"] is True, answer
    return answer["result"]


HARDENING_REPORT = """
    import json, os, resource, socket, time

    def read(path):
        try:
            return open(path).read().strip()
        except OSError:
            return None

    status = dict(line.split(":", 1) for line in read("/proc/self/status").splitlines())
    mounts = {}
    for line in read("/proc/mounts").splitlines():
        device, target, fstype, options = line.split()[:4]
        mounts[target] = {"type": fstype, "options": options.split(",")}
    sizes = {}
    for place in ("/work", "/tmp", "/dev/shm"):
        stat = os.statvfs(place)
        sizes[place] = stat.f_blocks * stat.f_frsize
    cpu = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    report = {
        "hostname": socket.gethostname(),
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "caps": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": status["NoNewPrivs"].strip(),
        "seccomp": status["Seccomp"].strip(),
        "mounts": mounts,
        "sizes": sizes,
        "pids_max": read("/sys/fs/cgroup/pids/pids.max") or read("/sys/fs/cgroup/pids.max"),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
        "cpu": cpu if cpu[0] else read("/sys/fs/cgroup/cpu.max"),
        "sockets": [p for p in ("/var/run/docker.sock", "/run/docker.sock", "/docker.sock")
                    if os.path.exists(p)],
    }
    print(json.dumps(report), flush=True)
    time.sleep(30)  # the test reads the engine's record, then hangs up
"""


class ExecutorProcess:
    """A real ``python -m streamsvc executor`` (issue 16), ready once it logged so."""

    def __init__(self, env: dict[str, str], *, wait: bool = True) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="streamsvc-executor-")
        self.log_path = Path(self._workdir.name) / "executor.log"
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AZURE_", "OPENAI_", "STREAMSVC_", "DOCKER_HOST"))
        }
        base |= {
            "PYTHONUNBUFFERED": "1",
            "XDG_STATE_HOME": self._workdir.name,
            "STREAMSVC_ENV_FILE": "none",
            "STREAMSVC_WARM_POOL_SIZE": "0",
            "STREAMSVC_SHUTDOWN_GRACE_SECONDS": "20",
        }
        base |= env
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamsvc", "executor"],
            cwd=self._workdir.name,
            env=base,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.name = f"{socket.gethostname()}:{self.process.pid}"
        if wait:
            self.wait_for("ready:")

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"executor exited {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"executor: no {text!r} in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._workdir.cleanup()
        return self.process.returncode


class PrivateRedis:
    """A redis-server of one test's own in ``directory`` (AOF, fsync on every write, a free
    loopback port), to SIGKILL and start again on the same data and port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(self._answers, 10)

    def _answers(self) -> bool:
        try:
            with redis.Redis.from_url(self.url, socket_timeout=1) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class ForwardingProxy:
    """Forwards each connection accepted on ``listener`` to a new one from ``connect``, byte
    for byte (a thread per direction); ``drop`` cuts the open ones both ways at once (a proxy
    that went away), ``close`` stops listening too."""

    url = ""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self.listener = listener
        self.connect = connect
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def tcp(cls, target_port: int) -> ForwardingProxy:
        """A loopback TCP proxy in front of ``target_port`` (its ``url``: http://...)."""

        def connect() -> socket.socket:
            upstream = socket.create_connection(("127.0.0.1", target_port), timeout=30)
            upstream.settimeout(None)
            return upstream

        proxy = cls(socket.create_server(("127.0.0.1", 0)), connect)
        proxy.url = f"http://127.0.0.1:{proxy.listener.getsockname()[1]}"
        return proxy

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = self.connect()
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def drop(self) -> int:
        """Close every open connection; how many were open."""
        with self.lock:
            cut, self.sockets = self.sockets, []
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pipes blocked on it, sends FIN
            sock.close()
        return len(cut) // 2

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.drop()


class EngineProxy:
    """The local Docker engine behind a unix socket of the test's: ``stop`` takes it away
    from whoever uses that socket (its connections cut), ``start`` brings it back."""

    def __init__(self, path: Path, target: str = "/var/run/docker.sock") -> None:
        self.path = path
        self.url = f"unix://{path}"
        self.target = target
        self._proxy: ForwardingProxy | None = None

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(64)

        def connect() -> socket.socket:
            engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            engine.connect(self.target)
            return engine

        self._proxy = ForwardingProxy(listener, connect)

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
        self.path.unlink(missing_ok=True)


# -- the command line, cache images, the warm pool and run events, for several modules

_SCRIPT = Path(sys.executable).with_name("streamsvc")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "streamsvc"]


def cli_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC_")}
    return {**base, "PYTHONUNBUFFERED": "1", "STREAMSVC_ENV_FILE": "none", **extra}


def streamsvc(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def connector_file(tmp_path: Path, source: str, **runtime: Any) -> Path:
    connector = {
        "runtime": {"language": "python", "entryPoint": "main.py", **runtime},
        "files": {"main.py": source},
    }
    path = tmp_path / "connector.json"
    path.write_text(json.dumps(connector))
    return path


def image_id(image: str = IMAGE) -> str:
    found: str = json.loads(docker("image", "inspect", image))[0]["Id"]
    return found


def volume_labels(name: str) -> dict[str, str]:
    found: dict[str, str] = json.loads(docker("volume", "inspect", name))[0]["Labels"] or {}
    return found


def pool(server: ServerProcess) -> dict[str, Any]:
    health = httpx.get(server.url + "/health", timeout=10).json()
    found: dict[str, Any] = health["components"]["sandbox"]["warm"]
    return found


def pool_full(server: ServerProcess, timeout: float = 30.0) -> None:
    """Wait until no fill is in flight and every key kept has all its sandboxes."""

    def full() -> bool:
        found = pool(server)
        return bool(found["filling"] == 0 and found["ready"] >= found["size"] * found["keys"])

    wait_until(full, timeout)


async def run_events(
    client: httpx.AsyncClient, url: str, last_event_id: str | None
) -> list[SSEEvent]:
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    events: list[SSEEvent] = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for fields, _ in sse_blocks(response):
            if "event" in fields:
                data = json.loads(fields.get("data") or "null")
                events.append(SSEEvent(fields["event"], data, fields.get("id"), time.monotonic()))
    return events
