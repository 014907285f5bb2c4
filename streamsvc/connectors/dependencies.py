"""Parsing and validation of ``connector.runtime.dependencies`` (three accepted forms).

The contract is deliberately narrow and every problem is reported; the normalised result is a
cache key. The rule: no input text reaches pip verbatim. The full contract is in
docs/architecture.md ("Module notes", ``connectors/dependencies.py``).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, TypeAlias

import msgspec
from packaging.specifiers import InvalidSpecifier, Specifier
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from streamsvc.errors import Problem

__all__ = [
    "DEPENDENCIES_PATH",
    "MAX_DEPENDENCIES",
    "MAX_NAME_LENGTH",
    "MAX_TEXT_LENGTH",
    "Dependency",
    "dependency_key",
    "parse_dependencies",
]

DEPENDENCIES_PATH: Final = "connector.runtime.dependencies"
MAX_DEPENDENCIES: Final = 50
MAX_NAME_LENGTH: Final = 100
MAX_TEXT_LENGTH: Final = 200

_INVALID: Final = "invalid_dependency"
_OBJECT_KEYS: Final = frozenset({"name", "version"})
_ANY_VERSION: Final = frozenset({"", "*"})

_NAME: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_NAME_WITH_EXTRAS: Final = re.compile(r"(?P<name>[^\[\] <>=!~]+) *(?:\[(?P<extras>[^\]]*)\])?")
_REQUIREMENT: Final = re.compile(rf"{_NAME_WITH_EXTRAS.pattern} *(?P<specifier>[<>=!~].*)?")
_UNSAFE_CHARACTER: Final = re.compile(r"[^A-Za-z0-9._\-\[\],<>=!~*+ ]")
_SIMPLE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_HINTS: Final = {
    ";": "environment markers are not allowed",
    "@": "direct references (name @ URL) are not allowed",
    "/": "URLs and paths are not allowed",
    "\\": "paths are not allowed",
    ":": "URLs are not allowed",
}


class Dependency(msgspec.Struct, frozen=True):
    """One validated, normalised dependency."""

    name: str
    """Canonical name, e.g. ``typing-extensions``."""
    extras: tuple[str, ...] = ()
    """Canonical extras, sorted."""
    specifier: str = ""
    """Normalised specifier set, e.g. ``<3,>=2``; ``""`` for any version."""

    @property
    def requirement(self) -> str:
        """The pip requirement, e.g. ``requests==2.32.3`` or ``foo[bar]<2,>=1``."""
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"{self.name}{extras}{self.specifier}"


def dependency_key(deps: Sequence[Dependency]) -> str:
    """A stable string for a set of dependencies: sorted requirements, one per line."""
    return "\n".join(sorted({dep.requirement for dep in deps}))


def parse_dependencies(
    raw: Any,
    path: str = DEPENDENCIES_PATH,
    *,
    max_count: int = MAX_DEPENDENCIES,
) -> tuple[list[Dependency], list[Problem]]:
    """The valid dependencies, sorted by name, and every problem found.

    Callers must reject the request when the problem list is not empty; the
    dependency list then holds only the entries that were valid.
    """
    if raw is None:
        return [], []
    if not isinstance(raw, list | Mapping):
        message = "must be an array of requirements or an object mapping names to versions"
        return [], [Problem(_INVALID, path, message)]
    problems: list[Problem] = []
    if len(raw) > max_count:
        message = f"at most {max_count} dependencies are allowed, got {len(raw)}"
        problems.append(Problem("too_many_dependencies", path, message))
    found: dict[str, Dependency] = {}
    for entry_path, parsed in itertools.islice(_parsed_entries(raw, path), max_count):
        if isinstance(parsed, list):
            problems.extend(parsed)
        elif parsed.name in found:
            message = f"{parsed.name!r} is listed more than once"
            problems.append(Problem("duplicate_dependency", entry_path, message))
        else:
            found[parsed.name] = parsed
    return sorted(found.values(), key=lambda dep: dep.name), problems


# ---------------------------------------------------------------- the three forms

_Name: TypeAlias = tuple[str, tuple[str, ...]]
"""A canonical name and its canonical, sorted extras."""
_Parsed: TypeAlias = Dependency | list[Problem]
"""What one entry parses to."""


def _parsed_entries(raw: list[Any] | Mapping[Any, Any], path: str) -> Iterator[tuple[str, _Parsed]]:
    """Each entry's path and what it parses to, lazily."""
    if isinstance(raw, Mapping):
        for key, version in raw.items():
            entry_path = _key_path(path, key)
            yield entry_path, _parse_map_entry(entry_path, key, version)
    else:
        for index, item in enumerate(raw):
            entry_path = f"{path}[{index}]"
            yield entry_path, _parse_list_item(entry_path, item)


def _key_path(path: str, key: object) -> str:
    if isinstance(key, str) and _SIMPLE_KEY.fullmatch(key):
        return f"{path}.{key}"
    shown = json.dumps(key) if isinstance(key, str) else repr(key)
    return f"{path}[{shown}]"


def _parse_map_entry(path: str, name: object, version: object) -> _Parsed:
    return _combine(_parse_name(path, name), _parse_version(path, version))


def _parse_list_item(path: str, item: object) -> _Parsed:
    if isinstance(item, str):
        return _parse_requirement(path, item)
    if isinstance(item, Mapping):
        return _parse_object(path, item)
    message = 'must be a requirement string or an object like {"name": ..., "version": ...}'
    return [Problem(_INVALID, path, message)]


