"""The playground's example menu: ``GET /playground/examples``, a JSON index of request bodies.

The seed example (static/seed-example.json) always, then each connector folder of the source
tree's ``examples/`` (a checkout; a pip install has none), read as ``streamsvc run DIR`` reads
one. Reading is bounded and runs off the event loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.authoring import AuthoringError, load_folder
from streamsvc.web.pages import STATIC_DIR

SOURCE_ROOT: Final = Path(__file__).resolve().parents[2]
MAX_EXAMPLES: Final = 50
MAX_FILES: Final = 50
MAX_FILE_BYTES: Final = 256 * 1024


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


def folder_example(folder: Path) -> Example | None:
    """A connector folder as a request body, read as ``streamsvc run DIR`` reads it (one reader:
    ``authoring.load_folder``); None when it is not one."""
    if (folder / "requirements.txt").is_symlink():
        return None
    try:
        request = load_folder(folder, max_file_bytes=MAX_FILE_BYTES)
    except (AuthoringError, OSError):
        return None
    connector = request["connector"]
    if len(connector["files"]) > MAX_FILES:
        return None
    metadata = connector.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    title = connector.get("name") or metadata.get("title") or folder.name
    description = connector.get("description") or metadata.get("description") or ""
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
