"""Request decoding and ``plan()``: every check before a container exists.

Unit tests call ``plan`` directly; the HTTP tests send the same requests to
the real server and check the 400 body; one checks with the engine's event
log that a rejected request creates no container at all.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import time
from typing import Any

import httpx
import msgspec
import pytest

from streamsvc.connectors.dependencies import Dependency
from streamsvc.connectors.request import MAX_ENV_BYTES, MAX_JSON_DEPTH, decode_request, plan
from streamsvc.errors import RequestError, ValidationFailed
from streamsvc.sandbox.types import RunSpec
from streamsvc.settings import SandboxSettings, ServerSettings
from tests.harness import ServerProcess, seed_request

SETTINGS = SandboxSettings()
MAX_BODY_BYTES = ServerSettings().max_body_bytes


def request(
    files: dict[str, str] | None = None,
    runtime: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A minimal valid request, with changes."""
    connector = {
        "runtime": {"language": "python", "entryPoint": "main.py", **(runtime or {})},
        "files": files if files is not None else {"main.py": "print('{}')"},
    }
    connector.update(top.pop("connector_extra", {}))
    return {"connector": connector, **top}


def planned(body: dict[str, Any], settings: SandboxSettings = SETTINGS) -> RunSpec:
    return plan(decode_request(json.dumps(body).encode()), settings, MAX_BODY_BYTES)


def rejected(body: dict[str, Any], settings: SandboxSettings = SETTINGS) -> RequestError:
    with pytest.raises(RequestError) as caught:
        planned(body, settings)
    assert caught.value.status == 400
    return caught.value


def problems(error: RequestError) -> list[tuple[str, str]]:
    return [(p.code, p.path) for p in error.details["problems"]]


# -- the seed's request ----------------------------------------------------------------


def test_the_seed_request_plans_as_written() -> None:
    body = seed_request()
    spec = planned(body)
    assert spec.entry_point == "runner_entrypoint.py"
    assert spec.files == body["connector"]["files"]
    assert spec.dependencies == (Dependency("requests", specifier="==2.32.3"),)
    assert spec.network == "bridge"
    assert (spec.timeout_ms, spec.memory_mb) == (30000, 256)
    assert spec.env == {"CLIENT_ID": "...", "CLIENT_SECRET": "..."}
    assert spec.context == {
        "connector": {
            "runtime": body["connector"]["runtime"],
            "configuration": {
                "spreadsheetId": "SPREADSHEET_ID",
                "sheetName": "Sheet1",
                "columnIndex": 3,
                "valueToInsert": "Value set at execution time",
            },
        }
    }


def test_defaults_and_other_top_level_keys() -> None:
    body = request(
        connector_extra={"auth": {"type": "oauth"}, "schemaVersion": "1", "displayName": "X"}
    )
    del body["connector"]["runtime"]["language"]
    spec = planned(body)
    assert (spec.timeout_ms, spec.memory_mb, spec.network) == (30000, 256, "none")
    assert spec.dependencies == ()
    assert spec.context["connector"]["auth"] == {"type": "oauth"}
    assert spec.context["connector"]["displayName"] == "X"
    assert "files" not in spec.context["connector"]


@pytest.mark.parametrize(
    "dependencies",
    [
        [{"name": "requests", "version": "2.32.3"}, {"name": "six"}],
        ["requests==2.32.3", "six"],
        {"requests": "2.32.3", "six": "*"},
    ],
)
def test_the_three_dependency_forms(dependencies: Any) -> None:
    spec = planned(request(runtime={"dependencies": dependencies}))
    assert [d.requirement for d in spec.dependencies] == ["requests==2.32.3", "six"]


@pytest.mark.parametrize(
    "dependency",
    [
        "--index-url https://evil.example/simple",
        "-e .",
        "-r requirements.txt",
        "requests @ https://evil.example/requests.tar.gz",
        "git+https://github.com/psf/requests",
        "https://evil.example/x.whl",
        "./local_pkg",
        "/tmp/pkg",
        "../pkg",
        "requests; rm -rf /",
        "requests && curl evil.example",
        "requests|sh",
        "$(whoami)",
        "`id`",
        "requests\nsix",
        "requests>=1 ; python_version<'3'",
        "",
    ],
)
def test_an_invalid_dependency_is_rejected(dependency: str) -> None:
    for form in ([dependency], [{"name": dependency}], {dependency: "1.0"}):
        error = rejected(request(runtime={"dependencies": form}))
        assert error.code == "invalid_dependency", (form, error.details)
        assert all(code == "invalid_dependency" for code, _ in problems(error))


