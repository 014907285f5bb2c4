"""Tests for streamsvc.connectors.analysis: what connector code is detected to need."""

from __future__ import annotations

import copy
import keyword
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from streamsvc.connectors.analysis import (
    ENV_PLACEHOLDER,
    METADATA_KEYS,
    connector_paths,
    deep_merge,
    missing_connector_paths,
    required_env,
    substitute_env,
    substitute_env_text,
)

quick = settings(database=None, deadline=None, max_examples=200)

DICT_METHODS = {
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

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=25,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=5)
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(
    lambda name: not keyword.iskeyword(name) and name not in DICT_METHODS
)
plain_keys = st.text(
    st.characters(codec="utf-8", exclude_characters="\"'\\\r\n", exclude_categories=["Cs"]),
    max_size=8,
)


def paths(*dotted: str) -> set[tuple[str, ...]]:
    return {tuple(item.split(".")) for item in dotted}


# ---------------------------------------------------------------- connector_paths: Python

PYTHON_CASES = [
    # attribute chains
    ("x = connector.auth.clientId", paths("auth.clientId")),
    ("x = context.connector.configuration.sheetName", paths("configuration.sheetName")),
    # subscripts with constants
    ('x = connector["auth"]["clientId"]', paths("auth.clientId")),
    ("x = connector['auth']", paths("auth")),
    ('x = context["connector"]["configuration"]', paths("configuration")),
    ('x = connector["items"][0]["name"]', paths("items.0.name")),
    # .get chains
    ('x = connector.get("auth")', paths("auth")),
    ('x = connector.get("auth", {}).get("clientId")', paths("auth.clientId")),
    (
        'x = context.get("connector", {}).get("configuration", {}).get("x")',
        paths("configuration.x"),
    ),
    ('x = context.get("connector")["auth"]', paths("auth")),
    # mixes
    ('x = connector["auth"].clientId', paths("auth.clientId")),
    ('x = connector.get("auth")["scopes"][1].name', paths("auth.scopes.1.name")),
    (
        'x = context["connector"].configuration.get("columnIndex", 0)',
        paths("configuration.columnIndex"),
    ),
    # code inside expressions still counts
    ('print(f"{connector.auth.token}")', paths("auth.token")),
    ("def f(connector):\n    return [connector.a.b for _ in range(3)]", paths("a.b")),
    ("x = foo(connector.a, bar=connector['b'])", paths("a", "b")),
    ("x = connector.a\ny = connector.a.b", paths("a", "a.b")),
    # the chain stops at the first non-constant step
    ("x = connector[key].clientId", set()),
    ('x = connector["auth"][key]["clientId"]', paths("auth")),
    ("x = connector[-1].a", set()),
    ("x = connector[True].a", set()),
    ("x = connector[1.5].a", set()),
    ('x = connector["a" + "b"]', set()),
    ("x = connector.get(key)", set()),
    ("x = connector.get(key).a", set()),
    ('x = connector.get("a", None, 3)', set()),
    ('x = connector.get(key="a")', set()),
    ("x = connector.get()", set()),
    # method calls are not keys
    ("x = connector.auth.clientId.strip()", paths("auth.clientId")),
    ("x = connector.auth()", set()),
    ('x = connector["fn"]().a', set()),
    ("for k, v in connector.configuration.items(): pass", paths("configuration")),
    ("x = list(connector.keys())", set()),
    ("x = connector.values", set()),
    ("x = connector.auth.copy()", paths("auth")),
    # assigned or deleted last step: only the rest of the chain is required
    ('connector["auth"]["token"] = "t"', paths("auth")),
    ("connector.auth.token = 't'", paths("auth")),
    ('del connector["auth"]', set()),
    ("connector = {}", set()),
    # only `connector` and `context` roots
    ("x = self.connector.a", set()),
    ("x = obj.context.connector.a", set()),
    ("x = connectors.a", set()),
    ("x = my_connector.a", set()),
    ("x = context.a", set()),
    ('x = context["other"]["a"]', set()),
    # strings and comments are not code
    ('x = "connector.auth.clientId"', set()),
    ("# connector.auth.clientId", set()),
    ('"""Reads connector.auth.clientId."""', set()),
    # the bare root is not a path
    ("x = connector", set()),
    ("x = context.connector", set()),
    ('x = context["connector"]', set()),
    ("x = dict(connector)", set()),
]


