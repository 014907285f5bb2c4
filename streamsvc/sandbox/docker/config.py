"""The engine's create request for every container the service makes.

The rule: ``locked_down`` is the one place the hardening is set; run sandboxes (``hardened``)
and dependency helpers (``helper_config``) add limits to it. Plain data, no engine calls.
"""

from __future__ import annotations

from typing import Any

import msgspec

from streamsvc.sandbox.docker.api import SANDBOX_UID, labels
from streamsvc.sandbox.runner.runner import BOOTSTRAP, OUTPUT_DIR
from streamsvc.sandbox.types import NetworkMode, RunSpec
from streamsvc.settings import SandboxSettings

CONTEXT_FILE = "/work/.streamsvc/context.json"
NOFILE_LIMIT = 256
#: On helper containers: ``install``, ``check`` (adopting a volume) or ``python`` (the probe).
LABEL_ACTION = "streamsvc.deps.action"
#: A dependency helper's limits: an install (pip, uv, compiling) needs more than a run.
#: Memory = memory+swap (no swap), the run's CPU quota, these pids, nofile, fsize.
HELPER_MEMORY_MB = 1024
HELPER_PIDS_LIMIT = 256
HELPER_NOFILE_LIMIT = 1024
HELPER_TMPFS_MB = 1024


class PoolKey(msgspec.Struct, frozen=True):
    """What a warm sandbox is created with that differs between requests."""

    image: str
    network: NetworkMode
    deps_volume: str | None
    memory_mb: int


def warm_config(
    settings: SandboxSettings,
    owner: str,
    key: PoolKey,
    preload: list[str] | None = None,
    role: str = "warm",
) -> dict[str, Any]:
    """The engine's create request for a sandbox: nothing of any request in it.

    ``role`` ``warm``: made ahead for the pool; ``run``: made for one cold run.
    """
    env = {**fixed_env(key.deps_volume), "STREAMSVC_DELIVERY": "stdin"}
    if preload:
        env["STREAMSVC_PRELOAD"] = ",".join(preload)
    config = hardened(
        settings,
        owner,
        network=key.network,
        memory_mb=key.memory_mb,
        deps_volume=key.deps_volume,
        env=env,
        cmd=["python3", "-c", BOOTSTRAP],
        mounts=[],
        role=role,
    )
    # stdin stays open for the delivery; closed when the server lets go of it
    config |= {"AttachStdin": True, "OpenStdin": True, "StdinOnce": True}
    return config


def fixed_env(deps_volume: str | None) -> dict[str, str]:
    env = {
        "HOME": "/work",
        "PYTHONDONTWRITEBYTECODE": "1",
        "STREAMSVC_CONTEXT_FILE": CONTEXT_FILE,
        "STREAMSVC_OUTPUT_DIR": OUTPUT_DIR,
    }
    if deps_volume is not None:
        env["PYTHONPATH"] = "/opt/deps"
    return env


def run_env(spec: RunSpec, deps_volume: str | None) -> dict[str, str]:
    """The program's environment: the request's, then ours (ours win)."""
    return {
        **spec.env,
        "STREAMSVC_ENTRY_POINT": spec.entry_point,
        **fixed_env(deps_volume),
    }


