"""The layout rules of docs/architecture.md: short docstrings, the import rule, the README tree."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "streamsvc"

#: Modules whose docstring may be longer than 5 lines, and why.
LONG_DOCSTRINGS = {
    "streamsvc.errors": "draws the error tree, as httpx's _exceptions.py does",
}
MAX_DOCSTRING_LINES = 5
#: A module longer than this says why at its top (its docstring names "400 lines").
MAX_MODULE_LINES = 400

ENDPOINTS = {
    "streamsvc.chat.endpoint",
    "streamsvc.chat.openai_compat",
    "streamsvc.connectors.endpoint",
    "streamsvc.runs.endpoint",
}
#: Who may import an endpoint module: the app routes them, openapi reads their types, and
#: /v1 shares /chat's deployment rules.
ENDPOINT_IMPORTERS = {
    "streamsvc.web.app": ENDPOINTS,
    "streamsvc.web.openapi": ENDPOINTS,
    "streamsvc.chat.openai_compat": {"streamsvc.chat.endpoint"},
}
#: Third-party clients and the only modules that may import them (a prefix ends in ".").
BOUNDARIES = {
    "openai": ("streamsvc.chat.provider",),
    "aiodocker": ("streamsvc.sandbox.docker.",),
    "redis": ("streamsvc.runs.redis", "streamsvc.runs.queue"),
}

#: docs/architecture.md's layers, bottom up: a module imports only from its own layer or below.
#: A key ending in "." covers a folder; the longest key that matches a module places it.
LAYERS = {
    "streamsvc.settings": 1,
    "streamsvc.errors": 1,
    "streamsvc.identity": 1,
    "streamsvc.chat.types": 2,
    "streamsvc.chat.openai_chunks": 2,
    "streamsvc.chat.provider": 2,
    "streamsvc.connectors.": 2,
    "streamsvc.sandbox.": 2,
    "streamsvc.runs.": 2,
    "streamsvc.web.": 3,
    "streamsvc.chat.openai_errors": 3,
    "streamsvc.runs.manager": 3,
    "streamsvc.runs.respond": 3,
    "streamsvc.connectors.events": 3,
    **dict.fromkeys(ENDPOINTS, 4),
    "streamsvc.web.openapi": 4,
    "streamsvc.web.app": 5,
    "streamsvc.runs.executor": 5,
    "streamsvc.serving.": 5,
    "streamsvc.cli": 5,
    "streamsvc.__main__": 5,
    "streamsvc": 5,
}
#: The client side stands apart: it imports only the foundation and itself, never the server.
CLIENT_SIDE = {"streamsvc.client", "streamsvc.commands", "streamsvc.authoring"}
#: Imports upwards that docs/architecture.md names, each with its reason.
UPWARDS = {
    ("streamsvc.connectors.request", "streamsvc.web.bodies"): "reuses the one JsonDecoder",
    ("streamsvc.web.examples", "streamsvc.authoring"): "one connector-folder reader",
    ("streamsvc.cli", "streamsvc.commands"): "the command dispatches the client commands",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            # ``from streamsvc.chat import openai_compat`` imports a module too.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_import_scan_sees_lazy_and_from_package_imports() -> None:
    """The rules below are only as good as this scan."""
    app = imported(PACKAGE / "web" / "app.py")
    assert app >= ENDPOINTS  # one of them as ``from streamsvc.chat import openai_compat``
    assert "streamsvc.sandbox.docker.sandbox" in app  # imported in the lifespan
    assert "openai" in imported(PACKAGE / "chat" / "provider.py")


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_opens_with_a_short_docstring(name: str) -> None:
    path = modules()[name]
    source = path.read_text()
    if path.name == "__init__.py" and name != "streamsvc":
        assert source == "", f"{path}: a sub-package's __init__.py stays empty"
        return
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, f"{path} has no module docstring"
    lines = len(docstring.strip().splitlines())
    if name not in LONG_DOCSTRINGS:
        assert lines <= MAX_DOCSTRING_LINES, (
            f"{path}: {lines} docstring lines; move the design prose to docs/architecture.md"
        )
    if len(source.splitlines()) > MAX_MODULE_LINES:
        stated = " ".join(docstring.split())
        assert f"{MAX_MODULE_LINES} lines" in stated, f"{path}: say at its top why it is long"


def test_only_the_app_and_openapi_import_an_endpoint_module() -> None:
    offenders = {
        name: sorted(reached)
        for name, path in modules().items()
        if (reached := (imported(path) & ENDPOINTS) - ENDPOINT_IMPORTERS.get(name, set()))
    }
    assert offenders == {}


def layer(name: str) -> int:
    keys = [k for k in LAYERS if name == k or (k.endswith(".") and name.startswith(k))]
    assert keys, f"{name}: give it a layer in LAYERS (and in docs/architecture.md)"
    return LAYERS[max(keys, key=len)]


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    ours = {name: path for name, path in modules().items() if path.read_text()}
    offenders = []
    for name, path in ours.items():
        if name not in CLIENT_SIDE:
            layer(name)  # every module has its place
        for target in sorted(imported(path) & set(ours)):
            if (name, target) in UPWARDS:
                continue
            if name in CLIENT_SIDE:
                allowed = target in CLIENT_SIDE or layer(target) == 1
            else:
                allowed = target not in CLIENT_SIDE and layer(target) <= layer(name)
            if not allowed:
                offenders.append(f"{name} imports {target}")
    assert offenders == []


def test_sdk_imports_stay_at_their_boundary() -> None:
    offenders = []
    for name, path in modules().items():
        for library, allowed in BOUNDARIES.items():
            uses = any(m == library or m.startswith(library + ".") for m in imported(path))
            if uses and not any(name == a or name.startswith(a) for a in allowed):
                offenders.append(f"{name} imports {library}")
    assert offenders == []


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in the kit (tests/harness.py), shared fixtures in conftest.py."""
    offenders = [
        f"{path.name} imports {name}"
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        for name in sorted(imported(path))
        if name.startswith("tests.test_")
    ]
    assert offenders == []