@pytest.mark.parametrize(("source", "expected"), PYTHON_CASES)
def test_python_paths(source: str, expected: set[tuple[str, ...]]) -> None:
    assert connector_paths({"main.py": source}) == expected


def test_python_that_does_not_parse_is_scanned_as_text() -> None:
    source = "def broken(:\n    x = connector.auth.clientId  # connector.notes_only\n"
    assert connector_paths({"main.py": source}) == paths("auth.clientId", "notes_only")


def test_python_warnings_in_user_code_do_not_leak() -> None:
    # An invalid escape warns while parsing; pytest turns warnings into errors.
    source = 'import re\npattern = re.compile("\\d+")\nx = connector.a'
    assert connector_paths({"main.py": source}) == paths("a")


def test_python_long_chain() -> None:
    source = "x = connector" + ".a" * 2000
    assert connector_paths({"main.py": source}) == {("a",) * 2000}


# ---------------------------------------------------------------- connector_paths: text scan

TEXT_CASES = [
    ("connector.auth.clientId", paths("auth.clientId")),
    ("const s = context.connector.configuration.sheetName;", paths("configuration.sheetName")),
    ("const id = connector?.auth?.clientId;", paths("auth.clientId")),
    ("context?.connector?.auth", paths("auth")),
    ("connector['auth'][\"clientId\"]", paths("auth.clientId")),
    ('connector["auth"].clientId', paths("auth.clientId")),
    ("connector.auth['clientId'].x", paths("auth.clientId.x")),
    ("connector?.['auth']", paths("auth")),
    ('context["connector"].auth', paths("auth")),
    ("context[ 'connector' ][ 'auth' ]", paths("auth")),
    ("connector.list[0].name", paths("list.0.name")),
    ("connector.$weird.a_b", paths("$weird.a_b")),
    ("`${connector.configuration.valueToInsert}`", paths("configuration.valueToInsert")),
    ('{"template": "connector.auth.clientId"}', paths("auth.clientId")),
    ("// connector.auth.clientId", paths("auth.clientId")),
    ("a(connector.x); b(connector.y)", paths("x", "y")),
    # stops before a method call and before dict-method names
    ("connector.auth.clientId.trim()", paths("auth.clientId")),
    ("connector.auth.toString ()", paths("auth")),
    ('connector["fn"]()', set()),
    ('connector.get("auth")', set()),
    ("connector.items", set()),
    ("connector.auth.keys", paths("auth")),
    # dynamic keys stop the chain
    ("connector[key].a", set()),
    ("connector.auth[key]", paths("auth")),
    ('connector["a\\"b"]', set()),
    # whitespace between steps is not followed
    ("connector .auth", set()),
    ("connector.\nauth", set()),
    # only free-standing roots
    ("x.connector.a", set()),
    ("x?.connector.a", set()),
    ("obj.context.connector.a", set()),
    ("$connector.a", set()),
    ("myconnector.a", set()),
    ("connector_x.a", set()),
    ("connectors.a", set()),
    ("context.connectorX.a", set()),
    ("context.other.a", set()),
    ("connector", set()),
]


@pytest.mark.parametrize(("source", "expected"), TEXT_CASES)
@pytest.mark.parametrize("filename", ["main.js", "index.ts", "connector.json", "README"])
def test_text_paths(filename: str, source: str, expected: set[tuple[str, ...]]) -> None:
    assert connector_paths({filename: source}) == expected


def test_paths_from_all_files_are_combined() -> None:
    files = {"a.py": "x = connector.a", "b.js": "connector.b.c", "c.txt": "nothing here"}
    assert connector_paths(files) == paths("a", "b.c")


def test_python_extension_is_case_insensitive() -> None:
    assert connector_paths({"MAIN.PY": "# connector.a"}) == set()


@quick
@given(st.lists(identifiers, min_size=1, max_size=6), st.sampled_from(["main.py", "main.js"]))
def test_any_dotted_chain_is_detected(segments: list[str], filename: str) -> None:
    source = f"value = context.connector.{'.'.join(segments)}\n"
    assert connector_paths({filename: source}) == {tuple(segments)}


