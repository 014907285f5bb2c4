"""Warm sandboxes: started ahead of a request, their runner waiting on stdin.

The rule: nothing of any request is in them (``PoolKey``); the run is one delivery
(``warm_protocol``), and a sandbox whose preload read a variable the request sets never fits.
"""

from __future__ import annotations

import contextlib
import logging

import aiodocker
import anyio
from aiodocker.containers import DockerContainer
from aiodocker.stream import Stream

from streamsvc.errors import SandboxError, SandboxFailed, SandboxUnavailable
from streamsvc.sandbox.docker import config as sandbox_config
from streamsvc.sandbox.docker.api import (
    ENGINE_ERRORS,
    create_container,
    docker_call,
)
from streamsvc.sandbox.docker.config import PoolKey
from streamsvc.sandbox.docker.containers import Containers
from streamsvc.sandbox.docker.deps_cache import DependencyCache
from streamsvc.sandbox.docker.firewall import BridgeIsolation
from streamsvc.sandbox.docker.warm_protocol import RUNNER, ReadyReport, frame, ready_report
from streamsvc.settings import SandboxSettings

log = logging.getLogger("streamsvc.sandbox")

#: Seconds a new warm sandbox may take to say it is ready.
READY_TIMEOUT = 30.0


class WarmSandbox:
    """A started sandbox whose runner waits on the attach stream for one delivery."""

    def __init__(
        self,
        container: DockerContainer,
        stream: Stream,
        key: PoolKey,
        env_reads: frozenset[str] | None,
    ) -> None:
        self.container = container
        self.stream = stream
        self.key = key
        #: Preloaded: the env variables its imports read (``"*"``: all); else ``None``.
        self.env_reads = env_reads

    def fits(self, env: dict[str, str]) -> bool:
        """Whether a run with ``env`` sees what it would have seen in a cold sandbox.

        An import that listed the whole environment (``"*"``) fits a request with
        no env: it missed only ``STREAMSVC_ENTRY_POINT``, which names a file.
        """
        if self.env_reads is None:
            return True
        changed = {*env, "STREAMSVC_ENTRY_POINT"}
        return not ("*" in self.env_reads and env) and self.env_reads.isdisjoint(changed)


class WarmMaker:
    """Makes and discards warm sandboxes; remembers which dependency sets preload."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        settings: SandboxSettings,
        owner: str,
        deps: DependencyCache,
        containers: Containers,
        bridge: BridgeIsolation,
    ) -> None:
        self._docker = docker
        self._bridge = bridge
        self._settings = settings
        self._owner = owner
        self._deps = deps
        self._containers = containers
        self._set_names: dict[str, list[str]] = {}  # dependency volume -> distribution names
        self._no_preload: set[str] = set()  # dependency volumes whose import is not clean

    def remember(self, volume: str, names: list[str]) -> None:
        """The distribution names of the set in ``volume`` (what a preload imports)."""
        self._set_names[volume] = names

    def stop_preloading(self, volume: str) -> None:
        self._no_preload.add(volume)

    async def make(self, key: PoolKey, preload: bool = True, role: str = "warm") -> WarmSandbox:
        """Create, attach and start a sandbox for ``key``; return once its runner waits.

        With ``preload``, a sandbox with dependencies imports them first (when
        that is clean; a set whose import is not is never preloaded again).
        ``role`` ``run``: made for one cold run, not for the pool.
        """
        volume = key.deps_volume
        names = self._set_names.get(volume) if preload and volume is not None else None
        if volume in self._no_preload:
            names = None
        if volume is not None and not await self._deps.exists(volume):
            # Removed since it was checked (Docker would make an empty one in its place).
            raise SandboxUnavailable("the dependency set was removed meanwhile; try again")
        if key.network == "bridge":
            await self._bridge.ensure()
        config = sandbox_config.warm_config(self._settings, self._owner, key, names, role)
        container = await create_container(self._docker, config)
        self._containers.adopt(container, volume)
        stream = container.attach(stdin=True, stdout=True, stderr=True, logs=False)
        try:
            await docker_call("attach to the sandbox", stream.__aenter__())
            await docker_call("start the sandbox", container.start())
            await docker_call("load the runner", stream.write_in(frame(RUNNER)))
            report = await docker_call("wait for the sandbox", _ready(stream), READY_TIMEOUT)
        except BaseException as exc:
            if names and volume is not None and isinstance(exc, SandboxError):
                self._no_preload.add(volume)  # e.g. importing it passed the memory limit
            with anyio.CancelScope(shield=True), contextlib.suppress(*ENGINE_ERRORS):
                await stream.close()
            await self._containers.remove(container)
            raise
        if report.refused and volume is not None:
            log.info("not preloading %s: %s", self._set_names.get(volume), report.refused)
            self._no_preload.add(volume)
            await self.discard(WarmSandbox(container, stream, key, None))
            return await self.make(key, preload=False, role=role)
        reads = frozenset(report.env) if report.modules else None
        return WarmSandbox(container, stream, key, reads)

    async def discard(self, warm: WarmSandbox) -> None:
        """Destroy a warm sandbox that was never used."""
        with anyio.CancelScope(shield=True), contextlib.suppress(*ENGINE_ERRORS):
            await warm.stream.close()
        await self._containers.remove(warm.container)


async def watch(warm: WarmSandbox) -> None:
    """Return when an idle warm sandbox says anything at all: it has ended, or gone wrong."""
    await warm.stream.read_out()


async def _ready(stream: Stream) -> ReadyReport:
    """Wait for a new warm sandbox's runner to say it is ready; anything else is a failure."""
    message = await stream.read_out()
    data = message.data if message is not None and message.stream == 1 else b""
    report = ready_report(data)
    if report is not None:
        return report
    raise SandboxFailed("a new sandbox did not start its runner")
