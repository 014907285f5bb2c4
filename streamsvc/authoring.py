"""Connector folders: read one into a request body (``load_request``), scaffold one (``init``).

A folder holds Python files (relative paths kept), ``requirements.txt`` and ``connector.json`` or
``connector.toml`` (runtime, configuration, metadata). Client side only: no server code here.
The format in full: README ("Connector folders") and docs/architecture.md.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["AuthoringError", "init", "load_folder", "load_request"]

MANIFESTS = ("connector.json", "connector.toml")
REQUIREMENTS = "requirements.txt"
#: Folders never read: caches, virtual environments, version control.
SKIPPED_DIRS = frozenset({"__pycache__", "venv", "env", "node_modules", "site-packages"})
#: More files than the server takes at most by default; a guard against reading a whole tree.
MAX_FILES = 500
#: Largest file read (far past the server's default cap): a guard against reading a disk image.
MAX_FILE_BYTES = 32 * 1024 * 1024
#: The ``runtime`` keys a TOML manifest may spell in snake case.
_CAMEL = {"entry_point": "entryPoint", "memory_mb": "memoryMb", "timeout_ms": "timeoutMs"}


class AuthoringError(ValueError):
    """A folder or file that cannot become a request; the message names the file."""


def load_request(path: Path) -> dict[str, Any]:
    """The request body of a connector folder, a connector JSON file or a whole-body JSON file."""
    if path.is_dir():
        return load_folder(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuthoringError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise AuthoringError(f"{path} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise AuthoringError(f"{path} must hold a JSON object")
    return (
        dict(document) if isinstance(document.get("connector"), dict) else {"connector": document}
    )


def _manifest(folder: Path) -> dict[str, Any]:
    found = [folder / name for name in MANIFESTS if (folder / name).is_file()]
    if len(found) > 1:
        raise AuthoringError(f"{folder}: both connector.json and connector.toml; keep one")
    if not found:
        return {}
    path = found[0]
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise AuthoringError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthoringError(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(document, dict):
        raise AuthoringError(f"{path} must hold an object")
    return document


def requirements(path: Path) -> list[str]:
    """The requirement lines of ``requirements.txt`` (comments and blank lines dropped)."""
    found = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise AuthoringError(
                f"{path}:{number}: pip options ({line.split()[0]}) are not supported;"
                " list one requirement per line (name, optionally a version)"
            )
        found.append(line)
    return found


def _wanted(relative: Path) -> bool:
    return not any(part.startswith(".") or part in SKIPPED_DIRS for part in relative.parts[:-1])


def _files(folder: Path, include: list[str], max_file_bytes: int | None) -> dict[str, str]:
    paths = {p for p in folder.rglob("*.py") if _wanted(p.relative_to(folder))}
    for pattern in include:
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise AuthoringError(f"{folder}: include pattern {pattern!r} leaves the folder")
        matched = [p for p in folder.glob(pattern) if p.is_file()]
        if not matched:
            raise AuthoringError(f"{folder}: include pattern {pattern!r} matches no file")
        paths.update(matched)
    if len(paths) > MAX_FILES:
        raise AuthoringError(f"{folder}: more than {MAX_FILES} files; is it the right folder?")
    files = {}
    root = folder.resolve()
    for path in sorted(paths):
        name = path.relative_to(folder).as_posix()
        if not path.resolve().is_relative_to(root):  # the file or a folder on its way a link
            raise AuthoringError(f"{path}: a link out of the folder")
        if not path.is_file():  # a FIFO named x.py would block the read forever
            raise AuthoringError(f"{path}: not a regular file")
        limit = MAX_FILE_BYTES if max_file_bytes is None else max_file_bytes
        if path.stat().st_size > limit:
            raise AuthoringError(f"{path}: larger than {limit} bytes")
        try:
            files[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise AuthoringError(f"{path}: not UTF-8 text") from None
    return files


def load_folder(folder: Path, max_file_bytes: int | None = None) -> dict[str, Any]:
    """The request body of a connector folder (``network_mode`` from ``runtime.network``);
    ``max_file_bytes`` refuses larger files (default ``MAX_FILE_BYTES``; the server's example
    menu reads with a smaller cap)."""
    manifest = _manifest(folder)
    runtime = {_CAMEL.get(k, k): v for k, v in dict(manifest.pop("runtime", None) or {}).items()}
    include = manifest.pop("include", [])
    if not isinstance(include, list) or not all(isinstance(p, str) for p in include):
        raise AuthoringError(f"{folder}: include must be a list of glob patterns")
    if "files" in manifest:
        raise AuthoringError(f"{folder}: files come from the folder; use include for non-Python")
    files = _files(folder, include, max_file_bytes)
    if not files:
        raise AuthoringError(f"{folder}: no Python file")
    runtime.setdefault("language", "python")
    if "entryPoint" not in runtime:
        only = next(iter(files)) if len(files) == 1 else "main.py"
        runtime["entryPoint"] = "main.py" if "main.py" in files else only
    if (folder / REQUIREMENTS).is_file():
        if runtime.get("dependencies"):
            raise AuthoringError(
                f"{folder}: dependencies in both requirements.txt and the manifest; keep one"
            )
        runtime["dependencies"] = requirements(folder / REQUIREMENTS)
    body: dict[str, Any] = {}
    network = runtime.pop("network", None)
    if network is not None:
        body["network_mode"] = network
    body["connector"] = {**manifest, "runtime": runtime, "files": files}
    return body


MAIN = '''"""{name}: a streamsvc connector. Run it: streamsvc run {name}"""

import os
from pathlib import Path

#: Files written here come back with the run's result (see README, "Output files").
OUTPUT_DIR = Path(os.environ.get("STREAMSVC_OUTPUT_DIR", "/work/out"))


def run(context):
    """Called with the context; what it returns is the run's result."""
    configuration = context["connector"]["configuration"]
    greeting = f"Hello, {{configuration['who']}}!"
    print(greeting)  # stdout and stderr stream live
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / "greeting.txt").write_text(greeting + "\\n")
    return {{"greeting": greeting}}
'''

MANIFEST = """{{
  "name": "{name}",
  "description": "What this connector does.",
  "runtime": {{"entryPoint": "main.py", "timeoutMs": 30000, "memoryMb": 256, "network": "none"}},
  "configuration": {{"who": "world"}}
}}
"""

REQUIREMENTS_TEXT = """# One requirement per line, e.g. requests==2.32.3 (installed once, then cached).
"""  # noqa: E501


def init(folder: Path) -> list[Path]:
    """Write a connector folder that runs as is; the files it wrote. Refuses a non-empty one."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise AuthoringError(f"{folder} already exists and is not an empty folder")
    name = folder.resolve().name
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file, text in (
        ("connector.json", MANIFEST),
        ("main.py", MAIN),
        (REQUIREMENTS, REQUIREMENTS_TEXT),
    ):
        (folder / file).write_text(text.format(name=json.dumps(name)[1:-1]), encoding="utf-8")
        written.append(folder / file)
    return written