@quick
@given(st.lists(plain_keys, min_size=1, max_size=6), st.sampled_from(["main.py", "main.js"]))
def test_any_bracket_chain_is_detected(segments: list[str], filename: str) -> None:
    source = "value = connector" + "".join(f'["{segment}"]' for segment in segments) + "\n"
    assert connector_paths({filename: source}) == {tuple(segments)}


@quick
@given(st.text(), st.sampled_from(["main.py", "main.js"]))
def test_connector_paths_never_raises(source: str, filename: str) -> None:
    for path in connector_paths({filename: source}):
        assert path


# ---------------------------------------------------------------- missing_connector_paths

CONNECTOR: dict[str, Any] = {
    "schemaVersion": "1",
    "runtime": {"language": "python", "entryPoint": "main.py"},
    "auth": {"clientId": "id"},
    "configuration": {"sheetName": "Sheet1", "columns": [1, {"name": "B"}], "empty": None},
    "text": "abc",
}

MISSING_CASES = [
    (paths("auth.clientId", "configuration.sheetName"), []),
    (paths("auth"), []),
    (paths("configuration.empty"), []),
    (paths("configuration.columns.1.name"), []),
    (paths("auth.clientSecret"), ["auth.clientSecret"]),
    (paths("oauth"), ["oauth"]),
    (paths("oauth.clientId"), ["oauth.clientId"]),
    # a scalar has no keys below it
    (paths("text.length"), ["text.length"]),
    (paths("configuration.empty.x"), ["configuration.empty.x"]),
    (paths("auth.clientId.x"), ["auth.clientId.x"]),
    # list indexes
    (paths("configuration.columns.0"), []),
    (paths("configuration.columns.2"), ["configuration.columns.2"]),
    (paths("configuration.columns.name"), ["configuration.columns.name"]),
    (paths("configuration.columns.-1"), ["configuration.columns.-1"]),
    (paths("configuration.columns.0.x"), ["configuration.columns.0.x"]),
    # metadata keys are never required
    (paths("displayName", "description.text", "files.main.py", "version", "notes"), []),
    (paths("schemaVersion.major"), []),
    # full paths, sorted, a missing prefix of another missing path left out
    (paths("oauth", "oauth.clientId", "oauth.secret"), ["oauth.clientId", "oauth.secret"]),
    (paths("zeta", "alpha.b", "auth.x"), ["alpha.b", "auth.x", "zeta"]),
    ({("oauth",), ("oauth",)}, ["oauth"]),
    ({()}, []),
]


@pytest.mark.parametrize(("referenced", "expected"), MISSING_CASES)
def test_missing_connector_paths(referenced: set[tuple[str, ...]], expected: list[str]) -> None:
    assert missing_connector_paths(CONNECTOR, referenced) == expected


def test_missing_connector_paths_accepts_any_iterable() -> None:
    referenced = iter([("a",), ("a",), ("auth",)])
    assert missing_connector_paths(CONNECTOR, referenced) == ["a"]


def test_metadata_keys() -> None:
    assert {
        "schemaVersion",
        "connectorType",
        "displayName",
        "description",
        "version",
        "notes",
        "files",
    } == METADATA_KEYS


