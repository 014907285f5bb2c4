"""Static analysis of connector code: the paths and env it needs, and ``{{env:KEY}}`` substitution.

The rule: nothing here executes user code (Python parsed with ``ast`` once per file up to
``AST_BUDGET_CHARS`` a request, the rest scanned as text). Over 400 lines because the parse,
its text-scan fallback and substitution share one grammar, in docs/architecture.md ("Module notes").
"""

from __future__ import annotations

import ast
import copy
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, NamedTuple, TypeAlias

__all__ = [
    "AST_BUDGET_CHARS",
    "ENV_PLACEHOLDER",
    "METADATA_KEYS",
    "Analysis",
    "ConnectorPath",
    "analyse",
    "connector_paths",
    "deep_merge",
    "json_env",
    "json_strings",
    "missing_connector_paths",
    "placeholder_growth",
    "required_env",
    "substitute_env",
    "substitute_env_text",
]

ConnectorPath: TypeAlias = tuple[str, ...]
"""Keys below the connector root, e.g. ``("configuration", "sheetName")``."""

METADATA_KEYS: Final[frozenset[str]] = frozenset(
    {
        "schemaVersion",
        "connectorType",
        "displayName",
        "description",
        "version",
        "notes",
        "files",
    }
)

_DICT_METHODS: Final = frozenset(
    {
        "clear",
        "copy",
        "fromkeys",
        "get",
        "items",
        "keys",
        "pop",
        "popitem",
        "setdefault",
        "update",
        "values",
    }
)

_KEY = r"[A-Za-z_][A-Za-z0-9_]*"

ENV_PLACEHOLDER: Final[re.Pattern[str]] = re.compile(
    rf"\{{\{{\s*env\s*:\s*(?P<key>{_KEY})\s*\}}\}}"
)
_PROCESS_ENV: Final = re.compile(
    rf"""(?<![\w$.])process\.env
        (?: \??\.(?P<name>{_KEY})(?![\w$])
          | \[\s*(?P<q>["'])(?P<quoted>{_KEY})(?P=q)\s*\] )""",
    re.VERBOSE,
)
_PY_ENVIRON: Final = re.compile(
    rf"""(?<![\w.])(?:os\.)?environ\[\s*(?P<q>["'])(?P<quoted>{_KEY})(?P=q)\s*\]"""
)
_SCAN_ROOT: Final = re.compile(
    r"""(?<![\w$.])
        (?: context (?: \??\.connector | \[\s*(?P<q>["'])connector(?P=q)\s*\] )
          | connector )
        (?![\w$])""",
    re.VERBOSE,
)
_SCAN_STEP: Final = re.compile(
    r"""\??\.(?P<name>[A-Za-z_$][\w$]*)
      | (?:\?\.)?\[\s*(?: (?P<q>["'])(?P<quoted>[^"'\\\r\n]*)(?P=q) | (?P<index>[0-9]+) )\s*\]""",
    re.VERBOSE,
)
_SCAN_CALL: Final = re.compile(r"\s*\(")
_DECIMAL: Final = re.compile(r"[0-9]+")
_ENV_KEY: Final = re.compile(_KEY)
_MAX_INDEX: Final = 2**63 - 1
_MAX_INDEX_DIGITS: Final = len(str(_MAX_INDEX))


#: Python source (characters, all files of a request together) parsed with ``ast``. A file
#: past what is left of it is scanned as text like a file that does not parse, so analysis
#: stays linear in the body with a small constant; connectors of ordinary size are parsed.
AST_BUDGET_CHARS: Final = 256 * 1024


# ---------------------------------------------------------------- one pass over the files


class Analysis(NamedTuple):
    """What the files reference: connector paths, and the env keys they read."""

    paths: set[ConnectorPath]
    env: set[str]


def analyse(files: Mapping[str, str], ast_budget: int = AST_BUDGET_CHARS) -> Analysis:
    """The connector paths and env keys of all files, each file parsed and walked
    at most once (specified in docs/architecture.md)."""
    paths: set[ConnectorPath] = set()
    env: set[str] = set()
    for name, text in files.items():
        env.update(match["key"] for match in ENV_PLACEHOLDER.finditer(text))
        env.update(match["name"] or match["quoted"] for match in _PROCESS_ENV.finditer(text))
        if not _is_python(name):
            paths |= _scanned_paths(text)
            continue
        wants_paths, wants_environ = "connector" in text, "environ" in text
        if not (wants_paths or wants_environ):
            continue  # neither a root nor an environ read can occur
        tree = None
        if len(text) <= ast_budget:
            ast_budget -= len(text)
            tree = _parse_python(text)
        if tree is not None:
            _walk(tree, paths if wants_paths else None, env if wants_environ else None)
            continue
        if wants_paths:
            paths |= _scanned_paths(text)
        if wants_environ:
            env.update(match["quoted"] for match in _PY_ENVIRON.finditer(text))
    paths.discard(())
    return Analysis(paths, env)


