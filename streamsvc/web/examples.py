"""The playground's example menu: ``GET /playground/examples``, a JSON index of request bodies.

The seed example (static/seed-example.json) always, then each connector folder of the source
tree's ``examples/`` (a checkout; a pip install has none): its files, ``requirements.txt`` and
``connector.json`` made into a request body. Reading is bounded and runs off the event loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.web.pages import STATIC_DIR

SOURCE_ROOT: Final = Path(__file__).resolve().parents[2]
MAX_EXAMPLES: Final = 50
MAX_FILES: Final = 50
MAX_FILE_BYTES: Final = 256 * 1024
#: Files of a folder that are not connector source (the folder's own description).
_NOT_SOURCE: Final = frozenset({"connector.json", "connector.toml", "requirements.txt"})
_SOURCE_SUFFIXES: Final = frozenset({".py", ".json", ".txt", ".csv", ".md", ".toml", ".yaml"})


class Example(msgspec.Struct):
    id: str
    title: str
    description: str
    request: dict[str, Any]
    """A whole ``POST /execute-connector`` body (without ``stream``)."""


class ExampleIndex(msgspec.Struct):
    examples: list[Example]


def examples_dir() -> Path | None:
    """``examples/`` next to the package in a source checkout, else None."""
    if not (SOURCE_ROOT / "pyproject.toml").is_file():
        return None
    folder = SOURCE_ROOT / "examples"
    return folder if folder.is_dir() else None


def _seed() -> Example:
    request = json.loads((STATIC_DIR / "seed-example.json").read_text())
    return Example(
        "seed",
        "Seed example",
        "The original contract's example: one file, a pinned dependency, configuration and env.",
        request,
    )


def _read(path: Path) -> str | None:
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _requirements(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def folder_example(folder: Path) -> Example | None:
    """A connector folder as a request body; None when it is not one."""
    manifest_text = _read(folder / "connector.json")
    try:
        manifest = json.loads(manifest_text) if manifest_text is not None else {}
    except json.JSONDecodeError:
        return None
    if not isinstance(manifest, dict):
        return None
    files: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if len(files) >= MAX_FILES:
            break
        if relative in _NOT_SOURCE or path.suffix not in _SOURCE_SUFFIXES:
            continue
        if any(part.startswith((".", "__")) for part in path.relative_to(folder).parts):
            continue
        text = _read(path)
        if text is not None:
            files[relative] = text
    python = [name for name in files if name.endswith(".py")]
    if not python:
        return None
    runtime = dict(manifest.get("runtime") or {})
    runtime.setdefault("language", "python")
    runtime.setdefault("entryPoint", "main.py" if "main.py" in files else python[0])
    requirements = _read(folder / "requirements.txt")
    if requirements is not None and "dependencies" not in runtime:
        runtime["dependencies"] = _requirements(requirements)
    connector = {key: value for key, value in manifest.items() if key not in ("env", "request")}
    connector.update(runtime=runtime, files=files)
    request: dict[str, Any] = {"connector": connector}
    extra = manifest.get("request")
    if isinstance(extra, dict):  # env, configuration_overrides, network_mode to start from
        request.update({k: v for k, v in extra.items() if k != "connector"})
    if isinstance(manifest.get("env"), dict):
        request.setdefault("env", manifest["env"])
    if runtime.get("dependencies"):
        request.setdefault("network_mode", "bridge")
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    title = metadata.get("title") or metadata.get("name") or manifest.get("name") or folder.name
    description = metadata.get("description") or manifest.get("description") or ""
    return Example(folder.name, str(title), str(description), request)


def load_examples() -> ExampleIndex:
    found = [_seed()]
    folder = examples_dir()
    if folder is not None:
        for child in sorted(folder.iterdir())[:MAX_EXAMPLES]:
            if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
                example = folder_example(child)
                if example is not None:
                    found.append(example)
    return ExampleIndex(found)


_encoder = msgspec.json.Encoder()


async def examples_endpoint(request: Request) -> Response:
    index = await anyio.to_thread.run_sync(load_examples)
    return Response(
        _encoder.encode(index), media_type="application/json", headers={"Cache-Control": "no-cache"}
    )
