"""POST /execute-connector requests: their shape, their validation, their plan.

``plan`` checks everything before any container exists and either returns a
``RunSpec`` or raises one 400 that lists every problem found (each with a
stable ``code`` and its ``path``), not just the first:

``unsupported_language``, ``unsafe_file_name``, ``too_many_files``,
``file_too_large``, ``entry_point_not_found``, ``out_of_range``,
``invalid_dependency`` (and ``too_many_dependencies``,
``duplicate_dependency``), ``invalid_env_name``, ``reserved_env_name``,
``network_not_allowed``, ``missing_connector_paths`` and ``missing_env``.
When every problem has one code, that is the error's code; otherwise it is
``invalid_connector``. Wrong JSON types are a 422 with the JSON path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from .analysis import (
    connector_paths,
    deep_merge,
    missing_connector_paths,
    required_env,
    substitute_env,
    substitute_env_text,
)
from .bodies import JsonDecoder
from .dependencies import parse_dependencies
from .errors import Problem, RequestError, ValidationFailed
from .sandbox import RunSpec
from .settings import Settings

SUPPORTED_LANGUAGES = ("python",)
DEFAULT_TIMEOUT_MS = 30_000
DEFAULT_MEMORY_MB = 256
MAX_ENV = 200
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RESERVED_ENV = ("STREAMSVC_", "PYTHONPATH", "PYTHONHOME", "LD_")
_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]*\Z")

EnvValue = Annotated[str, msgspec.Meta(max_length=64 * 1024)]


class ExecuteRequest(msgspec.Struct, forbid_unknown_fields=True):
    connector: dict[str, Any]
    env: Annotated[dict[str, EnvValue], msgspec.Meta(max_length=MAX_ENV)] = {}
    configuration_overrides: dict[str, Any] = {}
    network_mode: Literal["bridge", "none"] = "none"
    stream: bool | None = None


class Runtime(msgspec.Struct, rename="camel"):
    entry_point: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    language: Annotated[str, msgspec.Meta(max_length=64)] = "python"
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    memory_mb: int = DEFAULT_MEMORY_MB
    dependencies: Any = None


class ConnectorCore(msgspec.Struct):
    """The connector's keys the engine reads; any other top-level key is kept as is."""

    runtime: Runtime
    files: dict[str, str]
    configuration: dict[str, Any] = {}


request_decoder = JsonDecoder(ExecuteRequest)


