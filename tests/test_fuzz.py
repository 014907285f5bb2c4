"""Bad input against the real server: explicit cases, then property-based fuzzing.

Hypothesis sends random bytes, random JSON and well-formed-but-wrong bodies to
both endpoints of a real server process. Every answer must be a success or a
JSON error of the documented shape (never a 500), and the server must be
healthy afterwards with nothing unhandled in its log.

The fuzzed server cannot start containers, twice over: it allows only
``timeoutMs: 1`` (``STREAMSVC_MAX_TIMEOUT_MS=1``), which the generators never
produce, so every generated connector fails validation with at least
``out_of_range`` after all other checks ran; and its ``DOCKER_HOST`` points at
a socket that does not exist. A handful of valid runs go to the real engine
separately, with random configuration, overrides and env, and must come back
exactly as sent.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streamsvc.connectors.analysis import deep_merge
from streamsvc.connectors.redact import looks_secret
from tests.fake_azure import FakeAzure
from tests.harness import ServerProcess, server_env

BODY_CAP = 64 * 1024
JSON_TYPE = "application/json"
JSON = {"content-type": JSON_TYPE}
ERROR_KEYS = {"code", "message", "path", "details"}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def fuzzed(fake_azure: FakeAzure) -> Iterator[ServerProcess]:
    """A real server that validates everything but cannot reach a Docker engine."""
    env = server_env(
        fake_azure,
        DOCKER_HOST="unix:///nonexistent/streamsvc-fuzz.sock",
        STREAMSVC_MAX_TIMEOUT_MS="1",
        STREAMSVC_MAX_BODY_BYTES=str(BODY_CAP),
    )
    process = ServerProcess(env)
    yield process
    process.close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


def assert_error_shape(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json", response.text[:300]
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) <= ERROR_KEYS
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert "Traceback" not in error["message"]
    if "path" in error:
        assert isinstance(error["path"], str)
    return error


def check_answer(response: httpx.Response, allowed: set[int]) -> None:
    code = response.json()["error"]["code"] if response.status_code >= 400 else "ok"
    event(f"{response.status_code} {code}")  # shown by --hypothesis-show-statistics
    assert response.status_code != 500, response.text[:500]
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert_error_shape(response)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [
            line.removeprefix("event: ")
            for line in response.text.splitlines()
            if line.startswith("event: ")
        ]
        assert events
        assert events[-1] in {"done", "error"}
    else:
        assert response.headers["content-type"] == "application/json"
        response.json()


def assert_still_healthy(server: ServerProcess, http: httpx.Client) -> None:
    assert server.process.poll() is None
    health = http.get(server.url + "/health")
    assert health.status_code == 200
    assert health.json()["components"]["chat"]["state"] == "configured"
    log = server.log()
    assert "Traceback" not in log
    assert "unhandled error" not in log


# -- explicit cases --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat", "/execute-connector"])
def test_a_body_over_the_cap_is_413(fuzzed: ServerProcess, http: httpx.Client, path: str) -> None:
    big = b'{"x": "' + b"a" * BODY_CAP + b'"}'
    declared = http.post(fuzzed.url + path, content=big, headers=JSON)
    assert declared.status_code == 413
    assert assert_error_shape(declared)["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    streamed = http.post(fuzzed.url + path, content=chunks(), headers=JSON)
    assert streamed.status_code == 413
    assert assert_error_shape(streamed)["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("raw", "position"),
    [
        (b'{"connector": {"runtime": }', 26),
        (b'{"connector": ', 14),
        (b'{"env": {"A": "x"', 17),
        (b'{"env": {"A" "x"}}', 13),
        (b'{"env": {"A": "x",}}', 18),
    ],
)
def test_malformed_json_on_execute_is_400_with_the_position(
    fuzzed: ServerProcess, http: httpx.Client, raw: bytes, position: int
) -> None:
    response = http.post(fuzzed.url + "/execute-connector", content=raw, headers=JSON)
    assert response.status_code == 400
    error = assert_error_shape(response)
    assert error["code"] == "malformed_json"
    assert error["details"]["position"] == position


@pytest.mark.parametrize("levels", [500, 5000])
def test_json_nested_too_deeply_is_400(
    fuzzed: ServerProcess, http: httpx.Client, levels: int
) -> None:
    """Too deep for a connector (500), or for the decoder itself (5000 on CPython 3.11,
    where msgspec's recursion stops; 3.12+ decodes it and the connector check refuses it)."""
    deep = "[" * levels + "]" * levels
    raw = (
        '{"connector": {"runtime": {"entryPoint": "m.py", "timeoutMs": 1}, "files": {"m.py": ""}, '
        + '"x": '
        + deep
        + "}}"
    ).encode()
    response = http.post(fuzzed.url + "/execute-connector", content=raw, headers=JSON)
    assert response.status_code == 400
    assert assert_error_shape(response)["code"] == "too_deeply_nested"


def test_a_python_file_the_parser_cannot_hold_is_not_a_500(
    start_server: Callable[..., ServerProcess], http: httpx.Client
) -> None:
    server = start_server(DOCKER_HOST="unix:///nonexistent/streamsvc-fuzz.sock")
    body = {
        "connector": {
            "runtime": {"entryPoint": "main.py"},
            "files": {"main.py": "x = " + "-" * 30_000 + "1\n"},
        }
    }
    response = http.post(server.url + "/execute-connector", json=body)
    assert response.status_code in {400, 503}, response.text
    assert_error_shape(response)


def test_a_valid_request_without_an_engine_is_503_sandbox_unavailable(
    fuzzed: ServerProcess, http: httpx.Client
) -> None:
    runtime = {"entryPoint": "m.py", "timeoutMs": 1}
    body = {"connector": {"runtime": runtime, "files": {"m.py": "print(1)"}}}
    for stream in (False, True):
        response = http.post(fuzzed.url + "/execute-connector", json={**body, "stream": stream})
        assert response.status_code == 503
        assert assert_error_shape(response)["code"] == "sandbox_unavailable"


# -- strategies ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=25,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=4)

# Execute: every field of the right JSON type, with values that are often wrong.
file_names = st.sampled_from(
    ["main.py", "lib/util.py", "lib", "../x.py", "/etc/passwd", "", ".streamsvc/x", "a\x00b"]
) | st.text(max_size=20)
code = st.sampled_from(
    [
        "print('{}')",
        "import os\nos.environ['KEY']",
        "print(connector.auth.x)",
        "context['connector']['configuration']['y'][0]",
        "connector.get('configuration', {}).get('z')",
        "{{env:TOKEN}}",
        "process.env.SECRET",
        "def (:",
        "x = " + "(" * 300 + ")" * 300,
        "import os\nos.environ['STREAMSVC_CONTEXT_FILE']",
    ]
) | st.text(max_size=60)
requirement = st.sampled_from(
    [
        "requests==2.32.3",
        "six",
        "x[y]>=1,<2",
        "--index-url https://x",
        "-e .",
        "a @ https://x/a.whl",
        "git+https://x/y",
        "./p",
        "/tmp/p",
        "x; ls",
        "x && id",
        "$(id)",
        "",
    ]
) | st.text(max_size=20)
version = st.sampled_from(["2.32.3", "*", "", ">=1,<2", "latest", "--pre", "1; id"]) | st.text(
    max_size=10
)
dependencies = (
    st.lists(requirement, max_size=4)
    | st.lists(
        st.fixed_dictionaries({"name": requirement}, optional={"version": version | st.none()}),
        max_size=4,
    )
    | st.dictionaries(requirement, version, max_size=4)
    | st.none()
)
env_names = st.sampled_from(
    ["KEY", "TOKEN", "SECRET", "API_KEY", "1BAD", "PYTHONPATH", "STREAMSVC_X", "A-B", "LD_X"]
) | st.text(max_size=12)
timeouts = st.integers(min_value=-5, max_value=10**12).filter(lambda t: t != 1)


@st.composite
def execute_bodies(draw: st.DrawFn) -> dict[str, Any]:
    files = draw(st.dictionaries(file_names, code, max_size=4))
    one_of_them = bool(files) and draw(st.booleans())
    entry = draw(st.sampled_from(sorted(files)) if one_of_them else file_names)
    runtime: dict[str, Any] = {"entryPoint": entry}
    optional = {
        "language": st.sampled_from(["python", "python", "Python", "node", ""]),
        "timeoutMs": timeouts,
        "memoryMb": st.integers(min_value=-5, max_value=10**7),
        "dependencies": dependencies,
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            runtime[key] = draw(strategy)
    connector: dict[str, Any] = {"runtime": runtime, "files": files}
    for key, strategy in {
        "configuration": json_objects,
        "auth": json_values,
        "schemaVersion": json_values,
        "displayName": st.text(max_size=10),
    }.items():
        if draw(st.booleans()):
            connector[key] = draw(strategy)
    body: dict[str, Any] = {"connector": connector}
    for key, strategy in {
        "env": st.dictionaries(env_names, st.text(max_size=20), max_size=4),
        "configuration_overrides": json_objects,
        "network_mode": st.sampled_from(["bridge", "none"]),
        "stream": st.booleans(),
    }.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


# Chat: the right JSON types; values sometimes out of bounds.
roles = st.sampled_from(["user", "user", "system", "assistant", "developer", "tool"])
parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}), max_size=3)
chat_messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": st.text(max_size=40) | parts},
        optional={"name": st.text(min_size=0, max_size=70)},
    ),
    min_size=0,
    max_size=4,
)


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": draw(chat_messages)}
    for key, strategy in {
        "model": st.sampled_from(["gpt-4o", "gpt-5-mini", "o3", "x" * 129, ""]),
        "temperature": st.floats(min_value=-1, max_value=3, allow_nan=False),
        "max_tokens": st.integers(min_value=-1, max_value=2_000_000),
        "stream": st.booleans(),
    }.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[dict[str, Any]]) -> Any:
    """A well-formed body with one thing wrong: a value of another type, a
    missing field or an unknown one, anywhere in the tree."""
    body = draw(bodies)
    places: list[tuple[Any, Any]] = [(None, None)]
    pending: list[Any] = [body]
    while pending:
        node = pending.pop()
        keys: list[Any] = list(node) if isinstance(node, dict) else list(range(len(node)))
        for key in keys:
            places.append((node, key))
            if isinstance(node[key], dict | list):
                pending.append(node[key])
    parent, key = draw(st.sampled_from(places))
    if parent is None:
        return draw(json_values)
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[key] = draw(json_values)
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=10))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return body


