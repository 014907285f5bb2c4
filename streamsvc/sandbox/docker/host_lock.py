"""A lock held among the processes of this host: an ``flock`` on a file per name.

The dependency cache takes it around an install, so one host installs each set once.
The rule: the kernel drops it when its holder exits, so a crash never leaves it taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import AsyncIterator

import anyio

from streamsvc.errors import SandboxUnavailable


@contextlib.asynccontextmanager
async def host_lock(name: str, wait_seconds: float) -> AsyncIterator[None]:
    """Hold ``name``'s lock among the processes of this host (waits at most ``wait_seconds``).

    An ``flock`` on ``$TMPDIR/streamsvc-locks/NAME.lock``. Not had in time:
    ``SandboxUnavailable`` (503 ``sandbox_unavailable``).
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
            raise SandboxUnavailable(
                f"another process has been installing this dependency set for over "
                f"{wait_seconds:.0f}s; try again later"
            ) from exc
        yield
    finally:
        os.close(fd)  # releases the lock
