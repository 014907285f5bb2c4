"""Which run store a URL names, the queue it brings (Redis), and the read tokens' key.

``STREAMSVC_RUN_STORE`` is ``memory://``, ``sqlite:////abs/path.db`` or ``redis://``; the token
key is a setting, one key kept in Redis, a key file beside the SQLite store, or one per process.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import anyio

from streamsvc.runs.memory import MemoryStore
from streamsvc.runs.queue import RunQueue
from streamsvc.runs.redis import RedisRunStore
from streamsvc.runs.sqlite import SqliteStore
from streamsvc.runs.store import RunStore
from streamsvc.settings import RunSettings


def open_store(url: str, retention: float = 0) -> RunStore:
    """``memory://``, ``sqlite:////absolute/path.db`` (SQLAlchemy's form) or ``redis://`` /
    ``rediss://`` (Redis expires a finished run's events after ``retention``, its record
    after twice that, as ``prune`` does)."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("redis://", "rediss://")):
        return RedisRunStore.from_url(url, events_ttl=retention, records_ttl=2 * retention)
    raise ValueError(f"unsupported run store {url!r}")


def queue_for(store: RunStore, settings: RunSettings) -> RunQueue | None:
    """With the Redis store, the queue that takes connector runs to executors (its unfinished
    runs of that kind are then the queue's, not ``interrupt_unfinished``'s); with an
    embedded store none: this process runs them."""
    if not isinstance(store, RedisRunStore):
        return None
    store.queued_kinds = frozenset({"connector"})
    return RunQueue(
        store,
        capacity=settings.queue_capacity,
        per_key=settings.max_active_runs_per_key,
        lease_seconds=settings.lease_seconds,
        wait_seconds=settings.queue_wait_seconds,
    )


async def load_secret(settings: RunSettings, store: RunStore | None = None) -> bytes:
    """The read tokens' HMAC key: the setting, else with the Redis ``store`` one key kept in
    Redis (made once, shared by every node and executor), else a key file beside the SQLite
    store (made once, mode 0600, so tokens survive a restart as runs do), else one per process."""
    if settings.token_secret:
        return settings.token_secret.encode()
    if isinstance(store, RedisRunStore):
        return await _shared_secret(store)
    if not settings.store.startswith("sqlite:///"):
        return secrets.token_bytes(32)
    return await anyio.to_thread.run_sync(_key_file, settings.store)


async def _shared_secret(store: RedisRunStore) -> bytes:
    """``SET NX`` of a random key under the store's prefix, then whichever key won."""
    redis, key = store.client, store.key("token-key")

    async def run() -> Any:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(key, secrets.token_bytes(32), nx=True)
            pipe.get(key)
            return await pipe.execute()

    _, value = await store.call(run)
    return bytes(value)


def _key_file(url: str) -> bytes:
    path = Path(url.removeprefix("sqlite:///")).parent / "token.key"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as file:
        key = secrets.token_bytes(32)
        file.write(key)
    return key