def payloads(bodies: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Typed bodies with wrong values, bodies with one wrong type, any JSON, raw bytes."""

    def encoded(value: Any) -> bytes:
        return json.dumps(value).encode()

    return st.one_of(
        bodies.map(encoded),
        bodies.map(encoded),
        mutated(bodies).map(encoded),
        json_values.map(encoded),
        st.binary(max_size=300),
        bodies.map(encoded).flatmap(lambda raw: st.integers(0, len(raw)).map(lambda n: raw[:n])),
    )


headers = st.sampled_from(
    [
        JSON,
        {**JSON, "accept": "text/event-stream"},
        {"content-type": "text/plain"},
        {},
        {**JSON, "accept": "text/event-stream, application/json;q=0.5"},
    ]
)


# -- properties ------------------------------------------------------------------------------


@FUZZ
@given(payload=payloads(execute_bodies()), extra=headers)
def test_fuzzed_execute_requests_never_break_the_server(
    fuzzed: ServerProcess, http: httpx.Client, payload: bytes, extra: dict[str, str]
) -> None:
    response = http.post(fuzzed.url + "/execute-connector", content=payload, headers=extra)
    check_answer(response, {400, 413, 422} if extra.get("content-type") == JSON_TYPE else {415})


@FUZZ
@given(payload=payloads(chat_bodies()), extra=headers)
def test_fuzzed_chat_requests_never_break_the_server(
    fuzzed: ServerProcess, http: httpx.Client, payload: bytes, extra: dict[str, str]
) -> None:
    response = http.post(fuzzed.url + "/chat", content=payload, headers=extra)
    answers = {200, 400, 404, 413, 422, 429, 502, 503, 504}
    check_answer(response, answers if extra.get("content-type") == JSON_TYPE else {415})


def test_after_the_fuzzing_the_server_is_healthy(
    fuzzed: ServerProcess, http: httpx.Client, fake_azure: FakeAzure
) -> None:
    fake_azure.reset()
    assert_still_healthy(fuzzed, http)
    chat = http.post(fuzzed.url + "/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200
    assert chat.json()["content"] == "echo: hi"


# -- a handful of valid runs on the real engine ---------------------------------------------

ECHO_PROGRAM = """\
import json, os
with open(os.environ["STREAMSVC_CONTEXT_FILE"]) as handle:
    connector = json.load(handle)["connector"]
names = json.loads(os.environ["ENV_NAMES"])
print(json.dumps({"configuration": connector["configuration"],
                  "env": {name: os.environ[name] for name in names}}))
"""
safe_text = st.text(alphabet=string.ascii_letters + string.digits + " -_.:/é€", max_size=7)
plain_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**9), 10**9) | safe_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3),
    max_leaves=10,
)
objects = st.dictionaries(safe_text, plain_json, max_size=4)
env_maps = st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), safe_text)


@pytest.mark.docker
@settings(max_examples=5, deadline=None, database=None)
@given(configuration=objects, overrides=objects, env=env_maps)
def test_random_valid_runs_get_exactly_what_was_sent(
    server: ServerProcess,
    http: httpx.Client,
    configuration: dict[str, Any],
    overrides: dict[str, Any],
    env: dict[str, str],
) -> None:
    env = {
        k: v
        for k, v in env.items()
        if not k.startswith(("STREAMSVC_", "LD_", "PYTHON")) and not looks_secret(k)
    }
    env["ENV_NAMES"] = json.dumps(sorted(env))
    body = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py"},
            "configuration": configuration,
            "files": {"main.py": ECHO_PROGRAM},
        },
        "env": env,
        "configuration_overrides": overrides,
    }
    response = http.post(server.url + "/execute-connector", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["ok"] is True, answer
    names = json.loads(env["ENV_NAMES"])
    # Only secrets are redacted on the way out (declared, or named like one: those
    # are left out above), so every value comes back verbatim.
    expected_env = {name: env[name] for name in names}
    assert answer["result"] == {
        "configuration": deep_merge(configuration, overrides),
        "env": expected_env,
    }