_CHAIN_NODES: Final = (ast.Attribute, ast.Subscript, ast.Call)
"""The only node types that can end a non-empty chain or read ``environ``."""


def _walk(tree: ast.AST, paths: set[ConnectorPath] | None, env: set[str] | None) -> None:
    """Add the tree's connector paths (longest of every chain) and environ keys.
    ``ast.walk`` visits outer nodes first, so the inner links of a chain are
    known before they are visited and skipped."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if not isinstance(node, _CHAIN_NODES):
            continue
        if env is not None and isinstance(node, ast.Subscript) and (key := _environ_key(node)):
            env.add(key)
        if paths is None:
            continue
        if isinstance(node, ast.Call):
            skipped.add(node.func)  # a called attribute is a method, not a key
        if node in skipped:
            continue
        path, links = _unwind(node)
        skipped.update(links)
        if path is not None:
            paths.add(path)


# ---------------------------------------------------------------- connector paths


def connector_paths(files: Mapping[str, str]) -> set[ConnectorPath]:
    """The connector paths the files reference (specified in docs/architecture.md)."""
    return analyse(files).paths


def _is_python(filename: str) -> bool:
    return filename.lower().endswith(".py")


def _parse_python(source: str) -> ast.Module | None:
    """The module's syntax tree, or None when it does not parse."""
    try:
        with warnings.catch_warnings():
            # e.g. DeprecationWarning for invalid escape sequences in user code
            warnings.simplefilter("ignore")
            return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # CPython's parser raises MemoryError for very deep nesting (``x = ----...1``).
        return None


def _unwind(node: ast.AST) -> tuple[ConnectorPath | None, list[ast.AST]]:
    """Follow ``node`` inwards to a connector root.

    Returns the path (None if the chain reaches no root) and the nodes passed
    on the way: their own chains are prefixes of this one, or fail the same way.
    """
    segments: list[str] = []
    links: list[ast.AST] = []
    current = node
    while not _is_root(current):
        step = _step(current)
        if step is None:
            return None, links
        links.append(current)
        segment, current = step
        segments.append(segment)
    return tuple(reversed(segments)), links


def _is_root(node: ast.AST) -> bool:
    match node:
        case ast.Name(id="connector"):
            return True
        case ast.Attribute(value=ast.Name(id="context"), attr="connector"):
            return True
        case ast.Subscript(value=ast.Name(id="context"), slice=ast.Constant(value="connector")):
            return True
        case ast.Call(
            func=ast.Attribute(value=ast.Name(id="context"), attr="get"),
            args=[ast.Constant(value="connector"), *rest],
            keywords=[],
        ):
            return len(rest) <= 1
    return False


def _step(node: ast.AST) -> tuple[str, ast.expr] | None:
    """The key a node reads from the expression inside it, and that expression."""
    match node:
        case ast.Attribute(value=inner, attr=attr, ctx=ast.Load()):
            return None if attr in _DICT_METHODS else (attr, inner)
        case ast.Subscript(value=inner, slice=ast.Constant(value=key), ctx=ast.Load()):
            segment = _constant_segment(key)
            return None if segment is None else (segment, inner)
        case ast.Call(
            func=ast.Attribute(value=inner, attr="get"),
            args=[ast.Constant(value=str() as key), *rest],
            keywords=[],
        ):
            return None if len(rest) > 1 else (key, inner)
    return None


