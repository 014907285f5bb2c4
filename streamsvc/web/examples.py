"""The playground's example menu: ``GET /playground/examples``, a JSON index of request bodies.

The seed example (static/seed-example.json) always, then each connector folder of the source
tree's ``examples/`` (a checkout; a pip install has none), read as ``streamsvc run DIR`` reads
one. Reading is bounded and runs off the event loop.
"""

from __future__ import annotations

import json
import tomllib
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
MANIFESTS: Final = ("connector.json", "connector.toml")
#: Folders never read: caches, virtual environments, version control (as ``streamsvc run``).
SKIPPED_DIRS: Final = frozenset({"__pycache__", "venv", "env", "node_modules", "site-packages"})
#: The ``runtime`` keys a TOML manifest may spell in snake case.
_CAMEL: Final = {"entry_point": "entryPoint", "memory_mb": "memoryMb", "timeout_ms": "timeoutMs"}


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
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest ({} without one); None when it is unreadable or ambiguous."""
    found = [folder / name for name in MANIFESTS if (folder / name).is_file()]
    if len(found) > 1:
        return None
    if not found:
        return {}
    text = _read(found[0])
    try:
        document = (json.loads if found[0].suffix == ".json" else tomllib.loads)(text or "")
    except ValueError:
        return None
    return document if isinstance(document, dict) and text is not None else None


def _requirements(text: str) -> list[str]:
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def _sources(folder: Path, include: list[str]) -> dict[str, str]:
    """Its Python files and those ``include`` names, by relative path (no links, no caches)."""
    paths = {p for p in folder.rglob("*.py")}
    for pattern in include:
        if not Path(pattern).is_absolute() and ".." not in Path(pattern).parts:
            paths.update(p for p in folder.glob(pattern) if p.is_file())
    files: dict[str, str] = {}
    root = folder.resolve()
    for path in sorted(paths):
        if not path.resolve().is_relative_to(root):  # through a linked folder
            continue
        relative = path.relative_to(folder)
        if any(part.startswith(".") or part in SKIPPED_DIRS for part in relative.parts[:-1]):
            continue
        text = _read(path)
        if text is not None and len(files) < MAX_FILES:
            files[relative.as_posix()] = text
    return files


def folder_example(folder: Path) -> Example | None:
    """A connector folder as a request body, read as ``streamsvc run DIR`` reads it; None when
    it is not one."""
    manifest = _manifest(folder)
    include = (manifest or {}).get("include", [])
    if manifest is None or "files" in manifest or not isinstance(include, list):
        return None
    files = _sources(folder, [p for p in include if isinstance(p, str)])
    python = [name for name in files if name.endswith(".py")]
    if not python:
        return None
    runtime = {_CAMEL.get(k, k): v for k, v in dict(manifest.get("runtime") or {}).items()}
    runtime.setdefault("language", "python")
    runtime.setdefault("entryPoint", "main.py" if "main.py" in files else python[0])
    requirements = _read(folder / "requirements.txt")
    if requirements is not None and not runtime.get("dependencies"):
        runtime["dependencies"] = _requirements(requirements)
    request: dict[str, Any] = {}
    network = runtime.pop("network", None)
    if network is not None:
        request["network_mode"] = network
    connector = {k: v for k, v in manifest.items() if k != "include"}
    request["connector"] = {**connector, "runtime": runtime, "files": files}
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    title = manifest.get("name") or metadata.get("title") or folder.name
    description = manifest.get("description") or metadata.get("description") or ""
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
