"""POST /execute-connector requests: their shape, their validation, their plan.

The rule: ``plan`` checks everything before any container exists and returns a ``RunSpec`` or
raises one 400 listing every problem (codes in docs/architecture.md, "Module notes"). Over 400
lines because the shape, every check with its bound and the off-loop plan are one concern.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Annotated, Any, Literal

import anyio
import msgspec
from anyio import to_process

from streamsvc.connectors.analysis import (
    analyse,
    deep_merge,
    json_depth,
    json_env,
    json_strings,
    missing_connector_paths,
    placeholder_growth,
    substitute_env,
    substitute_env_text,
)
from streamsvc.connectors.dependencies import parse_dependencies
from streamsvc.errors import (
    ConnectorTooComplex,
    Problem,
    RequestError,
    ServiceError,
    ValidationFailed,
)
from streamsvc.sandbox.types import RunSpec
from streamsvc.settings import SandboxSettings
from streamsvc.web.bodies import JsonDecoder

SUPPORTED_LANGUAGES = ("python",)
DEFAULT_TIMEOUT_MS = 30_000
DEFAULT_MEMORY_MB = 256
MAX_ENV = 200
MAX_ENV_BYTES = 64 * 1024
MAX_JSON_DEPTH = 64
#: Distinct connector paths the files may reference, and ``{{env:KEY}}`` placeholders.
MAX_REFERENCES = 10_000
MAX_PLACEHOLDERS = 10_000
#: A body up to this size is planned on the event loop (its worst case costs a few ms of
#: CPU); a larger one in a worker process, given ``PLAN_TIMEOUT_S`` before it is killed.
INLINE_PLAN_BYTES = 2 * 1024
PLAN_TIMEOUT_S = 10.0
PLANNER_NICE = 10
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RESERVED_ENV = ("STREAMSVC_", "PYTHONPATH", "PYTHONHOME", "LD_")
#: Set in every sandbox, so code reading them needs nothing from ``env``
#: (``os.environ["STREAMSVC_CONTEXT_FILE"]`` is how a program finds its context).
SANDBOX_ENV = frozenset({"HOME", "PATH", "HOSTNAME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"})
_AT = re.compile(r" - at `\$([^`]*)`$")
_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]*\Z")

EnvValue = Annotated[str, msgspec.Meta(max_length=MAX_ENV_BYTES)]


class ExecuteRequest(msgspec.Struct, forbid_unknown_fields=True):
    connector: dict[str, Any]
    env: Annotated[dict[str, EnvValue], msgspec.Meta(max_length=MAX_ENV)] = {}
    configuration_overrides: dict[str, Any] = {}
    network_mode: Literal["bridge", "none"] = "none"
    stream: bool | None = None
    #: Answer 202 at once; the run goes on without a reader (``GET /runs/{id}``).
    background: bool = False


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


def decode_request(body: bytes) -> ExecuteRequest:
    """The request, or a 400/422 naming the offending ``env`` key when there is one."""
    try:
        return request_decoder.decode_body(body)
    except ValidationFailed as exc:
        if exc.path == "$.env[...]":  # msgspec does not name dict keys
            with contextlib.suppress(msgspec.DecodeError, RecursionError):
                raw = msgspec.json.decode(body)
                exc.path = _offending_key("$.env", raw.get("env"), EnvValue) or exc.path
        raise


def _offending_key(prefix: str, mapping: Any, value_type: Any) -> str | None:
    """The path of the first value of ``mapping`` that is not a ``value_type``."""
    if isinstance(mapping, dict):
        for key, value in mapping.items():
            try:
                msgspec.convert(value, value_type)
            except msgspec.ValidationError:
                return f"{prefix}.{key}"
    return None


def _core(connector: dict[str, Any]) -> ConnectorCore:
    try:
        return msgspec.convert(connector, ConnectorCore)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.search(text)
        where = match.group(1) if match else ""
        path = "$.connector" + where
        if where == ".files[...]":
            path = _offending_key("$.connector.files", connector.get("files"), str) or path
        raise ValidationFailed(text[: match.start()] if match else text, path=path) from None


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


def _file_problems(core: ConnectorCore, settings: SandboxSettings) -> list[Problem]:
    problems: list[Problem] = []
    if len(core.files) > settings.max_files:
        problems.append(
            Problem("too_many_files", "connector.files", f"at most {settings.max_files}")
        )
    for name, text in core.files.items():
        path = f"connector.files.{name}"
        reason = file_name_problem(name)
        if reason:
            problems.append(Problem("unsafe_file_name", path, f"file name {reason}"))
        if len(text.encode()) > settings.max_file_bytes:
            problems.append(
                Problem("file_too_large", path, f"larger than {settings.max_file_bytes} bytes")
            )
    for name in sorted(_directories(core.files) & core.files.keys()):
        problems.append(
            Problem(
                "file_name_conflict",
                f"connector.files.{name}",
                f"{name!r} is both a file and the directory of another file",
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


def _directories(files: dict[str, str]) -> set[str]:
    """Every directory the file names imply: ``a/b/c.py`` gives ``a`` and ``a/b``."""
    found: set[str] = set()
    for name in files:
        parts = name.split("/")[:-1]
        found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return found


def _runtime_problems(
    runtime: Runtime, request: ExecuteRequest, settings: SandboxSettings
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
        "timeoutMs": (runtime.timeout_ms, 1, settings.max_timeout_ms),
        "memoryMb": (
            runtime.memory_mb,
            settings.min_memory_mb,
            settings.max_memory_mb,
        ),
    }
    for name, (value, low, high) in bounds.items():
        if not low <= value <= high:
            problems.append(
                Problem("out_of_range", f"connector.runtime.{name}", f"must be {low} to {high}")
            )
    if request.network_mode == "bridge" and not settings.allow_bridge:
        problems.append(
            Problem(
                "network_not_allowed",
                "network_mode",
                "network_mode 'bridge' is disabled on this server (STREAMSVC_ALLOW_BRIDGE)",
            )
        )
    return problems


def _env_problems(env: dict[str, str]) -> list[Problem]:
    problems: list[Problem] = []
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            problems.append(Problem("invalid_env_name", f"env.{key}", "not a valid variable name"))
        elif key.upper().startswith(_RESERVED_ENV):
            problems.append(Problem("reserved_env_name", f"env.{key}", "reserved by the runner"))
        if "\x00" in value:
            problems.append(Problem("invalid_env_value", f"env.{key}", "contains a NUL character"))
    size = sum(len(key.encode()) + len(value.encode()) for key, value in env.items())
    if size > MAX_ENV_BYTES:
        problems.append(
            Problem(
                "env_too_large", "env", f"{size} bytes of keys and values; at most {MAX_ENV_BYTES}"
            )
        )
    return problems


def _depth_problems(request: ExecuteRequest) -> list[Problem]:
    return [
        Problem("too_deeply_nested", path, f"nested deeper than {MAX_JSON_DEPTH} levels")
        for path, value in (
            ("connector", request.connector),
            ("configuration_overrides", request.configuration_overrides),
        )
        if json_depth(value) > MAX_JSON_DEPTH
    ]


def plan(request: ExecuteRequest, settings: SandboxSettings, max_body_bytes: int) -> RunSpec:
    """Validate a request completely and turn it into a ``RunSpec``.

    Its cost is linear in the body, but parsing megabytes of code takes
    seconds: the server calls ``plan_body`` in a worker process instead.
    """
    core = _core(request.connector)
    problems = _file_problems(core, settings)
    analysed = _analysed_files(core.files, settings)
    problems += _runtime_problems(core.runtime, request, settings)
    problems += _env_problems(request.env)
    dependencies, dependency_problems = parse_dependencies(core.runtime.dependencies)
    problems += dependency_problems
    if dependencies and not settings.allow_bridge:
        # An install needs the package index; with no bridge allowed it has no network.
        problems.append(
            Problem(
                "install_network_not_allowed",
                "connector.runtime.dependencies",
                "installing dependencies needs network_mode 'bridge', which is disabled"
                " on this server (STREAMSVC_ALLOW_BRIDGE)",
            )
        )
    too_deep = _depth_problems(request)
    if too_deep:  # merging and scanning recurse: report what is known and stop
        raise _rejection(problems + too_deep, [], [])

    connector = dict(request.connector)
    connector["configuration"] = deep_merge(core.configuration, request.configuration_overrides)
    analysis = analyse(analysed)
    paths = analysis.paths
    missing_paths: list[str] = []
    if len(paths) > MAX_REFERENCES:
        problems.append(
            Problem(
                "too_many_references",
                "connector.files",
                f"{len(paths)} distinct connector paths referenced; at most {MAX_REFERENCES}",
            )
        )
    else:
        missing_paths = missing_connector_paths(connector, paths)
    for path in missing_paths:
        problems.append(
            Problem("missing_connector_paths", f"connector.{path}", "referenced by the code")
        )
    without_files = {key: value for key, value in connector.items() if key != "files"}
    required = (analysis.env | json_env(without_files)) - SANDBOX_ENV
    missing_env = sorted(
        key for key in required - request.env.keys() if not key.startswith("STREAMSVC_")
    )
    for key in missing_env:
        problems.append(Problem("missing_env", f"env.{key}", "required by the connector"))
    problems += _expansion_problems(
        core.files, without_files, request.env, settings, max_body_bytes
    )
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


def _analysed_files(files: dict[str, str], settings: SandboxSettings) -> dict[str, str]:
    """The files worth analysing: none when there are too many, and never one
    refused already (an unsafe name, over the size cap)."""
    if len(files) > settings.max_files:
        return {}
    return {
        name: text
        for name, text in files.items()
        if file_name_problem(name) is None and len(text.encode()) <= settings.max_file_bytes
    }


def _expansion_problems(
    files: dict[str, str],
    values: dict[str, Any],
    env: dict[str, str],
    settings: SandboxSettings,
    max_body_bytes: int,
) -> list[Problem]:
    """The caps ``{{env:KEY}}`` substitution must respect, checked before it is done:
    ``MAX_PLACEHOLDERS`` in all, each file within the per-file cap after it, and
    files and connector JSON together within the body cap."""
    sizes = {key: len(value.encode()) for key, value in env.items()}
    problems: list[Problem] = []
    placeholders = total = 0
    for name, text in files.items():
        count, growth = placeholder_growth(text, sizes)
        size = len(text.encode()) + growth
        placeholders += count
        total += size
        if count and size > settings.max_file_bytes:
            problems.append(
                Problem(
                    "expanded_too_large",
                    f"connector.files.{name}",
                    f"{size} bytes once {{{{env:...}}}} is substituted; "
                    f"at most {settings.max_file_bytes}",
                )
            )
    for text in json_strings(values):
        count, growth = placeholder_growth(text, sizes)
        placeholders += count
        total += len(text.encode()) + growth
    if placeholders > MAX_PLACEHOLDERS:
        problems.append(
            Problem(
                "too_many_placeholders",
                "connector",
                f"{placeholders} {{{{env:...}}}} placeholders; at most {MAX_PLACEHOLDERS}",
            )
        )
    if placeholders and total > max_body_bytes:
        problems.append(
            Problem(
                "expanded_too_large",
                "connector",
                f"{total} bytes once {{{{env:...}}}} is substituted; at most {max_body_bytes}",
            )
        )
    return problems


def plan_body(body: bytes, settings: SandboxSettings, max_body_bytes: int) -> RunSpec | _Refusal:
    """``plan`` of a raw body, for a worker process: a refusal comes back as data
    (an exception's keyword arguments do not survive pickling). The worker runs
    at ``PLANNER_NICE`` so that the event loop wins a contended CPU."""
    with contextlib.suppress(OSError):  # not allowed to go lower when already higher
        os.setpriority(os.PRIO_PROCESS, 0, max(PLANNER_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
    try:
        return plan(decode_request(body), settings, max_body_bytes)
    except ServiceError as exc:
        return _Refusal(type(exc), exc.message, exc.code, exc.status, exc.path, exc.details)


@dataclasses.dataclass(frozen=True)
class _Refusal:
    kind: type[ServiceError]
    message: str
    code: str
    status: int
    path: str | None
    details: Any

    def error(self) -> ServiceError:
        return self.kind(
            self.message, code=self.code, status=self.status, path=self.path, details=self.details
        )


_planners = anyio.CapacityLimiter(2)


async def plan_off_loop(
    request: ExecuteRequest, body: bytes, settings: SandboxSettings, max_body_bytes: int
) -> RunSpec:
    """``plan``, in a worker process when the body is large enough that it could
    hold the event loop (and so ``/health`` and every stream) for long. A worker
    plan past ``PLAN_TIMEOUT_S`` is killed: a 400 ``connector_too_complex``."""
    if len(body) <= INLINE_PLAN_BYTES:
        return plan(request, settings, max_body_bytes)
    async with _planners:  # the time limit starts once a worker is ours
        try:
            with anyio.fail_after(PLAN_TIMEOUT_S):
                outcome = await to_process.run_sync(
                    plan_body, body, settings, max_body_bytes, cancellable=True
                )
        except TimeoutError:
            raise ConnectorTooComplex(
                f"validating the connector took over {PLAN_TIMEOUT_S:g} s; "
                "send less code or simpler code",
                path="connector.files",
            ) from None
    if isinstance(outcome, _Refusal):
        raise outcome.error()
    return outcome


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
