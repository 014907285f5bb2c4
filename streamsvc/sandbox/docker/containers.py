"""The run containers this process made, tracked from creation until removed.

The rule: every container is removed when its run ends (in the background), retried when the
engine could not; shutdown removes all, and start-up removes dead processes' leftovers.
"""

from __future__ import annotations

import contextlib
import logging

import aiodocker
import anyio
from aiodocker.containers import DockerContainer
from aiodocker.stream import Stream
from anyio.abc import TaskGroup

from streamsvc.sandbox.docker.api import (
    ENGINE_ERRORS,
    LABEL_OWNER,
    LABEL_ROLE,
    container_labels,
    list_managed,
    owner_alive,
    remove_container,
)
from streamsvc.sandbox.docker.deps_cache import DependencyCache

log = logging.getLogger("streamsvc.sandbox")

#: Roles of this process's own run containers (``warm``: made ahead of its request).
RUN_ROLES = frozenset({"run", "warm"})


class Containers:
    """The tracked containers, and the dependency volume each holds in the cache."""

    def __init__(self, docker: aiodocker.Docker, owner: str, deps: DependencyCache) -> None:
        self._docker = docker
        self._owner = owner
        self._deps = deps
        self._tracked: set[DockerContainer] = set()
        self._holds: dict[str, str] = {}  # container id -> the dependency volume it mounts
        self._tasks: TaskGroup | None = None
        #: Some container could not be removed: sweep again before the next run.
        self.unremoved = False

    def start(self, tasks: TaskGroup) -> None:
        """Used containers are removed in ``tasks`` from now on."""
        self._tasks = tasks

    def stop(self) -> None:
        """No more background removals: ``remove_all`` gets what is left."""
        self._tasks = None

    def adopt(self, container: DockerContainer, deps_volume: str | None) -> None:
        """Track a new container (and the dependency volume it mounts) until it is removed."""
        self._tracked.add(container)
        if deps_volume is not None:
            self._holds[container.id] = deps_volume
            self._deps.hold(deps_volume)

    def dispose(self, container: DockerContainer, stream: Stream | None) -> None:
        """Remove a used container in the background: the answer does not wait for it."""

        async def dispose() -> None:
            if stream is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(*ENGINE_ERRORS):
                    await stream.close()
            await self.remove(container)

        if self._tasks is not None:
            self._tasks.start_soon(dispose)
        # else: shutting down; remove_all removes every container still tracked

    async def remove(self, container: DockerContainer) -> None:
        """Remove a container we track (once: a second caller finds it claimed)."""
        if container not in self._tracked:
            return
        self._tracked.discard(container)
        volume = self._holds.pop(container.id, None)
        if volume is not None:
            self._deps.release(volume)
        if not await remove_container(container):
            log.warning("could not remove sandbox %s; will retry", container.id[:12])
            self.unremoved = True

    async def remove_all(self) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for container in list(self._tracked):
                    tg.start_soon(self.remove, container)

    async def remove_leftovers(self) -> int:
        """Remove run containers of dead earlier processes, and ours that a lost engine kept."""
        removed, failed = 0, False
        active = {container.id for container in self._tracked}
        for container in await list_managed(self._docker):
            found = container_labels(container)
            owner = found.get(LABEL_OWNER, "")
            if owner == self._owner:
                stale = found.get(LABEL_ROLE) in RUN_ROLES and container.id not in active
            else:
                stale = not owner_alive(owner)
            if stale:
                gone = await remove_container(container)
                removed += gone
                failed = failed or not gone
        if removed:
            log.info("removed %d leftover sandbox(es)", removed)
        self.unremoved = failed
        return removed