def test_invalid_versions_are_rejected() -> None:
    for version in ("--pre", "1.0; echo", "latest", "https://x", ">=1 <2 | x"):
        error = rejected(request(runtime={"dependencies": {"requests": version}}))
        assert error.code == "invalid_dependency", version


# -- everything wrong at once ------------------------------------------------------------


def test_every_problem_is_listed_in_one_answer() -> None:
    body = {
        "connector": {
            "runtime": {
                "language": "ruby",
                "entryPoint": "missing.py",
                "timeoutMs": 0,
                "memoryMb": 10**6,
                "dependencies": ["requests", "--index-url=https://evil.example", "x; ls"],
            },
            "files": {
                "main.py": (
                    "import os\n"
                    "print(connector.auth.clientId, os.environ['API_KEY'])\n"
                    "print('{{env:OTHER_KEY}}')\n"
                ),
                "../escape.py": "",
                "/etc/passwd": "",
                "lib": "",
                "lib/util.py": "",
            },
            "configuration": {"url": "{{env:URL_TOKEN}}"},
        },
        "env": {"1NOT_A_NAME": "x", "STREAMSVC_X": "y"},
        "network_mode": "none",
    }
    error = rejected(body)
    assert error.code == "invalid_connector"
    assert sorted(problems(error)) == sorted(
        [
            ("unsupported_language", "connector.runtime.language"),
            ("entry_point_not_found", "connector.runtime.entryPoint"),
            ("out_of_range", "connector.runtime.timeoutMs"),
            ("out_of_range", "connector.runtime.memoryMb"),
            ("invalid_dependency", "connector.runtime.dependencies[1]"),
            ("invalid_dependency", "connector.runtime.dependencies[2]"),
            ("unsafe_file_name", "connector.files.../escape.py"),
            ("unsafe_file_name", "connector.files./etc/passwd"),
            ("file_name_conflict", "connector.files.lib"),
            ("invalid_env_name", "env.1NOT_A_NAME"),
            ("reserved_env_name", "env.STREAMSVC_X"),
            ("missing_connector_paths", "connector.auth.clientId"),
            ("missing_env", "env.API_KEY"),
            ("missing_env", "env.OTHER_KEY"),
            ("missing_env", "env.URL_TOKEN"),
        ]
    )
    assert error.details["missing_connector_paths"] == ["auth.clientId"]
    assert error.details["missing_env"] == ["API_KEY", "OTHER_KEY", "URL_TOKEN"]
    assert "supported: python" in error.message
    assert "(and 10 more)" in error.message


def test_one_kind_of_problem_gives_its_own_code() -> None:
    error = rejected(request(runtime={"language": "javascript"}))
    assert error.code == "unsupported_language"
    assert error.path == "connector.runtime.language"
    message = error.details["problems"][0].message
    assert "'javascript' is not supported" in message
    assert "supported: python" in message


# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "/abs.py",
        "../up.py",
        "a/../../up.py",
        "a//b.py",
        "./main2.py",
        "nul\x00.py",
        "back\\slash.py",
        ".hidden.py",
        ".streamsvc/runner.py",
        "x" * 256,
        "",
        "semi;colon.py",
        "new\nline.py",
    ],
)
def test_unsafe_file_names(name: str) -> None:
    body = request(files={"main.py": "print(1)", name: "x"})
    error = rejected(body)
    assert problems(error) == [("unsafe_file_name", f"connector.files.{name}")]


def test_safe_file_names_in_folders() -> None:
    files = {"main.py": "print(1)", "pkg/__init__.py": "", "pkg/sub/mod-1.py": "", "a b.txt": ""}
    assert planned(request(files=files)).files == files


