"""The dependency sets as the engine holds them: labels, disk usage, listing, clearing.

Each set is a volume labelled with its requirements, image id and Python version; this is
what ``streamsvc deps list|clear`` shows and a starting cache reads. No bookkeeping here.
"""

from __future__ import annotations

import json
from typing import Any

import aiodocker
import anyio
import msgspec
from aiodocker.volumes import DockerVolume

from streamsvc.errors import EngineRefused, SandboxError
from streamsvc.sandbox.docker.api import docker_call
from streamsvc.settings import SandboxSettings

LABEL_DEPS = "streamsvc.deps"
LABEL_IMAGE = "streamsvc.deps.image"
LABEL_PYTHON = "streamsvc.deps.python"

_DF_ATTEMPTS = 20  # each wait longer than the last
#: How the engine refuses a second disk-usage report while one is computed: a
#: plain error (500, Docker 20.10) or a conflict (409).
_DF_BUSY = frozenset({409, 500})


class CacheEntry(msgspec.Struct):
    """One cached set as the engine sees it."""

    volume: str
    requirements: list[str]
    python: str | None
    image: str | None
    #: Built for the image ``STREAMSVC_SANDBOX_IMAGE`` names now.
    current: bool
    size_kb: int | None
    #: Containers (of any state) that mount it; such a set is not removed.
    containers: int | None
    created: str | None


async def disk_usage(docker: aiodocker.Docker) -> list[dict[str, Any]]:
    """The engine's disk-usage report for every cache volume (labels, size, users).

    The engine computes one report at a time and refuses a second caller, as
    when workers start together: that caller waits a little and asks again.
    """
    for attempt in range(1, _DF_ATTEMPTS + 1):
        try:
            report = await docker_call("report disk usage", docker._query_json("system/df"))
            break
        except EngineRefused as exc:
            if exc.engine_status not in _DF_BUSY or attempt == _DF_ATTEMPTS:
                raise
            await anyio.sleep(0.1 * attempt)
    volumes = report.get("Volumes") or []
    return [v for v in volumes if LABEL_DEPS in (v.get("Labels") or {})]


async def entries(docker: aiodocker.Docker, settings: SandboxSettings) -> list[CacheEntry]:
    """Every cached set on the engine, newest first."""
    try:
        image = await docker_call(
            "inspect the sandbox image", docker.images.inspect(settings.image)
        )
        current: str | None = image["Id"]
    except EngineRefused:  # no such image: no set is the current image's
        current = None
    found = []
    for volume in await disk_usage(docker):
        marks = volume.get("Labels") or {}
        usage = volume.get("UsageData") or {}
        size, users = usage.get("Size", -1), usage.get("RefCount", -1)
        found.append(
            CacheEntry(
                volume=volume["Name"],
                requirements=requirements(marks),
                python=marks.get(LABEL_PYTHON),
                image=marks.get(LABEL_IMAGE),
                current=current is not None and marks.get(LABEL_IMAGE) == current,
                size_kb=size // 1024 if size >= 0 else None,
                containers=users if users >= 0 else None,
                created=volume.get("CreatedAt"),
            )
        )
    return sorted(found, key=lambda entry: entry.created or "", reverse=True)


async def clear(
    docker: aiodocker.Docker, settings: SandboxSettings, every_image: bool = False
) -> tuple[list[str], list[str]]:
    """Remove the cached sets no container uses (of the current image, or all); (removed, kept)."""
    removed, kept = [], []
    for entry in await entries(docker, settings):
        if not (entry.current or every_image):
            continue
        try:
            await docker_call("remove a cache volume", DockerVolume(docker, entry.volume).delete())
            removed.append(entry.volume)
        except SandboxError:
            kept.append(entry.volume)  # in use (409), or gone meanwhile
    return removed, kept


def requirements(marks: dict[str, str]) -> list[str]:
    """The requirements a volume's labels name (``[]`` when they are unreadable)."""
    try:
        found = json.loads(marks.get(LABEL_DEPS, "[]"))
    except ValueError:
        return []
    return [str(item) for item in found] if isinstance(found, list) else []
