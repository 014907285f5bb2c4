"""Test harness: the real server in its own process, and a real SSE client.

``ServerProcess`` starts ``python -m streamsvc`` on a free loopback port with
an explicit environment (in an empty working directory, so no developer
``.env`` leaks in) and waits for /health. ``read_sse`` reads a streamed
response off the socket with httpx and records when each event arrived.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


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
        base |= {"STREAMSVC_PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        base |= env or {}
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamsvc", *(args or [])],
            cwd=self._workdir.name,
            env=base,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

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
        block: list[str] = []
        async for line in response.aiter_lines():
            if line:
                block.append(line)
                continue
            if not block:
                continue
            fields, comments = parse_sse_lines(block)
            block = []
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