def test_the_entry_point_must_be_one_of_the_files() -> None:
    error = rejected(request(runtime={"entryPoint": "other.py"}))
    assert error.code == "entry_point_not_found"
    assert "other.py" in error.message


def test_file_count_and_size_are_bounded_by_settings() -> None:
    small = msgspec.structs.replace(SETTINGS, max_files=2, max_file_bytes=10)
    files = {"main.py": "print(1)", "a.py": "x" * 11, "b.py": "é" * 6}
    error = rejected(request(files=files), small)
    assert sorted(problems(error)) == [
        ("file_too_large", "connector.files.a.py"),
        ("file_too_large", "connector.files.b.py"),
        ("too_many_files", "connector.files"),
    ]


# -- runtime bounds ---------------------------------------------------------------------------


def test_timeout_and_memory_bounds_come_from_settings() -> None:
    narrow = msgspec.structs.replace(
        SETTINGS,
        max_timeout_ms=5000,
        min_memory_mb=64,
        max_memory_mb=512,
    )
    ok = planned(request(runtime={"timeoutMs": 5000, "memoryMb": 64}), narrow)
    assert (ok.timeout_ms, ok.memory_mb) == (5000, 64)
    planned(request(runtime={"timeoutMs": 1, "memoryMb": 512}), narrow)
    for runtime, path in [
        ({"timeoutMs": 5001}, "connector.runtime.timeoutMs"),
        ({"timeoutMs": 0}, "connector.runtime.timeoutMs"),
        ({"timeoutMs": -5}, "connector.runtime.timeoutMs"),
        ({"memoryMb": 63}, "connector.runtime.memoryMb"),
        ({"memoryMb": 513}, "connector.runtime.memoryMb"),
    ]:
        error = rejected(request(runtime={"timeoutMs": 100, "memoryMb": 100, **runtime}), narrow)
        assert problems(error) == [("out_of_range", path)]
        assert error.details["problems"][0].message in {"must be 1 to 5000", "must be 64 to 512"}


def test_bridge_can_be_disabled() -> None:
    closed = msgspec.structs.replace(SETTINGS, allow_bridge=False)
    assert planned(request(network_mode="none"), closed).network == "none"
    error = rejected(request(network_mode="bridge"), closed)
    assert error.code == "network_not_allowed"
    assert planned(request(network_mode="bridge")).network == "bridge"


# -- connector paths ---------------------------------------------------------------------------

PATH_CODE = """\
import json
a = connector.auth.clientId
b = context.connector.configuration.sheetName
c = connector["configuration"]["range"]
d = context["connector"]["configuration"]["columns"][1]
e = connector.get("auth", {}).get("tenant")
f = context.get("connector").get("options").get("retries", 3)
g = connector.displayName  # metadata: ignored
h = connector.schemaVersion
"""
JS_CODE = "const x = context.connector.auth.scope; const y = connector['options']['mode'];"


def test_every_referenced_path_must_exist() -> None:
    body = request(files={"main.py": PATH_CODE, "helper.js": JS_CODE})
    error = rejected(body)
    assert error.code == "missing_connector_paths"
    assert error.details["missing_connector_paths"] == [
        "auth.clientId",
        "auth.scope",
        "auth.tenant",
        "configuration.columns.1",
        "configuration.range",
        "configuration.sheetName",
        "options.mode",
        "options.retries",
    ]


def test_paths_present_in_the_connector_or_its_overrides_pass() -> None:
    body = request(
        files={"main.py": PATH_CODE, "helper.js": JS_CODE},
        connector_extra={
            "auth": {"clientId": "id", "tenant": None, "scope": "s"},
            "configuration": {"sheetName": "S", "columns": ["a"]},
            "options": {"retries": 1, "mode": "m"},
        },
        configuration_overrides={"range": "A1:B2", "columns": ["a", "b"]},
    )
    spec = planned(body)
    configuration = spec.context["connector"]["configuration"]
    assert configuration == {"sheetName": "S", "columns": ["a", "b"], "range": "A1:B2"}