def _parse_object(path: str, item: Mapping[Any, Any]) -> _Parsed:
    problems: list[Problem] = []
    unknown = sorted(repr(key) for key in item if key not in _OBJECT_KEYS)
    if unknown:
        message = f"unknown keys {', '.join(unknown)}; allowed are 'name' and 'version'"
        problems.append(Problem(_INVALID, path, message))
    name_path = f"{path}.name"
    name = (
        _parse_name(name_path, item["name"])
        if "name" in item
        else Problem(_INVALID, name_path, "is required")
    )
    parsed = _combine(name, _parse_version(f"{path}.version", item.get("version")))
    if isinstance(parsed, list):
        return problems + parsed
    return problems or parsed


def _parse_requirement(path: str, text: str) -> _Parsed:
    """A requirement string: name, optional extras, optional specifier set."""
    problem = _check_text(path, text)
    if problem is not None:
        return [problem]
    match = _REQUIREMENT.fullmatch(text)
    if match is None:
        message = (
            f"{_shown(text)} is not a requirement like 'name', 'name==1.0' or 'name[extra]>=1'"
        )
        return [Problem(_INVALID, path, message)]
    name = _name_and_extras(path, text, match["name"], match["extras"])
    specifier = _parse_specifier(path, match["specifier"] or "")
    return _combine(name, specifier)


def _combine(name: _Name | Problem, specifier: str | Problem) -> _Parsed:
    if isinstance(name, Problem) or isinstance(specifier, Problem):
        return [part for part in (name, specifier) if isinstance(part, Problem)]
    canonical, extras = name
    return Dependency(name=canonical, extras=extras, specifier=specifier)


# ---------------------------------------------------------------- the parts


def _check_text(path: str, text: str) -> Problem | None:
    """A problem when text is empty, too long or uses a character not allowed."""
    if not text.strip():
        return Problem(_INVALID, path, "must not be empty")
    if len(text) > MAX_TEXT_LENGTH:
        return Problem(_INVALID, path, f"is longer than {MAX_TEXT_LENGTH} characters")
    if text.startswith("-"):
        return Problem(_INVALID, path, f"{_shown(text)}: pip options are not allowed")
    unsafe = _UNSAFE_CHARACTER.search(text)
    if unsafe is not None:
        hint = _HINTS.get(unsafe[0], f"character {unsafe[0]!r} is not allowed")
        return Problem(_INVALID, path, f"{_shown(text)}: {hint}")
    if text != text.strip(" "):
        return Problem(_INVALID, path, f"{_shown(text)}: leading or trailing spaces")
    return None


def _parse_name(path: str, value: object) -> _Name | Problem:
    """A name with optional extras, as in the object and map forms."""
    if not isinstance(value, str):
        return Problem(_INVALID, path, "the name must be a string")
    problem = _check_text(path, value)
    if problem is not None:
        return problem
    match = _NAME_WITH_EXTRAS.fullmatch(value)
    if match is None:
        return Problem(
            _INVALID, path, f"{_shown(value)} is not a name like 'name' or 'name[extra]'"
        )
    return _name_and_extras(path, value, match["name"], match["extras"])


def _name_and_extras(path: str, text: str, name: str, extras: str | None) -> _Name | Problem:
    if len(name) > MAX_NAME_LENGTH:
        return Problem(_INVALID, path, f"the name is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        return Problem(_INVALID, path, f"{_shown(text)}: {name!r} is not a valid package name")
    extra_names = [extra.strip(" ") for extra in extras.split(",")] if extras else []
    bad = [extra for extra in extra_names if not _NAME.fullmatch(extra)]
    if bad:
        return Problem(_INVALID, path, f"{_shown(text)}: invalid extra {bad[0]!r}")
    canonical_extras = tuple(sorted({canonicalize_name(extra) for extra in extra_names}))
    return canonicalize_name(name), canonical_extras


def _parse_version(path: str, value: object) -> str | Problem:
    """The object and map forms' version: any, a bare version, or a specifier set."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return Problem(_INVALID, path, 'the version must be a string such as "2.32.3" or ">=2,<3"')
    if value in _ANY_VERSION:
        return ""
    problem = _check_text(path, value)
    if problem is not None:
        return problem
    try:
        return f"=={Version(value)}"
    except InvalidVersion:
        return _parse_specifier(path, value)


def _parse_specifier(path: str, text: str) -> str | Problem:
    """A normalised specifier set: sorted, de-duplicated, comma-separated."""
    if not text:
        return ""
    try:
        specifiers = {_normal_specifier(part) for part in text.split(",")}
    except (InvalidSpecifier, InvalidVersion):
        message = f"{_shown(text)} is not a version or a specifier set like '>=2,<3' or '~=2.3'"
        return Problem(_INVALID, path, message)
    if any(specifier.startswith("===") for specifier in specifiers):
        return Problem(_INVALID, path, f"{_shown(text)}: arbitrary equality (===) is not allowed")
    return ",".join(sorted(specifiers))


def _normal_specifier(text: str) -> str:
    specifier = Specifier(text.strip(" "))
    version = specifier.version
    if specifier.operator == "===":
        return f"==={version}"
    if version.endswith(".*"):
        return f"{specifier.operator}{Version(version[:-2])}.*"
    return f"{specifier.operator}{Version(version)}"


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
