"""The dependency cache: one Docker volume per (image, Python version, dependency set).

A set is installed once, by its own short-lived install container that has
network access and no secrets (the connector's ``env`` never reaches it), into
a named volume that run containers then mount read-only at ``/opt/deps``. So
dependencies work under ``network_mode: none`` and later runs with the same
set pay nothing (warm sandboxes even have it mounted before the request).

- **Key**: the volume is named by a hash of the sandbox image's id, the
  image's Python version (asked once per image with a one-shot container)
  and the normalised set (sorted PEP 508 requirements); the volume's labels
  say the same in clear (``streamsvc.deps``, ``streamsvc.deps.image``,
  ``streamsvc.deps.python``). A rebuilt image or another Python never sees
  the old sets.
- **Once**: concurrent first requests for one set wait on one lock and
  install once (``installs`` counts installs). The lock holds across the
  processes of this host too (``STREAMSVC_WORKERS``, or several servers): an
  ``flock`` on a file named after the volume, so a second process waits and
  then adopts the first one's volume instead of installing into it or taking
  it for broken. The install runs in the background, as one job per volume
  that holds the host lock until it answers: a request that goes away (its
  client disconnected) leaves it running, and the next request for the set
  waits for it instead of taking its half-written volume for broken. A volume
  found on the engine, left by an earlier process, is adopted after a check
  that its install completed (a marker file written last).
- **Installer**: ``uv`` when the image has it, ``pip`` otherwise; the host's
  CA bundle (setting ``STREAMSVC_SANDBOX_CA_BUNDLE``) is copied in so
  TLS-intercepting proxies work. After ``uv`` the set counts as installed at
  once and its bytecode is compiled afterwards by the same container, while
  the first run goes on (it compiles what it imports in memory meanwhile;
  ``.pyc`` files are written atomically, so a reader sees whole ones or none).
  The container is read to its end in the background: its last line, the
  size with the bytecode, replaces the set's size, and once the container is
  removed the cap is checked again (the volume was in use until then).
- **Size cap**: past ``STREAMSVC_DEPS_CACHE_MB``, least-recently-used sets of
  the current image are removed. Sizes come from the install (``du``) or, for
  sets of earlier processes, from Docker's disk-usage report; last use is
  this process's, or the volume's creation time for sets not used since
  start-up. A set in use (mounted by a run or a warm sandbox) is never
  evicted. A set removed behind the server's back (``streamsvc deps clear``)
  is noticed at its next use and installed again.
- **Listing and clearing**: ``streamsvc deps list [--json]`` and
  ``streamsvc deps clear [--all]`` ask the engine directly, with the same
  settings as the server (``command``). ``clear`` removes the current image's
  sets that no container uses; ``--all`` every image's.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, TextIO

import aiodocker
import anyio
import msgspec
from aiodocker.volumes import DockerVolume
from anyio.abc import TaskGroup

from streamsvc.connectors.dependencies import Dependency, dependency_key
from streamsvc.errors import SandboxError
from streamsvc.sandbox.docker.api import (
    CLEANUP_TIMEOUT,
    NETWORK_NAME,
    SANDBOX_UID,
    connect,
    create_container,
    docker_call,
    ensure_network,
    labels,
    remove_container,
)
from streamsvc.settings import SandboxSettings

log = logging.getLogger("streamsvc.deps")

LABEL_DEPS = "streamsvc.deps"
LABEL_IMAGE = "streamsvc.deps.image"
LABEL_PYTHON = "streamsvc.deps.python"
#: On helper containers: ``install``, ``check`` (adopting a volume) or ``python`` (the probe).
LABEL_ACTION = "streamsvc.deps.action"
COMPLETE_MARKER = ".streamsvc-complete"
_PYTHON_PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
#: ``sh -c`` program of an install container: ``$1`` = bytes of CA bundle on stdin,
#: ``$2`` = the line to print when done, the rest = the requirements (validated PEP 508).
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
echo "$done_line $(du -sk /opt/deps | cut -f1)"
if [ "$compile_later" = 1 ]; then
  python3 -m compileall -q /opt/deps >/dev/null 2>&1 || true
  du -sk /opt/deps | cut -f1
fi
"""