def test_an_override_that_removes_a_path_counts() -> None:
    body = request(
        files={"main.py": "x = connector.configuration.sheet.name"},
        connector_extra={"configuration": {"sheet": {"name": "S"}}},
        configuration_overrides={"sheet": None},
    )
    assert rejected(body).details["missing_connector_paths"] == ["configuration.sheet.name"]


def test_strings_and_comments_in_python_do_not_count() -> None:
    code = "# connector.auth.secret\nprint('connector.auth.token')\n"
    planned(request(files={"main.py": code}))


# -- environment ---------------------------------------------------------------------------------

ENV_CODE = """\
import os
key = os.environ["API_KEY"]
optional = os.environ.get("OPTIONAL") or os.getenv("ALSO_OPTIONAL")
url = "{{env:BASE_URL}}"
"""


def test_required_env_is_detected_everywhere() -> None:
    body = request(
        files={"main.py": ENV_CODE, "client.js": "fetch(process.env.JS_TOKEN)"},
        connector_extra={"auth": {"secret": "{{env:CLIENT_SECRET}}"}},
        configuration_overrides={"header": "Bearer {{ env : OVERRIDE_TOKEN }}"},
        env={"API_KEY": "k"},
    )
    error = rejected(body)
    assert error.code == "missing_env"
    assert error.details["missing_env"] == [
        "BASE_URL",
        "CLIENT_SECRET",
        "JS_TOKEN",
        "OVERRIDE_TOKEN",
    ]
    assert "OPTIONAL" not in error.message


def test_placeholders_are_substituted_in_values_and_files() -> None:
    body = request(
        files={"main.py": ENV_CODE, "conf.txt": "token={{env:API_KEY}} other={{env:NOT_SET}}"},
        connector_extra={
            "auth": {"secret": "{{env:API_KEY}}", "list": ["x{{env:BASE_URL}}y", 3]},
            "configuration": {"a": {"b": 1, "c": 2}},
        },
        configuration_overrides={"a": {"c": 3, "d": "{{env:BASE_URL}}"}},
        env={"API_KEY": "secret-1", "BASE_URL": "https://api", "NOT_SET_ELSEWHERE": "z"},
    )
    body["connector"]["files"]["conf.txt"] = "token={{env:API_KEY}}"
    spec = planned(body)
    connector = spec.context["connector"]
    assert connector["auth"] == {"secret": "secret-1", "list": ["xhttps://apiy", 3]}
    assert connector["configuration"] == {"a": {"b": 1, "c": 3, "d": "https://api"}}
    assert spec.files["conf.txt"] == "token=secret-1"
    assert 'url = "https://api"' in spec.files["main.py"]
    assert spec.env == body["env"]
    assert body["connector"]["auth"]["secret"] == "{{env:API_KEY}}"  # input untouched


def test_env_names_values_and_size() -> None:
    assert rejected(request(env={"A-B": "x"})).code == "invalid_env_name"
    assert rejected(request(env={"PYTHONPATH": "/x"})).code == "reserved_env_name"
    assert rejected(request(env={"ld_preload": "/x"})).code == "reserved_env_name"
    assert rejected(request(env={"A": "x\x00y"})).code == "invalid_env_value"
    big = {f"K{i}": "v" * 1000 for i in range(MAX_ENV_BYTES // 1000 + 1)}
    assert rejected(request(env=big)).code == "env_too_large"


def test_json_nested_too_deeply_is_rejected_before_analysis() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH - 1):
        deep = {"k": deep}
    # connector > configuration > ... : exactly at the limit, accepted
    planned(request(connector_extra={"configuration": copy.deepcopy(deep)}))
    too_deep = {"k": deep}
    planned(request(configuration_overrides=too_deep))
    error = rejected(request(configuration_overrides={"x": too_deep}))
    assert problems(error) == [("too_deeply_nested", "configuration_overrides")]
    error = rejected(request(connector_extra={"extra": [too_deep]}, runtime={"language": "go"}))
    assert sorted(problems(error)) == [
        ("too_deeply_nested", "connector"),
        ("unsupported_language", "connector.runtime.language"),
    ]


# -- wrong types are 422 with a path -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda b: b["connector"]["runtime"].update(timeoutMs="30000"), "runtime.timeoutMs"),
        (lambda b: b["connector"]["runtime"].update(memoryMb=1.5), "runtime.memoryMb"),
        (lambda b: b["connector"]["runtime"].pop("entryPoint"), "runtime"),
        (lambda b: b["connector"].pop("files"), ""),
        (lambda b: b["connector"].update(files=["main.py"]), "files"),
        (lambda b: b["connector"].update(configuration=[1]), "configuration"),
        (lambda b: b["connector"].update(runtime="python"), "runtime"),
        (lambda b: b["connector"]["files"].update({"b.py": 3}), "files.b.py"),
    ],
)
def test_wrong_types_inside_the_connector_are_422(change: Any, path: str) -> None:
    body = request()
    change(body)
    with pytest.raises(ValidationFailed) as caught:
        planned(body)
    assert caught.value.status == 422
    assert caught.value.path == "$.connector" + ("." + path if path else "")


