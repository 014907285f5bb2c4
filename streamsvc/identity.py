"""Process names, ``host:pid``: who runs a run, who owns a container, and whether it lives.

Run records name their executor this way and containers carry their owner's name in a label,
so start-up can tell a dead process's leftovers from a live peer's. One implementation for both.
"""

from __future__ import annotations

import os
import socket


def process_name() -> str:
    """This process's name: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(name: str) -> bool:
    """False only for a process of this host that no longer exists."""
    host, _, pid = name.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