def leaf_paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(value, dict):
        children = [(str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        children = [(str(index), item) for index, item in enumerate(value)]
    else:
        return [prefix]
    return [prefix] + [path for key, item in children for path in leaf_paths(item, (*prefix, key))]


@quick
@given(json_objects)
def test_every_path_of_a_connector_is_present(connector: dict[str, Any]) -> None:
    assert missing_connector_paths(connector, leaf_paths(connector)) == []


def test_contract_example_after_overrides() -> None:
    connector = {
        "runtime": {"language": "python", "entryPoint": "runner_entrypoint.py"},
        "configuration": {"spreadsheetId": "SPREADSHEET_ID", "sheetName": "Sheet1"},
        "files": {
            "runner_entrypoint.py": (
                "import json, os\n"
                "cfg = context['connector']['configuration']\n"
                "print(context.connector.configuration.valueToInsert)\n"
                "print(connector.get('auth', {}).get('clientId'), os.environ['CLIENT_ID'])\n"
            )
        },
    }
    overrides = {"configuration": {"valueToInsert": "Value set at execution time"}}
    merged = deep_merge(connector, overrides)
    referenced = connector_paths(merged["files"])
    assert missing_connector_paths(connector, referenced) == [
        "auth.clientId",
        "configuration.valueToInsert",
    ]
    assert missing_connector_paths(merged, referenced) == ["auth.clientId"]
    assert required_env(merged["files"], merged) == {"CLIENT_ID"}


# ---------------------------------------------------------------- required_env

ENV_FILE_CASES = [
    # placeholders, in any file
    ("config.json", '{"id": "{{env:CLIENT_ID}}"}', {"CLIENT_ID"}),
    ("main.py", "token = '{{ env:TOKEN }}'", {"TOKEN"}),
    ("main.js", "{{env : A_1}} {{env:_B}}", {"A_1", "_B"}),
    ("main.js", "{{env:1BAD}} {{env:}} {env:X} {{ env:A-B }} {{envy:X}}", set()),
    # process.env, in any file
    ("main.js", "const id = process.env.CLIENT_ID;", {"CLIENT_ID"}),
    ("main.ts", "process.env['A'] + process.env[\"B\"] + process.env?.C", {"A", "B", "C"}),
    ("main.py", "# process.env.FROM_COMMENT", {"FROM_COMMENT"}),
    ("main.js", "process.env[key]; process.env; process.environment.X", set()),
    ("main.js", "myprocess.env.X; x.process.env.Y; process.env.Z$", set()),
    # Python: required reads
    ("main.py", "import os\nx = os.environ['CLIENT_ID']", {"CLIENT_ID"}),
    ("main.py", 'from os import environ\nx = environ["SECRET"]', {"SECRET"}),
    # Python: optional reads, writes, strings and comments do not count
    ("main.py", "import os\nx = os.environ.get('A')", set()),
    ("main.py", "import os\nx = os.getenv('A', 'default')", set()),
    ("main.py", "import os\nx = 'A' in os.environ", set()),
    ("main.py", "import os\nos.environ['A'] = '1'\ndel os.environ['B']", set()),
    ("main.py", "x = 'os.environ[\"A\"]'  # environ['B']", set()),
    ("main.py", "x = os.environ[name]\ny = other.environ['A']\nz = os.environ['not-a-key']", set()),
    # the Python forms are Python-only; a broken Python file is scanned as text
    ("main.js", "os.environ['A']", set()),
    ("main.py", "def broken(:\n    os.environ['A']; environ[\"B\"]", {"A", "B"}),
]


@pytest.mark.parametrize(("filename", "source", "expected"), ENV_FILE_CASES)
def test_required_env_in_files(filename: str, source: str, expected: set[str]) -> None:
    assert required_env({filename: source}, {}) == expected


def test_required_env_in_json_values() -> None:
    values = {
        "auth": {"clientId": "{{env:CLIENT_ID}}", "scopes": ["a", "{{ env:SCOPE }}"]},
        "{{env:IN_KEY}}": "key names are not scanned",
        "nested": [[{"deep": "prefix-{{env:DEEP}}-suffix"}]],
        "numbers": [1, 2.5, True, None],
    }
    assert required_env({}, values) == {"CLIENT_ID", "SCOPE", "DEEP"}


@pytest.mark.parametrize(
    ("values", "expected"),
    [(None, set()), (3, set()), ("{{env:TOP}}", {"TOP"}), (["{{env:TOP}}"], {"TOP"})],
)
def test_required_env_any_json_value(values: Any, expected: set[str]) -> None:
    assert required_env({}, values) == expected


def test_required_env_combines_files_and_values() -> None:
    files = {"a.py": "import os\nos.environ['A']", "b.js": "process.env.B"}
    assert required_env(files, {"c": "{{env:C}}"}) == {"A", "B", "C"}


# ---------------------------------------------------------------- substitution


def test_env_placeholder_pattern() -> None:
    match = ENV_PLACEHOLDER.search("x {{  env  :  KEY_1  }} y")
    assert match is not None
    assert match["key"] == "KEY_1"


SUBSTITUTE_TEXT_CASES = [
    ("{{env:A}}", "1"),
    ("a={{ env:A }}, b={{env:B}}", "a=1, b=two"),
    ("{{env:UNKNOWN}}", "{{env:UNKNOWN}}"),
    ("{{env:A}}{{env:UNKNOWN}}", "1{{env:UNKNOWN}}"),
    ("{{env:LOOP}}", "{{env:A}}"),  # one pass: replacements are not rescanned
    ("{{env:BACKSLASH}}", "\\1 \\g<0>"),  # values are inserted literally
    ("no placeholders", "no placeholders"),
]
ENV = {"A": "1", "B": "two", "LOOP": "{{env:A}}", "BACKSLASH": "\\1 \\g<0>"}


@pytest.mark.parametrize(("text", "expected"), SUBSTITUTE_TEXT_CASES)
def test_substitute_env_text(text: str, expected: str) -> None:
    assert substitute_env_text(text, ENV) == expected


def test_substitute_env_replaces_every_string_value() -> None:
    value = {
        "auth": {"clientId": "{{env:A}}", "list": ["{{env:B}}", 3, None, True]},
        "{{env:A}}": "keys stay",
        "n": 1.5,
    }
    original = copy.deepcopy(value)
    result = substitute_env(value, ENV)
    assert result == {
        "auth": {"clientId": "1", "list": ["two", 3, None, True]},
        "{{env:A}}": "keys stay",
        "n": 1.5,
    }
    assert value == original
    assert result["auth"] is not value["auth"]


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in strings_in(item)]
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    return []


@quick
@given(json_values)
def test_substitute_env_without_placeholders_is_identity(value: Any) -> None:
    assume(not any(ENV_PLACEHOLDER.search(text) for text in strings_in(value)))
    assert substitute_env(value, ENV) == value


@quick
@given(st.text())
def test_substitute_env_text_without_placeholders_is_identity(text: str) -> None:
    assume(ENV_PLACEHOLDER.search(text) is None)
    assert substitute_env_text(text, ENV) == text


# ---------------------------------------------------------------- deep_merge

MERGE_CASES = [
    ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
    ({"a": 1}, {"a": 2}, {"a": 2}),
    ({"a": {"x": 1, "y": 2}}, {"a": {"y": 3, "z": 4}}, {"a": {"x": 1, "y": 3, "z": 4}}),
    ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"d": 3}}}, {"a": {"b": {"c": 1, "d": 3}}}),
    ({"a": [1, 2, 3]}, {"a": [4]}, {"a": [4]}),  # lists replace
    ({"a": {"x": 1}}, {"a": None}, {"a": None}),  # null replaces
    ({"a": {"x": 1}}, {"a": "text"}, {"a": "text"}),
    ({"a": "text"}, {"a": {"x": 1}}, {"a": {"x": 1}}),
    ({"a": {"x": 1}}, {"a": {}}, {"a": {"x": 1}}),
    ({}, {}, {}),
]


