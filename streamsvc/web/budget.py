"""The budget of request-body bytes in flight: what all bodies still arriving may hold at once.

One per app (``Services.bodies``), so one per worker process; ``web.bodies.read_body``
counts a body's bytes as they arrive and gives them back
when the body is read, refused, timed out or abandoned.
"""

from __future__ import annotations

__all__ = ["BodyBudget"]


class BodyBudget:
    """A count of reserved bytes against a capacity; event-loop only, so no lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes if they fit; False (nothing taken) if they do not."""
        if self.in_flight + size > self.capacity:
            return False
        self.in_flight += size
        return True

    def release(self, size: int) -> None:
        self.in_flight -= size