def _constant_segment(value: object) -> str | None:
    """A subscript constant as a path segment: a string, or a list index."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INDEX:
        return str(value)  # a larger index is never in range (and may not print: 4,300 digits)
    return None


def _scanned_paths(text: str) -> set[ConnectorPath]:
    return {_scan_chain(text, root.end()) for root in _SCAN_ROOT.finditer(text)}


def _scan_chain(text: str, position: int) -> ConnectorPath:
    segments: list[str] = []
    while (step := _SCAN_STEP.match(text, position)) is not None:
        segment = _scan_segment(step)
        if segment is None or _SCAN_CALL.match(text, step.end()):
            break
        segments.append(segment)
        position = step.end()
    return tuple(segments)


def _scan_segment(step: re.Match[str]) -> str | None:
    name = step["name"]
    if name is not None:
        return None if name in _DICT_METHODS else name
    quoted: str | None = step["quoted"]
    return quoted if quoted is not None else step["index"]


# ---------------------------------------------------------------- missing paths


def missing_connector_paths(
    connector: Mapping[str, Any], paths: Iterable[ConnectorPath]
) -> list[str]:
    """Dotted paths the connector JSON lacks (specified in docs/architecture.md)."""
    missing = {
        path
        for path in paths
        if path and path[0] not in METADATA_KEYS and not _resolves(connector, path)
    }
    return sorted(".".join(path) for path in _not_extended(missing))


def _resolves(value: Any, path: ConnectorPath) -> bool:
    for segment in path:
        if isinstance(value, Mapping):
            if segment not in value:
                return False
            value = value[segment]
        elif isinstance(value, list | tuple):
            index = _list_index(segment)
            if index is None or index >= len(value):
                return False
            value = value[index]
        else:
            return False
    return True


def _list_index(segment: str) -> int | None:
    """A segment as a list index: ASCII digits, at most as many as ``_MAX_INDEX`` has
    (a longer one is never in range, and ``int`` refuses 4,300 digits and more)."""
    if len(segment) > _MAX_INDEX_DIGITS or not _DECIMAL.fullmatch(segment):
        return None
    return int(segment)


def _not_extended(paths: Iterable[ConnectorPath]) -> list[ConnectorPath]:
    """The paths no other path extends. Sorted, a path's extensions follow it
    directly, so each path is compared with its successor only (not with all)."""
    ordered = sorted(paths)
    return [
        path
        for index, path in enumerate(ordered)
        if index + 1 == len(ordered) or ordered[index + 1][: len(path)] != path
    ]


# ---------------------------------------------------------------- environment


def required_env(files: Mapping[str, str], values: Any) -> set[str]:
    """Environment variables the connector needs (specified in docs/architecture.md)."""
    return analyse(files).env | json_env(values)


def json_env(values: Any) -> set[str]:
    """The keys of the ``{{env:KEY}}`` placeholders in a JSON value's strings."""
    return {
        match["key"] for text in json_strings(values) for match in ENV_PLACEHOLDER.finditer(text)
    }


def json_strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value (not dict keys), without recursion."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)


def _environ_key(node: ast.AST) -> str | None:
    """KEY when the node reads ``os.environ["KEY"]`` or ``environ["KEY"]``."""
    match node:
        case ast.Subscript(
            value=ast.Attribute(value=ast.Name(id="os"), attr="environ") | ast.Name(id="environ"),
            slice=ast.Constant(value=str() as key),
            ctx=ast.Load(),
        ) if _ENV_KEY.fullmatch(key):
            return key
    return None


def substitute_env(value: Any, env: Mapping[str, str]) -> Any:
    """A copy of a JSON value with ``{{env:KEY}}`` replaced in every string."""
    if isinstance(value, str):
        return substitute_env_text(value, env)
    if isinstance(value, Mapping):
        return {key: substitute_env(item, env) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [substitute_env(item, env) for item in value]
    return value


def placeholder_growth(text: str, sizes: Mapping[str, int]) -> tuple[int, int]:
    """How many known ``{{env:KEY}}`` a text holds, and how many UTF-8 bytes
    substituting them adds (``sizes`` maps each key to its value's size),
    computed without building the substituted text."""
    count = growth = 0
    for match in ENV_PLACEHOLDER.finditer(text):
        size = sizes.get(match["key"])
        if size is not None:
            count += 1
            growth += size - len(match[0].encode())
    return count, growth


def substitute_env_text(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every known ``{{env:KEY}}`` replaced; unknown keys stay."""
    return ENV_PLACEHOLDER.sub(lambda match: env.get(match["key"], match[0]), text)


# ---------------------------------------------------------------- overrides


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: ``overrides`` laid over ``base``.

    Where both sides hold a dict the two merge recursively; any other override
    value (lists and ``null`` included) replaces. The inputs are not modified
    and share nothing with the result.
    """
    return copy.deepcopy(_merge(base, overrides))


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(current, value)
        else:
            merged[key] = value
    return merged


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest = 0
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            pending.extend((child, depth + 1) for child in item)
    return deepest