# -- over HTTP ------------------------------------------------------------------------------------


async def test_the_server_answers_400_listing_every_problem(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    body = request(
        files={"main.py": "print(connector.auth.id)", "../x.py": ""},
        runtime={"language": "perl", "dependencies": ["ok-pkg", "pkg @ file:///etc"]},
        env={"9": "x"},
        stream=True,
    )
    response = await client.post(server.url + "/execute-connector", json=body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "invalid_connector"
    assert {p["code"] for p in error["details"]["problems"]} == {
        "unsupported_language",
        "invalid_dependency",
        "unsafe_file_name",
        "invalid_env_name",
        "missing_connector_paths",
    }
    assert all(set(p) == {"code", "path", "message"} for p in error["details"]["problems"])
    assert error["details"]["missing_connector_paths"] == ["auth.id"]


async def test_the_server_rejects_each_invalid_dependency(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    deps = ["--extra-index-url=https://x", "https://x/y.whl", "./here", "a|b", "ok"]
    response = await client.post(
        server.url + "/execute-connector", json=request(runtime={"dependencies": deps})
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_dependency"
    assert [p["path"] for p in error["details"]["problems"]] == [
        f"connector.runtime.dependencies[{i}]" for i in range(4)
    ]


async def test_wrong_json_types_are_422_with_a_path(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    url = server.url + "/execute-connector"
    cases = [
        ({**request(), "env": {"A": 1}}, "$.env.A"),
        ({**request(), "network_mode": "host"}, "$.network_mode"),
        ({**request(), "configuration_overrides": []}, "$.configuration_overrides"),
        ({**request(), "stream": "yes"}, "$.stream"),
        ({**request(), "unknown": 1}, "$.unknown"),
        (request(runtime={"timeoutMs": "soon"}), "$.connector.runtime.timeoutMs"),
        ({"env": {}}, "$"),
    ]
    for body, path in cases:
        response = await client.post(url, json=body)
        assert response.status_code == 422, body
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert error["path"] == path, (body, error)


def engine_events(owner: str, since: float) -> list[dict[str, Any]]:
    """Container events the engine recorded for one server process since ``since``."""
    output = subprocess.run(
        [
            "docker",
            "events",
            "--since",
            f"{since:.3f}",
            "--until",
            f"{time.time():.3f}",
            "--filter",
            "type=container",
            "--filter",
            f"label=streamsvc.owner={owner}",
            "--format",
            "{{json .}}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.mark.docker
async def test_a_rejected_request_creates_no_container(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    import socket

    owner = f"{socket.gethostname()}:{server.process.pid}"
    url = server.url + "/execute-connector"
    since = time.time()
    bad = request(files={"main.py": "print(connector.nope)"}, runtime={"dependencies": ["-e ."]})
    for stream in (False, True):
        response = await client.post(url, json={**bad, "stream": stream})
        assert response.status_code == 400
    # The control: a valid request on the same server is seen by the same query.
    good = await client.post(url, json=request())
    assert good.status_code == 200
    await asyncio.sleep(1)  # let the engine's event log catch up
    actions = [event["Action"] for event in engine_events(owner, since)]
    assert actions.count("create") == 1, actions