@contextlib.asynccontextmanager
async def host_lock(name: str, wait_seconds: float) -> AsyncIterator[None]:
    """Hold ``name``'s lock among the processes of this host (waits at most ``wait_seconds``).

    An ``flock`` on ``$TMPDIR/streamsvc-locks/NAME.lock``: the kernel drops it
    when its holder exits, so a crashed process never leaves it taken. Not had
    in time: ``SandboxError`` (503 ``sandbox_unavailable``).
    """
    folder = os.path.join(tempfile.gettempdir(), "streamsvc-locks")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(folder, f"{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            with anyio.fail_after(wait_seconds):
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await anyio.sleep(0.1)
        except TimeoutError as exc:
            raise SandboxError(
                f"another process has been installing this dependency set for over "
                f"{wait_seconds:.0f}s; try again later"
            ) from exc
        yield
    finally:
        os.close(fd)  # releases the lock


class CachedSet(msgspec.Struct):
    volume: str
    requirements: list[str]
    size_kb: int
    last_used: float
    #: Known complete: installed or checked by this process.
    verified: bool = True


class _Install(msgspec.Struct):
    """One adoption-or-install of a volume in flight; every request for its set waits for it."""

    answered: anyio.Event = msgspec.field(default_factory=anyio.Event)
    result: CachedSet | Exception | None = None


class DependencyCache:
    def __init__(
        self,
        docker: aiodocker.Docker,
        settings: SandboxSettings,
        owner: str,
    ) -> None:
        self._docker = docker
        self._settings = settings
        self._owner = owner
        self._locks: dict[str, anyio.Lock] = {}
        self._installing: dict[str, _Install] = {}
        self._sets: dict[str, CachedSet] = {}
        self._in_use: dict[str, int] = {}
        self._pythons: dict[str, str] = {}
        self._probe_lock = anyio.Lock()
        self._loaded: str | None = None  # the key whose earlier sets were read from the engine
        self._tasks: TaskGroup | None = None
        self.image_id: str | None = None
        self.installs = 0

    # -- keys ------------------------------------------------------------------------

    async def python_version(self) -> str:
        """The sandbox image's Python version (``3.11.2``), asked once per image."""
        image = self._image()
        async with self._probe_lock:
            if image not in self._pythons:
                output, code = await self._one_shot(
                    None, ["python3", "-c", _PYTHON_PROBE], {}, action="python"
                )
                version = output.strip().splitlines()[-1] if output.strip() else ""
                if code != 0 or not version.replace(".", "").isdigit():
                    raise SandboxError(
                        "the sandbox image has no working python3",
                        code="sandbox_failed",
                        status=500,
                    )
                self._pythons[image] = version
            return self._pythons[image]

    def volume_name(self, dependencies: tuple[Dependency, ...], python: str) -> str:
        key = f"{self._image()}\n{python}\n{dependency_key(dependencies)}"
        return "streamsvc-deps-" + hashlib.sha256(key.encode()).hexdigest()[:20]

    def name_of(self, dependencies: tuple[Dependency, ...]) -> str:
        """The volume of ``dependencies`` (once ``python_version`` has answered)."""
        return self.volume_name(dependencies, self._pythons[self._image()])

    def _image(self) -> str:
        if self.image_id is None:
            raise SandboxError("the sandbox image is not known yet")
        return self.image_id

    # -- use -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "sets": len(self._sets),
            "size_kb": sum(entry.size_kb for entry in self._sets.values()),
            "cap_mb": self._settings.deps_cache_mb,
            "installs": self.installs,
        }

    def start(self, tasks: TaskGroup) -> None:
        """Helper containers are removed in ``tasks`` (in the background) from now on."""
        self._tasks = tasks

    async def known(self, dependencies: tuple[Dependency, ...]) -> str | None:
        """The volume of ``dependencies`` when this process has it installed or checked."""
        name = self.volume_name(dependencies, await self.python_version())
        entry = self._sets.get(name)
        return name if entry is not None and entry.verified else None

    async def ensure(
        self,
        dependencies: tuple[Dependency, ...],
        created: anyio.Event | None = None,
        *,
        mounted: bool = False,
    ) -> str:
        """The volume holding ``dependencies``, installing them first if needed.

        ``created`` is set once a new volume exists and its install begins (so a
        run container may be made meanwhile; it must not import from the volume
        before this returns), when this request starts the install (one that
        waits for an install in flight is not told). ``mounted``: a container
        mounts the volume now, so it exists (Docker removes no volume in use)
        and is not asked about. The caller holds the volume (it is not evicted)
        until ``release``.
        """
        python = await self.python_version()
        await self._load(python)
        name = self.volume_name(dependencies, python)
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:
            entry = self._sets.get(name)
            gone = entry is not None and entry.verified and not mounted
            if gone and not await self.exists(name):
                log.info("dependency set %s was removed; installing it again", name)
                entry = None
            if entry is None or not entry.verified:
                entry = await self._installed(name, dependencies, python, created)
            entry.last_used = time.time()
            self.hold(name)
        try:
            await self._evict(keep=name)
        except BaseException:  # the caller never learns the name, so never releases it
            self.release(name)
            raise
        return name

    def hold(self, volume: str) -> None:
        """Keep ``volume`` from eviction until as many ``release`` calls."""
        self._in_use[volume] = self._in_use.get(volume, 0) + 1

    def release(self, volume: str) -> None:
        self._in_use[volume] -= 1

    async def exists(self, name: str) -> bool:
        """Whether the volume is still there (``streamsvc deps clear`` may remove it)."""
        try:
            await docker_call("inspect a cache volume", DockerVolume(self._docker, name).show())
        except SandboxError as exc:
            if _not_found(exc):
                return False
            raise
        return True

    def _install_wait(self) -> float:
        """How long the host lock is waited for, and then an install's answer."""
        return self._settings.install_timeout_seconds + 60

    async def _installed(
        self,
        name: str,
        dependencies: tuple[Dependency, ...],
        python: str,
        created: anyio.Event | None,
    ) -> CachedSet:
        """The set, adopted or installed by the one job in flight for its volume.

        Without one, this request starts it: in the background tasks once
        ``start`` gave them, so it outlives a caller that goes away.
        """
        job = self._installing.get(name)
        if job is None:
            job = self._installing[name] = _Install()
            args = (job, name, dependencies, python, created)
            if self._tasks is None:
                await self._adopt_or_install(*args)
            else:
                self._tasks.start_soon(self._adopt_or_install, *args)
        try:
            with anyio.fail_after(2 * self._install_wait() + 60):  # the lock, then the install
                await job.answered.wait()
        except TimeoutError as exc:
            raise SandboxError("the dependency install did not finish in time") from exc
        if isinstance(job.result, Exception):
            raise job.result
        assert job.result is not None
        return job.result

    async def _adopt_or_install(
        self,
        job: _Install,
        name: str,
        dependencies: tuple[Dependency, ...],
        python: str,
        created: anyio.Event | None,
    ) -> None:
        try:
            async with host_lock(name, self._install_wait()):
                entry = await self._adopt(name, dependencies) or await self._install(
                    name, dependencies, python, created
                )
            self._sets[name] = entry
            job.result = entry
        except Exception as exc:  # every waiter raises it
            job.result = exc
        finally:
            if job.result is None:  # cancelled: shutting down, or with its only caller
                job.result = SandboxError("the dependency install was cancelled")
            del self._installing[name]
            job.answered.set()

    async def _load(self, python: str) -> None:
        """Once per key: count the sets earlier processes left for this image and Python."""
        key = f"{self._image()}\n{python}"
        if self._loaded == key:
            return
        self._loaded = key
        for volume in await disk_usage(self._docker):
            found = volume.get("Labels") or {}
            if found.get(LABEL_IMAGE) != self.image_id or found.get(LABEL_PYTHON) != python:
                continue
            name = volume["Name"]
            if name not in self._sets:
                self._sets[name] = CachedSet(
                    name,
                    _requirements(found),
                    max(int((volume.get("UsageData") or {}).get("Size", 0)), 0) // 1024,
                    _timestamp(volume.get("CreatedAt")),
                    verified=False,
                )

    async def _adopt(self, name: str, dependencies: tuple[Dependency, ...]) -> CachedSet | None:
        """Reuse a complete volume that an earlier process installed."""
        if not await self.exists(name):
            return None
        check = f"test -f /opt/deps/{COMPLETE_MARKER} && du -sk /opt/deps | cut -f1"
        output, code = await self._one_shot(name, ["sh", "-c", check], {}, action="check")
        if code != 0:
            await docker_call(
                "remove a broken cache volume", DockerVolume(self._docker, name).delete()
            )
            return None
        return CachedSet(name, [d.requirement for d in dependencies], _size(output), time.time())

    async def _install(
        self,
        name: str,
        dependencies: tuple[Dependency, ...],
        python: str,
        created: anyio.Event | None = None,
    ) -> CachedSet:
        requirements = [dep.requirement for dep in dependencies]
        await ensure_network(self._docker)  # the install step, unlike the run, may need network
        volume_labels = {
            **labels(self._owner, "deps"),
            LABEL_DEPS: json.dumps(requirements),
            LABEL_IMAGE: self._image(),
            LABEL_PYTHON: python,
        }
        await docker_call(
            "create a cache volume",
            self._docker.volumes.create({"Name": name, "Labels": volume_labels}),
        )
        if created is not None:
            created.set()
        ca = self._settings.ca_bundle
        ca_bytes = await anyio.Path(ca).read_bytes() if ca else b""
        done = f"streamsvc-install-done-{secrets.token_hex(8)}"
        env = {"HOME": "/tmp", "UV_CACHE_DIR": "/tmp/uv", "UV_PYTHON_DOWNLOADS": "never"}
        command = ["sh", "-c", _INSTALL_SCRIPT, "install", str(len(ca_bytes)), done]
        started = time.monotonic()
        output, code = await self._install_container(
            name, [*command, *requirements], env, ca_bytes or None, done
        )
        if code != 0:
            with contextlib.suppress(SandboxError):  # still mounted: eviction gets it later
                await docker_call(
                    "remove a failed cache volume", DockerVolume(self._docker, name).delete()
                )
            raise SandboxError(
                "installing the dependencies failed",
                code="dependency_install_failed",
                status=400,
                details={"requirements": requirements, "output": output[-4000:]},
            )
        self.installs += 1
        log.info("installed %s in %.1fs", requirements, time.monotonic() - started)
        return CachedSet(name, requirements, _size(output), time.time())

    async def _install_container(
        self, name: str, cmd: list[str], env: dict[str, str], stdin: bytes | None, done: str
    ) -> tuple[str, int]:
        """Run the install container; answer at its ``done`` line, read the rest in the background.

        What follows that line (bytecode compiling, then the final size) no run
        waits for: the set's size is updated and the cap checked once it ends.
        """
        if self._tasks is None:
            return await self._one_shot(
                name, cmd, env, stdin=stdin, done=done, writable=True, action="install"
            )
        answers: list[tuple[str, int] | Exception] = []
        answered = anyio.Event()

        def answer(found: tuple[str, int] | Exception) -> None:
            if not answered.is_set():
                answers.append(found)
                answered.set()

        async def whole() -> None:
            try:
                output, code = await self._one_shot(
                    name, cmd, env, stdin=stdin, done=done, writable=True, action="install",
                    early=answer,
                )  # fmt: skip
                if answered.is_set():  # answered early: this is the end, after the compiling
                    entry = self._sets.get(name)
                    if entry is not None and code == 0 and _size(output) > 0:
                        entry.size_kb = _size(output)
                    newest = max(self._sets.values(), key=lambda e: e.last_used, default=None)
                    await self._evict(keep=newest.volume if newest else name)
            except Exception as exc:
                if answered.is_set():
                    log.warning("after installing %s: %s", name, exc)
                answer(exc)
                return
            answer((output, code))

        self._tasks.start_soon(whole)
        try:
            with anyio.fail_after(self._install_wait()):
                await answered.wait()
        except TimeoutError as exc:
            raise SandboxError("the dependency install did not answer in time") from exc
        found = answers[0]
        if isinstance(found, Exception):
            raise found
        return found

    async def _one_shot(
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
        takes ~50 ms more to report the container stopped. With ``early``, that
        line is handed to ``early`` instead (what follows it, exit code 0) and
        the container is read on to its end (its whole output is returned).
        """
        s = self._settings
        mounts: list[dict[str, Any]] = []
        if volume is not None:
            mounts.append(
                {
                    "Type": "volume",
                    "Source": volume,
                    "Target": "/opt/deps",
                    "ReadOnly": not writable,
                }
            )
        config: dict[str, Any] = {
            "Image": s.image,
            "Cmd": cmd,
            "User": f"{SANDBOX_UID}:{SANDBOX_UID}",
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": {**labels(self._owner, "deps"), LABEL_ACTION: action},
            "AttachStdin": stdin is not None,
            "OpenStdin": stdin is not None,
            "StdinOnce": stdin is not None,
            "AttachStdout": True,
            "AttachStderr": True,
            "HostConfig": {
                "NetworkMode": NETWORK_NAME if writable else "none",
                "Memory": 1024 * 1024 * 1024,
                "PidsLimit": 512,
                "ReadonlyRootfs": True,
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Tmpfs": {"/tmp": "rw,nosuid,nodev,size=1024m"},
                "Mounts": mounts,
                "LogConfig": {"Type": "none", "Config": {}},
                "Init": True,
            },
        }
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
                with anyio.fail_after(s.install_timeout_seconds):
                    while (message := await stream.read_out()) is not None:
                        if len(output) < 256 * 1024:
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

    async def _evict(self, keep: str) -> None:
        cap_kb = self._settings.deps_cache_mb * 1024
        total = sum(entry.size_kb for entry in self._sets.values())
        for entry in sorted(self._sets.values(), key=lambda e: e.last_used):
            if total <= cap_kb:
                break
            if entry.volume == keep or self._in_use.get(entry.volume):
                continue
            if await self.remove(entry.volume):
                log.info("evicted dependency set %s (%s)", entry.volume, entry.requirements)
                total -= entry.size_kb

    async def remove(self, volume: str) -> bool:
        """Remove a set's volume; False when the engine keeps it (in use) or fails (bounded)."""
        try:
            await docker_call(
                "remove a cache volume",
                DockerVolume(self._docker, volume).delete(),
                limit=CLEANUP_TIMEOUT,
            )
        except SandboxError as exc:
            if not _not_found(exc):  # gone already counts as removed
                log.info("cannot remove %s yet: %s", volume, exc.message)
                return False
        self._sets.pop(volume, None)
        return True


# -- the engine's view (``streamsvc deps list|clear``) -----------------------------------


class CacheEntry(msgspec.Struct):
    """One cached set as the engine sees it."""

    volume: str
    requirements: list[str]
    python: str | None
    image: str | None
    #: Built for the image ``STREAMSVC_SANDBOX_IMAGE`` names now.
    current: bool
    size_kb: int | None
    #: Containers (of any state) that mount it; such a set is not removed.
    containers: int | None
    created: str | None


_DF_ATTEMPTS = 20  # about 20 s in all


async def disk_usage(docker: aiodocker.Docker) -> list[dict[str, Any]]:
    """The engine's disk-usage report for every cache volume (labels, size, users).

    The engine computes one report at a time and refuses a second caller ("a
    disk usage operation is already running"), as when workers start together:
    that caller waits a little and asks again.
    """
    for attempt in range(1, _DF_ATTEMPTS + 1):
        try:
            report = await docker_call("report disk usage", docker._query_json("system/df"))
            break
        except SandboxError as exc:
            cause = exc.__cause__
            busy = isinstance(cause, aiodocker.DockerError) and "already running" in str(cause)
            if not busy or attempt == _DF_ATTEMPTS:
                raise
            await anyio.sleep(0.1 * attempt)
    volumes = report.get("Volumes") or []
    return [v for v in volumes if LABEL_DEPS in (v.get("Labels") or {})]


async def entries(docker: aiodocker.Docker, settings: SandboxSettings) -> list[CacheEntry]:
    """Every cached set on the engine, newest first."""
    try:
        image = await docker.images.inspect(settings.image)
        current: str | None = image["Id"]
    except aiodocker.DockerError:
        current = None
    found = []
    for volume in await disk_usage(docker):
        marks = volume.get("Labels") or {}
        usage = volume.get("UsageData") or {}
        size, users = usage.get("Size", -1), usage.get("RefCount", -1)
        found.append(
            CacheEntry(
                volume=volume["Name"],
                requirements=_requirements(marks),
                python=marks.get(LABEL_PYTHON),
                image=marks.get(LABEL_IMAGE),
                current=current is not None and marks.get(LABEL_IMAGE) == current,
                size_kb=size // 1024 if size >= 0 else None,
                containers=users if users >= 0 else None,
                created=volume.get("CreatedAt"),
            )
        )
    return sorted(found, key=lambda entry: entry.created or "", reverse=True)


async def clear(
    docker: aiodocker.Docker, settings: SandboxSettings, every_image: bool = False
) -> tuple[list[str], list[str]]:
    """Remove the cached sets no container uses (of the current image, or all); (removed, kept)."""
    removed, kept = [], []
    for entry in await entries(docker, settings):
        if not (entry.current or every_image):
            continue
        try:
            await docker_call("remove a cache volume", DockerVolume(docker, entry.volume).delete())
            removed.append(entry.volume)
        except SandboxError:
            kept.append(entry.volume)  # in use (409), or gone meanwhile
    return removed, kept


async def command(
    args: argparse.Namespace, settings: SandboxSettings, out: TextIO = sys.stdout
) -> int:
    """``streamsvc deps list|clear``: the cache as the engine holds it."""
    docker = connect(settings.docker_host)
    try:
        if args.deps_command == "clear":
            removed, kept = await clear(docker, settings, every_image=args.all)
            for name in removed:
                print(f"removed {name}", file=out)
            for name in kept:
                print(f"kept {name} (in use)", file=out)
            print(f"{len(removed)} removed, {len(kept)} in use", file=out)
            return 0
        found = await entries(docker, settings)
        if args.json:
            print(msgspec.json.encode(found).decode(), file=out)
            return 0
        print(f"{'VOLUME':36} {'PYTHON':8} {'SIZE':>9} {'USED BY':>7}  REQUIREMENTS", file=out)
        for entry in found:
            size = f"{entry.size_kb / 1024:.1f} MiB" if entry.size_kb is not None else "?"
            stale = "" if entry.current else "  (another image)"
            print(
                f"{entry.volume:36} {entry.python or '?':8} {size:>9} "
                f"{entry.containers if entry.containers is not None else '?':>7}  "
                f"{' '.join(entry.requirements)}{stale}",
                file=out,
            )
        return 0
    finally:
        await docker.close()


def _not_found(exc: SandboxError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, aiodocker.DockerError) and cause.status == 404


def _requirements(marks: dict[str, str]) -> list[str]:
    try:
        found = json.loads(marks.get(LABEL_DEPS, "[]"))
    except ValueError:
        return []
    return [str(item) for item in found] if isinstance(found, list) else []


def _timestamp(created: str | None) -> float:
    try:
        return datetime.fromisoformat((created or "").replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _size(output: str) -> int:
    lines = output.strip().splitlines()
    return int(lines[-1]) if lines and lines[-1].strip().isdigit() else 0
