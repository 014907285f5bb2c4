"""Warm sandboxes: started ahead of time, used for one run each, refilled in the background.

A generic LRU pool of ready sandboxes per key; it knows nothing of containers (its owner gives
``fill``, ``discard`` and ``watch``). The rule: a sandbox is never handed out twice, nor dead.
Design notes: docs/architecture.md ("The warm pool", "Module notes").
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

log = logging.getLogger("streamsvc.warm")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

FILL_CONCURRENCY = 2
MAX_BACKOFF = 30.0


class _Idle(Generic[T]):
    """A ready sandbox and the task watching it."""

    def __init__(self, sandbox: T) -> None:
        self.sandbox = sandbox
        self.watcher = anyio.CancelScope()
        self.watched = anyio.Event()
        self.bad = False


class _Slot(Generic[T]):
    """One key's ready sandboxes and fills in flight."""

    def __init__(self) -> None:
        self.ready: deque[_Idle[T]] = deque()
        self.filling = 0
        self.failures = 0
        self.dropped = False


class WarmPool(Generic[K, T]):
    def __init__(
        self,
        size: int,
        max_keys: int,
        *,
        fill: Callable[[K], Awaitable[T]],
        discard: Callable[[T], Coroutine[Any, Any, None]],
        watch: Callable[[T], Awaitable[None]],
    ) -> None:
        self.size = size
        self.max_keys = max_keys
        self._fill = fill
        self._discard = discard
        self._watch = watch
        self._slots: OrderedDict[K, _Slot[T]] = OrderedDict()
        self._limiter = anyio.CapacityLimiter(FILL_CONCURRENCY)
        self._tasks: TaskGroup | None = None
        self.closed = False
        #: Runs served by a ready sandbox, and runs that found none.
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0 and not self.closed

    def start(self, tasks: TaskGroup) -> None:
        """Fills, watchers and discards run in ``tasks`` from now on."""
        self._tasks = tasks

    async def take(self, key: K, refill: bool = True) -> T | None:
        """A ready sandbox for ``key``, or ``None``; ``key`` is refilled now, or at ``touch``."""
        if not self.enabled or self._tasks is None:
            return None
        slot = self._use(key)
        found: T | None = None
        while slot.ready and found is None:
            idle = slot.ready.popleft()
            idle.watcher.cancel()
            await idle.watched.wait()  # its watcher no longer reads the sandbox
            if idle.bad:
                self._tasks.start_soon(self._discard, idle.sandbox)
            else:
                found = idle.sandbox
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        if refill:
            self._refill(key, slot)
        return found

    def ready(self, key: K) -> int:
        """How many sandboxes are ready for ``key`` now."""
        slot = self._slots.get(key)
        return len(slot.ready) if slot is not None else 0

    def touch(self, key: K) -> None:
        """Like ``take`` without taking: ``key`` is the most recently used, and refilled."""
        if self.enabled and self._tasks is not None:
            self._refill(key, self._use(key))

    def stats(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "keys": len(self._slots),
            "ready": sum(len(slot.ready) for slot in self._slots.values()),
            "filling": sum(slot.filling for slot in self._slots.values()),
            "hits": self.hits,
            "misses": self.misses,
        }

    async def close(self) -> None:
        """Stop filling and destroy every idle sandbox (fills in flight discard theirs)."""
        self.closed = True
        slots, self._slots = list(self._slots.values()), OrderedDict()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for slot in slots:
                    self._drop(slot, tg)

    # -- internals -------------------------------------------------------------------

    def _use(self, key: K) -> _Slot[T]:
        """The slot of ``key``, now the most recently used; drops the LRU keys past the bound."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        self._slots.move_to_end(key)
        while len(self._slots) > self.max_keys:
            _, oldest = self._slots.popitem(last=False)
            assert self._tasks is not None
            self._drop(oldest, self._tasks)
        return slot

    def _drop(self, slot: _Slot[T], tg: TaskGroup) -> None:
        slot.dropped = True
        while slot.ready:
            idle = slot.ready.popleft()
            idle.watcher.cancel()
            tg.start_soon(self._discard, idle.sandbox)

    def _refill(self, key: K, slot: _Slot[T]) -> None:
        assert self._tasks is not None
        while not slot.dropped and len(slot.ready) + slot.filling < self.size:
            slot.filling += 1
            self._tasks.start_soon(self._fill_one, key, slot)

    async def _fill_one(self, key: K, slot: _Slot[T]) -> None:
        try:
            if slot.failures:
                await anyio.sleep(min(MAX_BACKOFF, 0.25 * 2**slot.failures))
            async with self._limiter:
                if slot.dropped or self.closed:
                    return
                sandbox = await self._fill(key)
        except Exception as exc:  # logged; the next take() tries again, after the backoff
            if not self.closed:  # at shutdown, fills fail as their containers go
                slot.failures += 1
                log.warning("could not prepare a warm sandbox: %s", exc)
            return
        finally:
            slot.filling -= 1
        slot.failures = 0
        if slot.dropped or self.closed or self._tasks is None:
            with anyio.CancelScope(shield=True):
                await self._discard(sandbox)
            return
        idle = _Idle(sandbox)
        slot.ready.append(idle)
        self._tasks.start_soon(self._watch_idle, key, slot, idle)

    async def _watch_idle(self, key: K, slot: _Slot[T], idle: _Idle[T]) -> None:
        """Drop ``idle`` when it goes bad before anyone takes it."""
        try:
            with idle.watcher:
                try:
                    await self._watch(idle.sandbox)
                except Exception:  # a broken stream is a bad sandbox too
                    log.debug("a warm sandbox's watch failed", exc_info=True)
                idle.bad = True
        finally:
            idle.watched.set()
        if idle.bad and idle in slot.ready:
            slot.ready.remove(idle)
            log.info("a warm sandbox went bad while idle; replacing it")
            with anyio.CancelScope(shield=True):
                await self._discard(idle.sandbox)
            self._refill(key, slot)
