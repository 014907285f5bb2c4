"""One-shot helper containers of the dependency cache: the install, the check, the probe.

The rule: each is made through ``config.helper_config`` (the one hardening), run to its end or
``done`` line, and removed; only an install has network, none gets a connector's env.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import aiodocker
import anyio
from anyio.abc import TaskGroup

from streamsvc.errors import SandboxFailed, SandboxUnavailable
from streamsvc.sandbox.docker.api import (
    CLEANUP_TIMEOUT,
    create_container,
    docker_call,
    remove_container,
)
from streamsvc.sandbox.docker.config import helper_config
from streamsvc.settings import SandboxSettings

log = logging.getLogger("streamsvc.deps")

COMPLETE_MARKER = ".streamsvc-complete"
#: A helper's output kept at most (the tail of a failed install goes to the client).
OUTPUT_CAP = 256 * 1024
_PYTHON_PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
#: ``sh -c`` program of an install container: ``$1`` = bytes of CA bundle on stdin,
#: ``$2`` = the line to print when done, the rest = the requirements (validated PEP 508).
#: After ``uv`` the set counts as installed at once and its bytecode is compiled
#: afterwards (``.pyc`` files are written atomically); the last line is the size then.
_INSTALL_SCRIPT = f"""
set -eu
ca_bytes=$1; done_line=$2; shift 2
if [ "$ca_bytes" -gt 0 ]; then
  head -c "$ca_bytes" > /tmp/ca.pem
  export SSL_CERT_FILE=/tmp/ca.pem PIP_CERT=/tmp/ca.pem REQUESTS_CA_BUNDLE=/tmp/ca.pem
  export UV_NATIVE_TLS=1
fi
compile_later=0
if command -v uv >/dev/null 2>&1; then
  uv pip install --quiet --no-cache --python python3 --target /opt/deps "$@"
  compile_later=1
else
  python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check \\
    --target /opt/deps "$@"
fi
touch /opt/deps/{COMPLETE_MARKER}
packages=$(find /opt/deps -maxdepth 1 -name '*.dist-info' | wc -l)
echo "$done_line $(du -sk /opt/deps | cut -f1) $packages"
if [ "$compile_later" = 1 ]; then
  python3 -m compileall -q /opt/deps >/dev/null 2>&1 || true
  du -sk /opt/deps | cut -f1