def readme_layout() -> dict[str, set[str]]:
    """The README's Layout block: each folder of streamsvc/ and the entries listed for it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout") :]
    block = section.split("```", 2)[1]
    listed: dict[str, set[str]] = {}
    stack: list[str] = []
    folder = ""
    for line in block.splitlines()[1:]:
        head, entries = line[:15], line[15:]
        if head.strip():
            if not line.startswith(" ") and head.strip() != "streamsvc/":
                break  # tests/, benchmarks/, ...: outside the package
            depth = (len(head) - len(head.lstrip())) // 2
            stack[depth:] = [head.strip().rstrip("/")]
            folder = "/".join(stack)
            listed[folder] = set()
        listed[folder].update(re.findall(r"(?<![\w/])([\w.]+\.py|\w+/)(?=\s|$)", entries))
    return listed


def tree() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for directory in [PACKAGE, *sorted(p for p in PACKAGE.rglob("*") if p.is_dir())]:
        if directory.name == "__pycache__" or "__pycache__" in directory.parts:
            continue
        if directory != PACKAGE and not (directory / "__init__.py").exists():
            continue  # data folders (static/, image/) are entries of their parent
        entries = set()
        for child in directory.iterdir():
            if child.suffix == ".py" and not (child.name == "__init__.py" and directory != PACKAGE):
                entries.add(child.name)
            elif child.is_dir() and child.name != "__pycache__":
                entries.add(child.name + "/")
        found[str(directory.relative_to(ROOT))] = entries
    return found


def test_readme_layout_matches_the_package_tree() -> None:
    listed = readme_layout()
    actual = tree()
    assert sorted(listed) == sorted(actual), "every package folder has its row"
    for folder, entries in actual.items():
        children = {e for e in entries if e.endswith("/") and f"{folder}/{e[:-1]}" in actual}
        # A sub-package has its own row; the row of its parent need not name it again.
        assert listed[folder] | children == entries, folder


def test_readme_lists_every_benchmark_module() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = readme[readme.index("## Layout") :].split("```", 2)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("benchmarks/"))
    row = [lines[first][15:]]
    for line in lines[first + 1 :]:
        if line[:15].strip():
            break
        row.append(line[15:])
    listed = set(re.findall(r"\b(\w+\.py)\b", " ".join(row)))
    actual = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__.py"}
    assert listed == actual


#: A duration figure: "50 ms", "~0.3 s", "about 20 s". The figures live in docs/benchmarks.md.
DURATION = re.compile(
    r"\b\d+(\.\d+)?\s*(ms|µs|us)\b"  # 50 ms, 1.5 µs
    r"|(~|\babout )\s*\d+(\.\d+)?\s*(s|seconds)\b"  # ~0.3 s, about 20 s
)


def prose(path: Path) -> list[tuple[int, str]]:
    """Every comment and docstring of ``path``, with the line it starts on."""
    source = path.read_text()
    found = [
        (token.start[0], token.string)
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                found.append((node.body[0].lineno, docstring))
    return found


def test_the_duration_check_sees_comments_and_docstrings(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Fast (~0.3 s)."""\n\n\n'
        'def f() -> None:\n    """Costs 5 ms."""\n    x = "50 ms"  # about 20 s\n'
    )
    assert sorted(line for line, text in prose(sample) if DURATION.search(text)) == [1, 5, 6]


def test_no_benchmark_figures_in_comments_or_docstrings() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {found.group(0)}"
        for path in modules().values()
        for line, text in prose(path)
        if (found := DURATION.search(text))
    ]
    assert offenders == [], "figures belong in docs/benchmarks.md"


def test_scripts_check_lints_and_type_checks_every_python_file() -> None:
    """Every tracked Python file is under a folder scripts/check gives ruff and mypy."""
    check = (ROOT / "scripts" / "check").read_text()

    def folders(command: str) -> set[str]:
        line = next(line for line in check.splitlines() if command in line)
        return set(line.split(command, 1)[1].split("||")[0].split())

    mypy = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"])
    if "for example in examples/*/" in check:
        mypy.add("examples")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout.decode()
    python = [
        name
        for name in listed.split("\0")
        if name.endswith(".py")
        or (
            name.startswith("scripts/")
            and "python" in (ROOT / name).read_text()[:100].split("\n")[0]
        )
    ]
    assert python, "git ls-files found no Python file"
    for tool, covered in [
        ("ruff check", folders("ruff check")),
        ("ruff format", folders("ruff format --check")),
        ("mypy", mypy),
    ]:
        left_out = [name for name in python if name.split("/")[0] not in covered]
        assert left_out == [], f"{tool} does not see these"
