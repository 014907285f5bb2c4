"""The Docker engine lost mid-run, and back (issue 4, item 6). SLOW: ~15-25 s.

Stopping the shared engine would break every other test running on this
machine, so this test starts a private ``dockerd`` of its own: its own
``--data-root``, ``--exec-root`` (so its own managed containerd), pidfile,
unix socket, cgroup parent, and its own bridge interface, created here, with
iptables, IP forwarding and masquerading left alone. Never ``--bridge=none``:
a dockerd started with it deletes the host's ``docker0``, which belongs to
the shared engine. The sandbox image is copied in with ``docker save | docker
load``. A dedicated server talks to it through ``DOCKER_HOST``.

Needs root (dockerd, ip); skipped otherwise, with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.harness import (
    IMAGE,
    ServerProcess,
    body,
    docker,
    eventually,
    execute,
    result_line,
    sse_events,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]


class PrivateEngine:
    """A throwaway dockerd that shares nothing with the machine's engine."""

    def __init__(self) -> None:
        tag = os.getpid() % 100_000
        self.root = Path(tempfile.mkdtemp(prefix="streamsvc-engine-", dir="/tmp"))
        self.bridge = f"ssvcp{tag}"
        self.cgroup_parent = f"/streamsvc-test-engine-{tag}"
        self.host = f"unix://{self.root}/docker.sock"
        self.process: subprocess.Popen[bytes] | None = None
        (self.root / "daemon.json").write_text("{}")
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], check=True)
        address = f"10.231.{tag % 200 + 20}.1/24"
        subprocess.run(["ip", "addr", "add", address, "dev", self.bridge], check=True)

    def start(self) -> None:
        command = [
            "dockerd",
            "--config-file", str(self.root / "daemon.json"),
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "dockerd.pid"),
            "--host", self.host,
            "--bridge", self.bridge,
            "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--userland-proxy=false",
            "--cgroup-parent", self.cgroup_parent,
        ]  # fmt: skip
        with (self.root / "dockerd.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.answers():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def answers(self) -> bool:
        env = {**os.environ, "DOCKER_HOST": self.host}
        probe = subprocess.run(["docker", "version"], env=env, capture_output=True, check=False)
        return probe.returncode == 0

    def crash(self) -> None:
        """SIGKILL the engine, as a crash would (its containerd dies with it).

        The dead containerd lingers as a zombie until this machine's init reaps
        it (about 1.5 s here), and a dockerd that finds its pid in the pidfile
        waits for it in vain: once it is dead, its pidfile goes.
        """
        assert self.process is not None
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        containerd = int(pidfile.read_text()) if pidfile.exists() else None
        self.process.kill()
        self.process.wait()
        deadline = time.monotonic() + 10
        while containerd is not None and time.monotonic() < deadline:
            try:
                if psutil.Process(containerd).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def load_image(self) -> None:
        env = {**os.environ, "DOCKER_HOST": self.host}
        with subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE) as save:
            subprocess.run(["docker", "load", "-q"], stdin=save.stdout, env=env, check=True)
        assert save.returncode == 0

    def labelled(self) -> list[str]:
        return docker(
            "ps", "-aq", "--filter", "label=streamsvc.managed=true", host=self.host
        ).split()

    def log(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")[-4000:]

    def destroy(self) -> None:
        """Stop it and remove every trace: shims, mounts, the bridge, cgroups, files."""
        self.stop()
        for process in psutil.process_iter(["cmdline"]):
            if str(self.root) in " ".join(process.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    process.kill()
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(str(self.root))), reverse=True):
            subprocess.run(["umount", "-l", target], check=False)
        subprocess.run(["ip", "link", "del", self.bridge], check=False)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():  # containers' groups first
            top = hierarchy / self.cgroup_parent.lstrip("/")
            for directory, _, _ in sorted(os.walk(top), key=lambda d: -len(d[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[PrivateEngine]:
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("ip"):
        pytest.skip("a private Docker engine needs root, dockerd and ip")
    private = PrivateEngine()
    try:
        private.start()
        private.load_image()
        yield private
    finally:
        private.destroy()


SLEEPER = """
    import time
    print("started", flush=True)
    time.sleep(60)
"""


def health(server: ServerProcess) -> Any:
    response = httpx.get(server.url + "/health", timeout=10)
    assert response.status_code == 200
    return response.json()


async def test_engine_lost_mid_run_ends_the_run_and_the_server_recovers(
    engine: PrivateEngine, start_server: Any, client: httpx.AsyncClient
) -> None:
    server: ServerProcess = start_server(DOCKER_HOST=engine.host)
    assert health(server)["components"]["sandbox"]["state"] == "ready"

    # A run in progress when the engine dies ends with a clear error, promptly.
    events: list[tuple[str, Any]] = []
    async with contextlib.aclosing(sse_events(client, server, body(SLEEPER))) as stream:
        async for name, data in stream:
            events.append((name, data))
            if name == "stdout":
                engine.crash()
                crashed = time.monotonic()
    assert time.monotonic() - crashed < 15
    name, data = events[-1]
    assert name == "error", events
    assert data["error"]["code"] in ("sandbox_unavailable", "sandbox_failed"), data

    # The server stays up and says what is wrong; new runs fail fast with 503.
    assert server.process.poll() is None
    report = health(server)
    assert report["status"] == "degraded"
    assert report["components"]["sandbox"]["state"] == "unavailable"
    for streamed in (False, True):
        started = time.monotonic()
        response = await client.post(
            server.url + "/execute-connector", json={**body("print(1)"), "stream": streamed}
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "sandbox_unavailable"
        assert time.monotonic() - started < 10

    # The engine comes back: so does the service, and the interrupted run's
    # container (the engine's restart stopped it) is removed.
    engine.start()
    await eventually(lambda: health(server)["components"]["sandbox"]["state"] == "ready", limit=30)
    code = 'print(\'{"ok": true, "result": "back"}\')'
    assert result_line(await execute(client, server, body(code))) == "back"
    await eventually(lambda: engine.labelled() == [], limit=10)
    assert server.process.poll() is None