def hardened(
    settings: SandboxSettings,
    owner: str,
    *,
    network: NetworkMode,
    memory_mb: int,
    deps_volume: str | None,
    env: dict[str, str],
    cmd: list[str],
    mounts: list[dict[str, Any]],
    role: str,
) -> dict[str, Any]:
    """A run sandbox: ``locked_down`` plus every run limit, the same for cold and warm.

    Memory = memory+swap = ``memory_mb``, a CPU quota, a pids limit, nofile and
    fsize ulimits, size-capped ``noexec`` tmpfs at ``/work``, ``/tmp`` and
    ``/dev/shm``, private IPC, no host mounts, and either no network or the
    service's bridge (inter-container traffic off); dependencies read-only.
    """
    s = settings
    memory = memory_mb * 1024 * 1024
    tmpfs_bytes = s.tmpfs_mb * 1024 * 1024
    tmpfs = (
        f"rw,nosuid,nodev,noexec,size={s.tmpfs_mb}m,uid={SANDBOX_UID},gid={SANDBOX_UID},mode=0700"
    )
    mounts = list(mounts)
    if deps_volume is not None:
        mounts.append(
            {"Type": "volume", "Source": deps_volume, "Target": "/opt/deps", "ReadOnly": True}
        )
    config = locked_down(
        settings,
        labels(owner, role),
        cmd=cmd,
        env=env,
        network_mode="none" if network == "none" else settings.network,
        memory=memory,
        pids_limit=s.pids_limit,
        tmpfs={"/work": tmpfs, "/tmp": tmpfs},
        mounts=mounts,
    )
    config["WorkingDir"] = "/work"
    config["NetworkDisabled"] = network == "none"
    config["HostConfig"] |= {
        "MemorySwap": memory,  # memory + swap: no swap at all
        "NanoCpus": int(s.cpus * 1e9),
        "Privileged": False,
        "ShmSize": tmpfs_bytes,
        "IpcMode": "private",
        "Binds": [],
        "Ulimits": [
            {"Name": "nofile", "Soft": NOFILE_LIMIT, "Hard": NOFILE_LIMIT},
            {"Name": "fsize", "Soft": tmpfs_bytes, "Hard": tmpfs_bytes},
        ],
        "AutoRemove": False,
    }
    return config


def helper_config(
    settings: SandboxSettings,
    owner: str,
    *,
    action: str,
    cmd: list[str],
    env: dict[str, str],
    volume: str | None,
    writable: bool,
    stdin: bool,
) -> dict[str, Any]:
    """A dependency helper (``install``, ``check``, ``python``): ``locked_down``, looser limits.

    Limited like a run: memory with no swap, the run's CPU quota, a pids limit,
    nofile and fsize ulimits. Only an install (``writable``) gets the service's
    bridge (never the host's default network) and a writable ``/opt/deps``.
    """
    mounts: list[dict[str, Any]] = []
    if volume is not None:
        mounts.append(
            {"Type": "volume", "Source": volume, "Target": "/opt/deps", "ReadOnly": not writable}
        )
    config = locked_down(
        settings,
        {**labels(owner, "deps"), LABEL_ACTION: action},
        cmd=cmd,
        env=env,
        network_mode=settings.network if writable else "none",
        memory=HELPER_MEMORY_MB * 1024 * 1024,
        pids_limit=HELPER_PIDS_LIMIT,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={HELPER_TMPFS_MB}m"},
        mounts=mounts,
    )
    memory = HELPER_MEMORY_MB * 1024 * 1024
    file_bytes = HELPER_TMPFS_MB * 1024 * 1024
    config["HostConfig"] |= {
        "MemorySwap": memory,  # memory + swap: no swap at all
        "NanoCpus": int(settings.cpus * 1e9),
        "Ulimits": [
            {"Name": "nofile", "Soft": HELPER_NOFILE_LIMIT, "Hard": HELPER_NOFILE_LIMIT},
            {"Name": "fsize", "Soft": file_bytes, "Hard": file_bytes},
        ],
    }
    config |= {"AttachStdin": stdin, "OpenStdin": stdin, "StdinOnce": stdin}
    return config


def locked_down(
    settings: SandboxSettings,
    container_labels: dict[str, str],
    *,
    cmd: list[str],
    env: dict[str, str],
    network_mode: str,
    memory: int,
    pids_limit: int,
    tmpfs: dict[str, str],
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    """What every container the service makes has: the one place hardening is set."""
    return {
        "Image": settings.image,
        "Cmd": cmd,
        "User": f"{SANDBOX_UID}:{SANDBOX_UID}",
        "Env": [f"{key}={value}" for key, value in env.items()],
        "Labels": container_labels,
        "AttachStdout": True,
        "AttachStderr": True,
        "HostConfig": {
            "NetworkMode": network_mode,
            "Memory": memory,
            "PidsLimit": pids_limit,
            "ReadonlyRootfs": True,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Tmpfs": tmpfs,
            "Mounts": mounts,
            "LogConfig": {"Type": "none", "Config": {}},
            "Init": True,
        },
    }