@pytest.mark.parametrize(("base", "overrides", "expected"), MERGE_CASES)
def test_deep_merge(base: dict[str, Any], overrides: dict[str, Any], expected: Any) -> None:
    assert deep_merge(base, overrides) == expected


def test_deep_merge_shares_nothing_with_its_inputs() -> None:
    base = {"a": {"x": [1]}, "b": {"y": 1}}
    overrides = {"b": {"z": [2]}}
    merged = deep_merge(base, overrides)
    merged["a"]["x"].append(9)
    merged["b"]["z"].append(9)
    merged["b"]["y"] = 9
    assert base == {"a": {"x": [1]}, "b": {"y": 1}}
    assert overrides == {"b": {"z": [2]}}


@quick
@given(json_objects, json_objects)
def test_deep_merge_laws(base: dict[str, Any], overrides: dict[str, Any]) -> None:
    before = copy.deepcopy((base, overrides))
    merged = deep_merge(base, overrides)
    assert (base, overrides) == before
    assert deep_merge(base, {}) == base
    assert deep_merge({}, overrides) == overrides
    assert deep_merge(base, base) == base
    assert deep_merge(merged, overrides) == merged
    assert set(merged) == set(base) | set(overrides)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            assert merged[key] == deep_merge(base[key], value)
        else:
            assert merged[key] == value
    for key in set(base) - set(overrides):
        assert merged[key] == base[key]