def _core(connector: dict[str, Any]) -> ConnectorCore:
    try:
        return msgspec.convert(connector, ConnectorCore)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).rpartition(" - at `$")
        if not where:
            message, where = str(exc), "`"
        raise ValidationFailed(message, path="$.connector" + where.rstrip("`")) from None


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a safe relative path, or ``None`` when it is."""
    if not name or len(name) > 255:
        return "must be 1 to 255 characters"
    if "\x00" in name or "\\" in name:
        return "must not contain NUL or backslashes"
    if name.startswith("/"):
        return "must be a relative path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "must not contain empty, '.' or '..' segments"
    if parts[0] == ".streamsvc":
        return "'.streamsvc' is reserved for the runner"
    if not all(_FILE_PART.match(part) for part in parts):
        return "segments may hold letters, digits, '_', '-', '.', ' ' and not start with '.'"
    return None


def _file_problems(core: ConnectorCore, settings: Settings) -> list[Problem]:
    problems: list[Problem] = []
    if len(core.files) > settings.streamsvc_max_files:
        problems.append(
            Problem("too_many_files", "connector.files", f"at most {settings.streamsvc_max_files}")
        )
    for name, text in core.files.items():
        path = f"connector.files.{name}"
        reason = file_name_problem(name)
        if reason:
            problems.append(Problem("unsafe_file_name", path, f"file name {reason}"))
        if len(text.encode()) > settings.streamsvc_max_file_bytes:
            problems.append(
                Problem(
                    "file_too_large", path, f"larger than {settings.streamsvc_max_file_bytes} bytes"
                )
            )
    if core.runtime.entry_point not in core.files:
        problems.append(
            Problem(
                "entry_point_not_found",
                "connector.runtime.entryPoint",
                f"{core.runtime.entry_point!r} is not one of connector.files",
            )
        )
    return problems


def _runtime_problems(
    runtime: Runtime, request: ExecuteRequest, settings: Settings
) -> list[Problem]:
    problems: list[Problem] = []
    if runtime.language not in SUPPORTED_LANGUAGES:
        problems.append(
            Problem(
                "unsupported_language",
                "connector.runtime.language",
                f"{runtime.language!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_LANGUAGES)}",
            )
        )
    bounds = {
        "timeoutMs": (runtime.timeout_ms, 1, settings.streamsvc_max_timeout_ms),
        "memoryMb": (
            runtime.memory_mb,
            settings.streamsvc_min_memory_mb,
            settings.streamsvc_max_memory_mb,
        ),
    }
    for name, (value, low, high) in bounds.items():
        if not low <= value <= high:
            problems.append(
                Problem("out_of_range", f"connector.runtime.{name}", f"must be {low} to {high}")
            )
    if request.network_mode == "bridge" and not settings.streamsvc_allow_bridge:
        problems.append(
            Problem(
                "network_not_allowed",
                "network_mode",
                "network_mode 'bridge' is disabled on this server (STREAMSVC_ALLOW_BRIDGE)",
            )
        )
    for key in request.env:
        if not _ENV_NAME.match(key):
            problems.append(Problem("invalid_env_name", f"env.{key}", "not a valid variable name"))
        elif key.upper().startswith(_RESERVED_ENV):
            problems.append(Problem("reserved_env_name", f"env.{key}", "reserved by the runner"))
    return problems


def plan(request: ExecuteRequest, settings: Settings) -> RunSpec:
    """Validate a request completely and turn it into a ``RunSpec``."""
    core = _core(request.connector)
    problems = _file_problems(core, settings)
    problems += _runtime_problems(core.runtime, request, settings)
    dependencies, dependency_problems = parse_dependencies(core.runtime.dependencies)
    problems += dependency_problems

    connector = dict(request.connector)
    connector["configuration"] = deep_merge(core.configuration, request.configuration_overrides)
    missing_paths = missing_connector_paths(connector, connector_paths(core.files))
    for path in missing_paths:
        problems.append(
            Problem("missing_connector_paths", f"connector.{path}", "referenced by the code")
        )
    without_files = {key: value for key, value in connector.items() if key != "files"}
    missing_env = sorted(required_env(core.files, without_files) - request.env.keys())
    for key in missing_env:
        problems.append(Problem("missing_env", f"env.{key}", "required by the connector"))
    if problems:
        raise _rejection(problems, missing_paths, missing_env)

    return RunSpec(
        files={name: substitute_env_text(text, request.env) for name, text in core.files.items()},
        entry_point=core.runtime.entry_point,
        env=dict(request.env),
        context={"connector": substitute_env(without_files, request.env)},
        dependencies=tuple(dependencies),
        memory_mb=core.runtime.memory_mb,
        timeout_ms=core.runtime.timeout_ms,
        network=request.network_mode,
    )


def _rejection(
    problems: list[Problem], missing_paths: list[str], missing_env: list[str]
) -> RequestError:
    codes = {problem.code for problem in problems}
    code = codes.pop() if len(codes) == 1 else "invalid_connector"
    details: dict[str, Any] = {"problems": problems}
    if missing_paths:
        details["missing_connector_paths"] = missing_paths
    if missing_env:
        details["missing_env"] = missing_env
    summary = "; ".join(f"{p.path}: {p.message}" for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return RequestError(
        f"the connector cannot run: {summary}{more}",
        code=code,
        path=problems[0].path,
        details=details,
    )