fi
"""
_INSTALL_ENV = {"HOME": "/tmp", "UV_CACHE_DIR": "/tmp/uv", "UV_PYTHON_DOWNLOADS": "never"}

#: Called with a whole install's output and exit code once it ends after answering early.
Finished = Callable[[str, int], Awaitable[None]]


class Installer:
    """Runs the helper containers; removes them in the background once ``start`` gave tasks.

    At most ``max_concurrent_runs`` install containers run at once (the others
    queue for a slot); ``running`` and ``queued`` are what ``/health`` reports.
    """

    def __init__(self, docker: aiodocker.Docker, settings: SandboxSettings, owner: str) -> None:
        self._docker = docker
        self._settings = settings
        self._owner = owner
        self._tasks: TaskGroup | None = None
        self._slots = anyio.CapacityLimiter(settings.max_concurrent_runs)
        self.queued = 0

    @property
    def running(self) -> int:
        return int(self._slots.borrowed_tokens)

    @property
    def slots(self) -> int:
        return int(self._slots.total_tokens)

    def start(self, tasks: TaskGroup) -> None:
        self._tasks = tasks

    def answer_wait(self) -> float:
        """How long the host lock is waited for, and then an install's answer."""
        return self._settings.install_timeout_seconds + 60

    async def python_version(self) -> str:
        """The sandbox image's Python version (``3.11.2``)."""
        output, code = await self.one_shot(
            None, ["python3", "-c", _PYTHON_PROBE], {}, action="python"
        )
        version = output.strip().splitlines()[-1] if output.strip() else ""
        if code != 0 or not version.replace(".", "").isdigit():
            raise SandboxFailed("the sandbox image has no working python3")
        return version

    async def check(self, volume: str) -> tuple[str, int]:
        """Whether ``volume``'s install completed (exit code 0), and then its size (``du``)
        and how many distributions it holds."""
        check = (
            f"test -f /opt/deps/{COMPLETE_MARKER} && echo $(du -sk /opt/deps | cut -f1)"
            " $(find /opt/deps -maxdepth 1 -name '*.dist-info' | wc -l)"
        )
        return await self.one_shot(volume, ["sh", "-c", check], {}, action="check")

    async def install(
        self, volume: str, requirements: list[str], finished: Finished
    ) -> tuple[str, int]:
        """Install into ``volume``; answer at the install's ``done`` line.

        What follows that line (bytecode compiling, then the final size) no run
        waits for: the container is read to its end in the background and
        ``finished`` is called with its whole output.
        """
        ca = self._settings.ca_bundle
        ca_bytes = await anyio.Path(ca).read_bytes() if ca else b""
        done = f"streamsvc-install-done-{secrets.token_hex(8)}"
        command = ["sh", "-c", _INSTALL_SCRIPT, "install", str(len(ca_bytes)), done]
        cmd, stdin = [*command, *requirements], ca_bytes or None
        if self._tasks is None:
            async with self._slot():
                return await self.one_shot(
                    volume, cmd, _INSTALL_ENV, stdin=stdin, done=done, writable=True,
                    action="install",
                )  # fmt: skip
        answers: list[tuple[str, int] | Exception] = []
        answered = anyio.Event()
        scope = anyio.CancelScope()  # cancelled when the caller leaves before the answer
        ended = anyio.Event()

        def answer(found: tuple[str, int] | Exception) -> None:
            if not answered.is_set():
                answers.append(found)
                answered.set()

        async def whole() -> None:
            try:
                with scope:
                    await attempt()
            finally:
                ended.set()

        async def attempt() -> None:
            try:
                async with self._slot():
                    output, code = await self.one_shot(
                        volume, cmd, _INSTALL_ENV, stdin=stdin, done=done, writable=True,
                        action="install", early=answer,
                    )  # fmt: skip
                if answered.is_set():  # answered early: this is the end, after the compiling
                    await finished(output, code)
            except Exception as exc:
                if answered.is_set():
                    log.warning("after installing %s: %s", volume, exc)
                answer(exc)
                return
            answer((output, code))

        self._tasks.start_soon(whole)
        try:
            with anyio.fail_after(self.answer_wait()):
                await answered.wait()
        except TimeoutError as exc:
            scope.cancel()
            raise SandboxUnavailable("the dependency install did not answer in time") from exc
        except BaseException:
            if not answered.is_set():
                scope.cancel()  # nobody waits for this install any more: stop it
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
                    await ended.wait()  # its container removed: the volume is free again
            raise
        found = answers[0]
        if isinstance(found, Exception):
            raise found
        return found

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the install slots, waited for at most ``answer_wait`` seconds."""
        self.queued += 1
        try:
            with anyio.fail_after(self.answer_wait()):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise SandboxUnavailable("no dependency install slot came free in time") from exc
        finally:
            self.queued -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def one_shot(
        self,
        volume: str | None,
        cmd: list[str],
        env: dict[str, str],
        *,
        action: str,
        stdin: bytes | None = None,
        done: str | None = None,
        writable: bool = False,
        early: Callable[[tuple[str, int]], None] | None = None,
    ) -> tuple[str, int]:
        """Run a helper container (over ``volume``); its output (capped) and exit code.

        ``stdin`` is written to its standard input. When ``done`` is given, a
        stdout line starting with it ends the wait at once (exit code 0): Docker
        takes longer to report the container stopped. With ``early``, that
        line is handed to ``early`` instead (what follows it, exit code 0) and
        the container is read on to its end (its whole output is returned).
        """
        config = helper_config(
            self._settings,
            self._owner,
            action=action,
            cmd=cmd,
            env=env,
            volume=volume,
            writable=writable,
            stdin=stdin is not None,
        )
        container = await create_container(self._docker, config)
        finished = False
        try:
            output = bytearray()
            marker = done.encode() if done else None
            stream = container.attach(stdin=stdin is not None, stdout=True, stderr=True)
            async with stream:
                await docker_call("start a helper container", container.start())
                if stdin is not None:
                    await docker_call("write to a helper container", stream.write_in(stdin))
                with anyio.fail_after(self._settings.install_timeout_seconds):
                    while (message := await stream.read_out()) is not None:
                        if len(output) < OUTPUT_CAP:
                            output += message.data
                        if marker is not None and message.stream == 1 and marker in output:
                            if early is None:
                                finished = True
                                break
                            after = output.decode(errors="replace").split(done or "", 1)[1]
                            if "\n" in after:  # the size too
                                early((after, 0))
                                marker = None
            text = output.decode(errors="replace")
            if finished:
                return text.split(done or "", 1)[1], 0
            result = await docker_call("wait for a helper container", container.wait())
            return text, int(result.get("StatusCode", 1))
        except TimeoutError:
            return "the install took longer than STREAMSVC_INSTALL_TIMEOUT_SECONDS", 124
        finally:
            if finished and self._tasks is not None:
                self._tasks.start_soon(remove_container, container)
            else:
                await remove_container(container)


def size_kb(output: str) -> int:
    """The size (KiB) on a helper's last line: ``SIZE`` or ``SIZE PACKAGES``."""
    lines = output.strip().splitlines()
    first = lines[-1].split()[0] if lines and lines[-1].split() else ""
    return int(first) if first.isdigit() else 0


def packages(output: str) -> int:
    """The distribution count on an install's (or check's) ``SIZE PACKAGES`` line."""
    for line in output.strip().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            return int(parts[1])
    return 0
