"""The dependency cache: one Docker volume per (image, Python version, dependency set).

Bookkeeping, LRU eviction past ``STREAMSVC_DEPS_CACHE_MB`` and single-flight installs under
``host_lock``. The rule: a set in use is never evicted (helpers: ``installer``, ``deps_inventory``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiodocker
import anyio
import msgspec
from aiodocker.volumes import DockerVolume
from anyio.abc import TaskGroup

from streamsvc.connectors.dependencies import Dependency, dependency_key
from streamsvc.errors import (
    DependencyInstallFailed,
    EngineRefused,
    SandboxError,
    SandboxUnavailable,
)
from streamsvc.sandbox.docker.api import (
    CLEANUP_TIMEOUT,
    NOT_FOUND,
    docker_call,
    labels,
)
from streamsvc.sandbox.docker.deps_inventory import (
    LABEL_DEPS,
    LABEL_IMAGE,
    LABEL_PYTHON,
    disk_usage,
    requirements,
)
from streamsvc.sandbox.docker.firewall import BridgeIsolation
from streamsvc.sandbox.docker.host_lock import host_lock
from streamsvc.sandbox.docker.installer import Installer, packages, size_kb
from streamsvc.settings import SandboxSettings

log = logging.getLogger("streamsvc.deps")


class CachedSet(msgspec.Struct):
    volume: str
    requirements: list[str]
    size_kb: int
    last_used: float
    #: Known complete: installed or checked by this process.
    verified: bool = True
    #: Distributions installed (dependencies of dependencies included); 0: not known.
    packages: int = 0


class _Install(msgspec.Struct):
    """One adoption-or-install of a volume in flight; every request for its set waits for it."""

    answered: anyio.Event = msgspec.field(default_factory=anyio.Event)
    result: CachedSet | Exception | None = None
    #: Requests waiting for it: when the last one leaves, the job is cancelled.
    waiters: int = 0
    scope: anyio.CancelScope = msgspec.field(default_factory=anyio.CancelScope)


class DependencyCache:
    def __init__(
        self,
        docker: aiodocker.Docker,
        settings: SandboxSettings,
        owner: str,
        bridge: BridgeIsolation | None = None,
        on_install: Callable[[float], None] | None = None,
    ) -> None:
        """``on_install`` is told each install's duration in seconds, failed ones too
        (the app's metrics)."""
        self._docker = docker
        self._settings = settings
        self._owner = owner
        #: Installs use the bridge: refused while its isolation is not in place.
        self.bridge = bridge or BridgeIsolation(docker, settings.network)
        self._locks: dict[str, anyio.Lock] = {}
        self._installing: dict[str, _Install] = {}
        self._sets: dict[str, CachedSet] = {}
        self._in_use: dict[str, int] = {}
        self._pythons: dict[str, str] = {}
        self._probe_lock = anyio.Lock()
        self._loaded: str | None = None  # the key whose earlier sets were read from the engine
        self._tasks: TaskGroup | None = None
        self.installer = Installer(docker, settings, owner)
        #: The sandbox image the sets are for (``use_image``), once it is known.
        self.image_id: str | None = None
        self.installs = 0
        self._on_install = on_install

    # -- keys ------------------------------------------------------------------------

    async def python_version(self) -> str:
        """The sandbox image's Python version (``3.11.2``), asked once per image."""
        image = self._image()
        async with self._probe_lock:
            if image not in self._pythons:
                self._pythons[image] = await self.installer.python_version()
            return self._pythons[image]

    def volume_name(self, dependencies: tuple[Dependency, ...], python: str) -> str:
        key = f"{self._image()}\n{python}\n{dependency_key(dependencies)}"
        return "streamsvc-deps-" + hashlib.sha256(key.encode()).hexdigest()[:20]

    def name_of(self, dependencies: tuple[Dependency, ...]) -> str:
        """The volume of ``dependencies`` (once ``python_version`` has answered)."""
        return self.volume_name(dependencies, self._pythons[self._image()])

    def _image(self) -> str:
        if self.image_id is None:
            raise SandboxUnavailable("the sandbox image is not known yet")
        return self.image_id

    # -- use -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "sets": len(self._sets),
            "size_kb": sum(entry.size_kb for entry in self._sets.values()),
            "cap_mb": self._settings.deps_cache_mb,
            "installs": self.installs,
            "installing": self.installer.running,
            "install_queued": self.installer.queued,
            "install_slots": self.installer.slots,
        }

    def start(self, tasks: TaskGroup) -> None:
        """Installs and helper removals run in ``tasks`` (in the background) from now on."""
        self._tasks = tasks
        self.installer.start(tasks)

    def use_image(self, image_id: str) -> None:
        """The sandbox image (its id) whose sets are installed and looked up from now on."""
        self.image_id = image_id

    async def lookup(self, dependencies: tuple[Dependency, ...]) -> CachedSet | None:
        """The cached set of ``dependencies`` when there is one (installed by this process or
        left by an earlier one), without checking that its volume is still there."""
        python = await self.python_version()
        await self._load(python)
        return self._sets.get(self.volume_name(dependencies, python))

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
        except EngineRefused as exc:
            if exc.engine_status == NOT_FOUND:
                return False
            raise
        return True

    async def _installed(
        self,
        name: str,
        dependencies: tuple[Dependency, ...],
        python: str,
        created: anyio.Event | None,
    ) -> CachedSet:
        """The set, adopted or installed by the one job in flight for its volume.

        Without one, this request starts it: in the background tasks once
        ``start`` gave them, so every request for the set may wait for it; when
        the last of them goes away, the job (and its install container) is stopped.
        """
        job = self._installing.get(name)
        if job is None:
            job = self._installing[name] = _Install()
            args = (job, name, dependencies, python, created)
            if self._tasks is None:
                await self._adopt_or_install(*args)
            else:
                self._tasks.start_soon(self._adopt_or_install, *args)
        job.waiters += 1
        try:
            # The host lock, then the install.
            with anyio.fail_after(2 * self.installer.answer_wait() + 60):
                await job.answered.wait()
        except TimeoutError as exc:
            raise SandboxUnavailable("the dependency install did not finish in time") from exc
        finally:
            job.waiters -= 1
            if job.waiters == 0 and not job.answered.is_set():
                job.scope.cancel()  # nobody waits for it any more: stop it, its container gone
                with anyio.CancelScope(shield=True), anyio.move_on_after(2 * CLEANUP_TIMEOUT):
                    await job.answered.wait()
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
            with job.scope:
                async with host_lock(name, self.installer.answer_wait()):
                    entry = await self._adopt(name, dependencies) or await self._install(
                        name, dependencies, python, created
                    )
                self._sets[name] = entry
                job.result = entry
        except Exception as exc:  # every waiter raises it
            job.result = exc
        finally:
            if job.result is None:  # cancelled: shutting down, or with its only caller
                job.result = SandboxUnavailable("the dependency install was cancelled")
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
                    requirements(found),
                    max(int((volume.get("UsageData") or {}).get("Size", 0)), 0) // 1024,
                    _timestamp(volume.get("CreatedAt")),
                    verified=False,
                )

    async def _adopt(self, name: str, dependencies: tuple[Dependency, ...]) -> CachedSet | None:
        """Reuse a complete volume that an earlier process installed."""
        if not await self.exists(name):
            return None
        output, code = await self.installer.check(name)
        if code != 0:
            await docker_call(
                "remove a broken cache volume", DockerVolume(self._docker, name).delete()
            )
            return None
        return _entry(name, [d.requirement for d in dependencies], output)

    async def _install(
        self,
        name: str,
        dependencies: tuple[Dependency, ...],
        python: str,
        created: anyio.Event | None = None,
    ) -> CachedSet:
        requirements = [dep.requirement for dep in dependencies]
        await self.bridge.ensure()  # the install step, unlike the run, may need network
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
        started = time.monotonic()

        async def compiled(output: str, code: int) -> None:
            """The install's end, after compiling: its final size, then the cap again."""
            entry = self._sets.get(name)
            if entry is not None and code == 0 and size_kb(output) > 0:
                entry.size_kb = size_kb(output)  # the last line: the size after compiling
            newest = max(self._sets.values(), key=lambda e: e.last_used, default=None)
            await self._evict(keep=newest.volume if newest else name)

        output, code = await self.installer.install(name, requirements, compiled)
        if self._on_install is not None:
            self._on_install(time.monotonic() - started)
        if code != 0:
            with contextlib.suppress(SandboxError):  # still mounted: eviction gets it later
                await docker_call(
                    "remove a failed cache volume", DockerVolume(self._docker, name).delete()
                )
            raise DependencyInstallFailed(
                "installing the dependencies failed",
                details={"requirements": requirements, "output": output[-4000:]},
            )
        self.installs += 1
        log.info("installed %s in %.1fs", requirements, time.monotonic() - started)
        return _entry(name, requirements, output)

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
            gone = isinstance(exc, EngineRefused) and exc.engine_status == NOT_FOUND
            if not gone:  # gone already counts as removed
                log.info("cannot remove %s yet: %s", volume, exc.message)
                return False
        self._sets.pop(volume, None)
        return True


def _timestamp(created: str | None) -> float:
    try:
        return datetime.fromisoformat((created or "").replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _entry(volume: str, requirements: list[str], output: str) -> CachedSet:
    """A set just installed or checked, from its helper's ``SIZE PACKAGES`` line."""
    return CachedSet(volume, requirements, size_kb(output), time.time(), packages=packages(output))
