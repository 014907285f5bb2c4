"""Per-key request and token limits: one pair of token buckets per API key id.

``KeyLimits.check`` refuses a key over its requests-per-minute or tokens-per-minute budget
(``KeyRateLimited``, 429 with ``Retry-After``); ``spend`` charges a chat answer's tokens after it.
The rule: O(1) per request, event-loop only; each worker process keeps its own buckets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from streamsvc.errors import KeyRateLimited

__all__ = ["Bucket", "KeyLimits"]


class Bucket:
    """A token bucket holding up to ``per_minute``, refilled continuously; it may go negative
    (tokens are charged after the answer), and then admits nothing until it is positive again."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.at = now

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level

    def wait(self, need: float, now: float) -> float:
        """Seconds until the bucket holds more than ``need``; 0 when it does now."""
        missing = need - self.refill(now)
        return 0.0 if missing < 0 else missing / self.rate


class KeyLimits:
    """Each key id's buckets; a limit of 0 is off."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def check(self, key: str, uses_tokens: bool) -> None:
        """Admit one request of ``key`` (taking one request), or raise ``KeyRateLimited``.

        ``uses_tokens``: a chat request, refused while the key's tokens are spent.
        """
        now = self._clock()
        tokens = self._tokens.get(key) if uses_tokens and self.tokens_per_minute else None
        if tokens is None and uses_tokens and self.tokens_per_minute:
            tokens = self._tokens[key] = Bucket(self.tokens_per_minute, now)
        if tokens is not None:
            wait = tokens.wait(0.0, now)
            if wait > 0:
                raise _limited("tokens", self.tokens_per_minute, wait)
        if self.requests_per_minute:
            requests = self._requests.get(key)
            if requests is None:
                requests = self._requests[key] = Bucket(self.requests_per_minute, now)
            wait = requests.wait(1.0 - 1e-9, now)
            if wait > 0:
                raise _limited("requests", self.requests_per_minute, wait)
            requests.level -= 1

    def spend(self, key: str, tokens: int) -> None:
        """Charge ``tokens`` a chat answer used to ``key``."""
        if not self.tokens_per_minute or tokens <= 0:
            return
        now = self._clock()
        bucket = self._tokens.get(key)
        if bucket is None:
            bucket = self._tokens[key] = Bucket(self.tokens_per_minute, now)
        bucket.refill(now)
        bucket.level -= tokens


def _limited(what: str, per_minute: int, wait: float) -> KeyRateLimited:
    error = KeyRateLimited(
        f"this API key is over its limit of {per_minute} {what} per minute; "
        f"try again in {math.ceil(wait)}s",
        retry_after=max(1.0, math.ceil(wait)),
        details={"limit": what, "per_minute": per_minute},
    )
    return error
