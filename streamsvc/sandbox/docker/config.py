"""The engine's create request for a sandbox container: every hardening setting.

``hardened`` is the one place they are set, the same for cold and warm
sandboxes: a non-root user, all capabilities dropped, ``no-new-privileges``,
a read-only root filesystem, size-capped tmpfs at ``/work``, ``/tmp`` and
``/dev/shm``, memory = memory+swap = ``memoryMb``, a CPU quota, a pids limit,
nofile and fsize ulimits, no host mounts, no log driver (output is read
through attach, so a flood never reaches the host's disk), tini as PID 1 (so
whatever the program leaves behind dies with it), the service's labels, and
either no network at all or the service's own bridge network (made by
``docker_api.ensure_network`` with inter-container traffic disabled).
Dependencies come from ``DependencyCache`` as a read-only volume at
``/opt/deps``, so they work under ``network_mode: none``.

``cold_config`` adds the request's env and an anonymous volume at ``/bundle``
for the files; ``warm_config`` adds nothing of any request (the env and files
come later over stdin, see ``warm_protocol``) and keeps stdin open.
Plain data in, plain dicts out: nothing here talks to the engine.
"""

from __future__ import annotations

from typing import Any

import msgspec

from streamsvc.sandbox.docker.api import NETWORK_NAME, SANDBOX_UID, labels
from streamsvc.sandbox.runner.runner import BOOTSTRAP
from streamsvc.sandbox.types import NetworkMode, RunSpec
from streamsvc.settings import SandboxSettings

CONTEXT_FILE = "/work/.streamsvc/context.json"
NOFILE_LIMIT = 256


class PoolKey(msgspec.Struct, frozen=True):
    """What a warm sandbox is created with that differs between requests."""

    image: str
    network: NetworkMode
    deps_volume: str | None
    memory_mb: int


def cold_config(
    settings: SandboxSettings, owner: str, spec: RunSpec, deps_volume: str | None
) -> dict[str, Any]:
    """The engine's create request for a cold run: the request's env, files by archive."""
    mounts: list[dict[str, Any]] = [{"Type": "volume", "Target": "/bundle"}]
    return hardened(
        settings,
        owner,
        network=spec.network,
        memory_mb=spec.memory_mb,
        deps_volume=deps_volume,
        env=run_env(spec, deps_volume),
        cmd=["python3", "/bundle/.streamsvc/runner.py"],
        mounts=mounts,
        role="run",
    )


def warm_config(
    settings: SandboxSettings, owner: str, key: PoolKey, preload: list[str] | None = None
) -> dict[str, Any]:
    """The engine's create request for a warm sandbox: nothing of any request in it."""
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
        role="warm",
    )
    # stdin stays open for the delivery; closed when the server lets go of it
    config |= {"AttachStdin": True, "OpenStdin": True, "StdinOnce": True}
    return config


def fixed_env(deps_volume: str | None) -> dict[str, str]:
    env = {
        "HOME": "/work",
        "PYTHONDONTWRITEBYTECODE": "1",
        "STREAMSVC_CONTEXT_FILE": CONTEXT_FILE,
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
    """Every hardening setting is here, the same for cold and warm sandboxes."""
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
    return {
        "Image": s.image,
        "Cmd": cmd,
        "User": f"{SANDBOX_UID}:{SANDBOX_UID}",
        "WorkingDir": "/work",
        "Env": [f"{key}={value}" for key, value in env.items()],
        "Labels": labels(owner, role),
        "AttachStdout": True,
        "AttachStderr": True,
        "NetworkDisabled": network == "none",
        "HostConfig": {
            "NetworkMode": "none" if network == "none" else NETWORK_NAME,
            "Memory": memory,
            "MemorySwap": memory,  # memory + swap: no swap at all
            "NanoCpus": int(s.cpus * 1e9),
            "PidsLimit": s.pids_limit,
            "ReadonlyRootfs": True,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Privileged": False,
            "Tmpfs": {"/work": tmpfs, "/tmp": tmpfs},
            "ShmSize": tmpfs_bytes,
            "IpcMode": "private",
            "Mounts": mounts,
            "Binds": [],
            "Ulimits": [
                {"Name": "nofile", "Soft": NOFILE_LIMIT, "Hard": NOFILE_LIMIT},
                {"Name": "fsize", "Soft": tmpfs_bytes, "Hard": tmpfs_bytes},
            ],
            "LogConfig": {"Type": "none", "Config": {}},
            "Init": True,
            "AutoRemove": False,
        },
    }
