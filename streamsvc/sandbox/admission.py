"""Admission control: at most N runs at once, a bounded FIFO queue behind them.

``Admission.enter()`` admits, queues (reporting the 1-based position) or raises ``Busy``
(429 with ``Retry-After``). The rule: no wait is unbounded (``max_wait``, then ``Busy``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator

import anyio

from streamsvc.errors import Busy


class Ticket:
    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._changed = anyio.Event()
        self._deadline = anyio.current_time() + admission.max_wait
        self.admitted = False
        self.released = False

    @property
    def position(self) -> int:
        """1-based place in the queue; 0 once admitted."""
        if self.admitted:
            return 0
        return self._admission.queue.index(self) + 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def positions(self) -> AsyncIterator[int]:
        """Yield the queue position each time it changes, until admitted.

        Past the admission's ``max_wait`` the ticket leaves the queue: ``Busy``.
        """
        last = -1
        while not self.admitted:
            # Taken before reading the position: a move while the caller holds
            # the yielded value sets this event, so it is never missed.
            changed = self._changed
            position = self.position
            if position != last:
                last = position
                yield position
            if not self.admitted:
                with anyio.CancelScope(deadline=self._deadline) as waiting:
                    await changed.wait()
                if waiting.cancelled_caught and not self.admitted:
                    self.release()
                    raise Busy(
                        f"no slot came free in {self._admission.max_wait:g}s in the queue; "
                        "try again later",
                        retry_after=self._admission.retry_after,
                    )

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._admission._release(self)


class Admission:
    def __init__(
        self,
        max_running: int,
        max_queued: int,
        retry_after: float = 5.0,
        max_wait: float = math.inf,
    ) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after = retry_after
        self.max_wait = max_wait
        self.running = 0
        self.queue: deque[Ticket] = deque()

    def enter(self) -> Ticket:
        ticket = Ticket(self)
        if self.running < self.max_running and not self.queue:
            self.running += 1
            ticket.admitted = True
        elif len(self.queue) < self.max_queued:
            self.queue.append(ticket)
        else:
            raise Busy(
                f"{self.running} runs are running and {len(self.queue)} are queued; "
                "try again later",
                retry_after=self.retry_after,
            )
        return ticket

    def _release(self, ticket: Ticket) -> None:
        if ticket.admitted:
            self.running -= 1
        else:
            self.queue.remove(ticket)
        moved: list[Ticket] = []
        while self.queue and self.running < self.max_running:
            admitted = self.queue.popleft()
            admitted.admitted = True
            self.running += 1
            moved.append(admitted)
        for waiting in (*moved, *self.queue):
            waiting._notify()
