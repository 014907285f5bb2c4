"""Tests for streamsvc.connectors.dependencies: the accepted forms and everything rejected."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from streamsvc.connectors.dependencies import (
    MAX_DEPENDENCIES,
    Dependency,
    dependency_key,
    parse_dependencies,
)
from streamsvc.errors import Problem

quick = settings(database=None, deadline=None, max_examples=200)

PATH = "connector.runtime.dependencies"


def requirements(raw: Any) -> list[str]:
    """The requirement strings of a valid input; fails on any problem."""
    deps, problems = parse_dependencies(raw)
    assert problems == []
    return [dep.requirement for dep in deps]


def problem_list(raw: Any, **kwargs: Any) -> list[tuple[str, str]]:
    """The (code, path) of every problem; fails if any dependency slipped through."""
    _, problems = parse_dependencies(raw, **kwargs)
    return [(problem.code, problem.path) for problem in problems]


# ---------------------------------------------------------------- accepted forms


@pytest.mark.parametrize("raw", [None, [], {}])
def test_nothing_to_install(raw: Any) -> None:
    assert parse_dependencies(raw) == ([], [])


VALID_STRINGS = [
    ("requests", "requests"),
    ("requests==2.32.3", "requests==2.32.3"),
    ("Requests == 2.32.3", "requests==2.32.3"),
    ("requests>=2,<3", "requests<3,>=2"),
    ("requests >= 2.0, < 3", "requests<3,>=2.0"),
    ("requests<3,>=2,>=2", "requests<3,>=2"),
    ("requests~=2.3", "requests~=2.3"),
    ("requests!=2.0.*", "requests!=2.0.*"),
    ("requests==2.*", "requests==2.*"),
    ("requests==2.32.03", "requests==2.32.3"),
    ("requests==v2.0-rc1", "requests==2.0rc1"),
    ("torch==2.3.0+cpu", "torch==2.3.0+cpu"),
    ("pkg==1!2.0", "pkg==1!2.0"),
    ("Typing_Extensions", "typing-extensions"),
    ("zope.interface", "zope-interface"),
    ("foo[bar]>=1,<2", "foo[bar]<2,>=1"),
    ("foo[Baz, bar,bar]", "foo[bar,baz]"),
    ("foo [bar] >=1", "foo[bar]>=1"),
    ("foo[]", "foo"),
    ("a", "a"),
    ("a" * 100, "a" * 100),
]


@pytest.mark.parametrize(("text", "expected"), VALID_STRINGS)
def test_requirement_strings(text: str, expected: str) -> None:
    assert requirements([text]) == [expected]


VALID_VERSIONS = [
    (None, ""),
    ("", ""),
    ("*", ""),
    ("2.32.3", "==2.32.3"),
    ("v2.32", "==2.32"),
    ("2.0.post1", "==2.0.post1"),
    ("==2.32.3", "==2.32.3"),
    (">=2,<3", "<3,>=2"),
    ("~=2.3", "~=2.3"),
    ("!=1.5", "!=1.5"),
    ("==1.*", "==1.*"),
]


@pytest.mark.parametrize(("version", "specifier"), VALID_VERSIONS)
def test_object_form_versions(version: str | None, specifier: str) -> None:
    assert requirements([{"name": "requests", "version": version}]) == [f"requests{specifier}"]


@pytest.mark.parametrize(("version", "specifier"), VALID_VERSIONS)
def test_map_form_versions(version: str | None, specifier: str) -> None:
    assert requirements({"requests": version}) == [f"requests{specifier}"]


def test_object_form_version_is_optional() -> None:
    assert requirements([{"name": "Requests"}]) == ["requests"]


def test_object_and_map_names_may_carry_extras() -> None:
    assert requirements([{"name": "foo[B,a]", "version": "1.0"}]) == ["foo[a,b]==1.0"]
    assert requirements({"foo[b]": ">=1"}) == ["foo[b]>=1"]


def test_contract_example() -> None:
    deps, problems = parse_dependencies([{"name": "requests", "version": "2.32.3"}])
    assert problems == []
    assert deps == [Dependency(name="requests", extras=(), specifier="==2.32.3")]


def test_forms_mix_within_a_list_and_result_is_sorted() -> None:
    raw = ["six", {"name": "Requests", "version": "2.32.3"}, "attrs>=23"]
    assert requirements(raw) == ["attrs>=23", "requests==2.32.3", "six"]


def test_all_forms_give_the_same_result() -> None:
    as_strings = parse_dependencies(["requests==2.32.3", "six"])
    as_objects = parse_dependencies([{"name": "six"}, {"name": "requests", "version": "2.32.3"}])
    as_map = parse_dependencies({"six": "*", "requests": "2.32.3"})
    assert as_strings == as_objects == as_map


def test_dependency_requirement() -> None:
    assert Dependency("requests").requirement == "requests"
    assert Dependency("foo", ("a", "b"), "<2,>=1").requirement == "foo[a,b]<2,>=1"


def test_dependency_key() -> None:
    deps, _ = parse_dependencies(["six", "requests==2.32.3", "foo[bar]"])
    assert dependency_key(deps) == "foo[bar]\nrequests==2.32.3\nsix"
    assert dependency_key(list(reversed(deps))) == dependency_key(deps)
    assert dependency_key([*deps, deps[0]]) == dependency_key(deps)
    assert dependency_key([]) == ""


def test_same_set_written_differently_has_the_same_key() -> None:
    first, _ = parse_dependencies(["Requests>=2.0,<3", "typing_extensions"])
    second, _ = parse_dependencies({"typing-extensions": None, "requests": "< 3, >=2.0"})
    assert dependency_key(first) == dependency_key(second)


# ---------------------------------------------------------------- rejected entries

INVALID_STRINGS = [
    # pip options
    "--index-url https://evil.example/simple",
    "--extra-index-url=https://x",
    "-e .",
    "-r requirements.txt",
    "-c constraints.txt",
    "--pre",
    # direct references and URLs
    "pkg @ https://example.com/pkg.whl",
    "pkg@file:///tmp/pkg",
    "git+https://github.com/psf/requests",
    "https://example.com/pkg.tar.gz",
    # paths
    "./pkg",
    "/opt/pkg",
    "..",
    ".",
    "pkg/sub",
    "C:\\pkg",
    "~/pkg",
    # environment markers
    'requests; python_version < "3.12"',
    "requests;sys_platform=='linux'",
    # whitespace tricks
    " requests",
    "requests ",
    "requests\n--index-url https://x",
    "requests\t==2.0",
    "requests\u00a0==2.0",
    "\u200brequests",
    "re quests",
    # shell metacharacters and other characters
    "requests && rm -rf /",
    "requests|sh",
    "$(whoami)",
    "`id`",
    "requests'",
    'requests"',
    "requests#egg",
    "requests%20",
    "requests?x",
    # look-alike Unicode: dotless i and the Kelvin sign match [a-z] case-insensitively
    "p\u0131p",
    "\u212aeras",
    "réquests",
    # bad names, extras and versions
    "",
    "   ",
    "a" * 101,
    "_private",
    "requests-",
    "foo[bar",
    "foo[bar]]",
    "foo[-bar]",
    "foo[a,,b]",
    "foo[bar]baz",
    "requests==",
    "requests==not-a-version",
    "requests>=2,",
    "requests==2.0,,<3",
    "requests<>2",
    "requests~=2",
    "requests>=2.0.*",
    "requests===2.0",
    "requests===anything",
    "requests 2.0",
    "requests=2.0",
    "=" * 10,
    "x" * 150 + "==1",
]


@pytest.mark.parametrize("text", INVALID_STRINGS)
def test_invalid_requirement_strings(text: str) -> None:
    deps, problems = parse_dependencies(["six", text])
    assert deps == [Dependency("six")]
    assert [(p.code, p.path) for p in problems] == [("invalid_dependency", f"{PATH}[1]")]
    assert problems[0].message


INVALID_VERSIONS: list[Any] = [
    2,
    2.5,
    True,
    [],
    {},
    "latest",
    "2.0 ",
    " 2.0",
    "2.0; python_version<'3'",
    "@ https://x",
    "--pre",
    ">=",
    "==2.0,",
    "===2.0",
    "2.*",
    "2.0\n",
]


@pytest.mark.parametrize("version", INVALID_VERSIONS)
def test_invalid_versions_in_object_form(version: Any) -> None:
    raw = [{"name": "requests", "version": version}]
    assert problem_list(raw) == [("invalid_dependency", f"{PATH}[0].version")]


@pytest.mark.parametrize("version", INVALID_VERSIONS)
def test_invalid_versions_in_map_form(version: Any) -> None:
    assert problem_list({"requests": version}) == [("invalid_dependency", f"{PATH}.requests")]


INVALID_NAMES: list[Any] = [
    None,
    3,
    ["requests"],
    "",
    "requests==2.0",
    "requests>=2",
    "pkg @ https://x",
    "./pkg",
    "-e",
    "a" * 101,
    "foo[bar",
    "re quests",
]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_in_object_form(name: Any) -> None:
    raw = [{"name": name, "version": "1.0"}]
    assert problem_list(raw) == [("invalid_dependency", f"{PATH}[0].name")]


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("", f'{PATH}[""]'),
        ("requests==2.0", f'{PATH}["requests==2.0"]'),
        ("./pkg", f'{PATH}["./pkg"]'),
        ("-e", f"{PATH}.-e"),
        ("a b", f'{PATH}["a b"]'),
        ("zope.interface[", f'{PATH}["zope.interface["]'),
    ],
)
def test_invalid_names_in_map_form(name: str, path: str) -> None:
    assert problem_list({name: "1.0"}) == [("invalid_dependency", path)]


def test_non_string_map_keys() -> None:
    assert problem_list({3: "1.0"}) == [("invalid_dependency", f"{PATH}[3]")]


@pytest.mark.parametrize("item", [3, 2.5, True, None, ["requests"]])
def test_list_items_of_the_wrong_type(item: Any) -> None:
    assert problem_list([item]) == [("invalid_dependency", f"{PATH}[0]")]


@pytest.mark.parametrize("raw", ["requests==2.0", 3, True, 2.5])
def test_dependencies_of_the_wrong_type(raw: Any) -> None:
    assert problem_list(raw) == [("invalid_dependency", PATH)]


def test_object_form_problems() -> None:
    raw = [
        {"name": "requests", "version": "2.0", "url": "https://x", "hash": "abc"},
        {"version": "1.0"},
        {"name": 3, "version": 2},
    ]
    _, problems = parse_dependencies(raw)
    assert [(p.code, p.path) for p in problems] == [
        ("invalid_dependency", f"{PATH}[0]"),
        ("invalid_dependency", f"{PATH}[1].name"),
        ("invalid_dependency", f"{PATH}[2].name"),
        ("invalid_dependency", f"{PATH}[2].version"),
    ]
    assert "'hash', 'url'" in problems[0].message


def test_every_problem_is_reported_and_valid_entries_kept() -> None:
    raw = ["six", "-e .", "requests==2.0", "pkg @ https://x", 7, "Six", "attrs"]
    deps, problems = parse_dependencies(raw)
    assert [dep.requirement for dep in deps] == ["attrs", "requests==2.0", "six"]
    assert [(p.code, p.path) for p in problems] == [
        ("invalid_dependency", f"{PATH}[1]"),
        ("invalid_dependency", f"{PATH}[3]"),
        ("invalid_dependency", f"{PATH}[4]"),
        ("duplicate_dependency", f"{PATH}[5]"),
    ]


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (["requests", "requests==2.0"], f"{PATH}[1]"),
        (["Requests", "requests"], f"{PATH}[1]"),
        (["typing_extensions", "Typing.Extensions"], f"{PATH}[1]"),
        (["foo[a]", "foo[b]"], f"{PATH}[1]"),
        ([{"name": "a-b"}, "A_B>=1"], f"{PATH}[1]"),
        ({"requests": "1", "Requests": "2"}, f"{PATH}.Requests"),
    ],
)
def test_duplicates(raw: Any, path: str) -> None:
    deps, problems = parse_dependencies(raw)
    assert len(deps) == 1
    assert [(p.code, p.path) for p in problems] == [("duplicate_dependency", path)]


def test_too_many_dependencies() -> None:
    raw = [f"pkg{index}" for index in range(MAX_DEPENDENCIES + 1)]
    assert problem_list(raw) == [("too_many_dependencies", PATH)]
    assert problem_list(raw[:MAX_DEPENDENCIES]) == []


def test_count_limit_is_a_parameter_and_bounds_the_work() -> None:
    raw = {"a": "1", "b": "2", "-e": "3"}
    assert problem_list(raw, max_count=3) == [("invalid_dependency", f"{PATH}.-e")]
    assert problem_list(raw, max_count=2) == [("too_many_dependencies", PATH)]
    assert problem_list(["x"] * 100_000, max_count=1) == [("too_many_dependencies", PATH)]


def test_custom_path() -> None:
    assert problem_list(["-e ."], path="deps") == [("invalid_dependency", "deps[0]")]


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from(["requests", "a==1", "foo[bar]>=1,<2", "2.32.3", "*", "", "-e ."]),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
        | st.fixed_dictionaries({"name": inner}, optional={"version": inner})
    ),
    max_leaves=30,
)
name_part = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,10}[A-Za-z0-9])?", fullmatch=True)
version_part = st.lists(st.integers(0, 999), min_size=2, max_size=4).map(
    lambda parts: ".".join(map(str, parts))
)
operator = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "~="])
requirement_text = st.builds(
    lambda name, pairs: name + ",".join(op + version for op, version in pairs),
    name_part,
    st.lists(st.tuples(operator, version_part), max_size=3),
)


@quick
@given(json_values)
def test_never_raises(raw: Any) -> None:
    deps, problems = parse_dependencies(raw)
    assert all(isinstance(problem, Problem) for problem in problems)
    assert [dep.name for dep in deps] == sorted({dep.name for dep in deps})


@quick
@given(st.text())
def test_any_string_parses_or_is_rejected(text: str) -> None:
    deps, problems = parse_dependencies([text])
    assert (len(deps) == 1) != bool(problems)
    if deps:
        assert parse_dependencies([deps[0].requirement]) == (deps, [])


@quick
@given(st.lists(requirement_text, max_size=8))
def test_requirements_round_trip(texts: list[str]) -> None:
    deps, problems = parse_dependencies(texts)
    assert {problem.code for problem in problems} <= {"duplicate_dependency"}
    assert parse_dependencies([dep.requirement for dep in deps]) == (deps, [])


@quick
@given(
    st.lists(requirement_text, max_size=8).flatmap(
        lambda xs: st.tuples(st.just(xs), st.permutations(xs))
    )
)
def test_key_ignores_order(texts_and_shuffled: tuple[list[str], list[str]]) -> None:
    texts, shuffled = texts_and_shuffled
    first, problems = parse_dependencies(texts)
    assume(not problems)
    second, _ = parse_dependencies(shuffled)
    assert second == first
    assert dependency_key(first) == dependency_key(second)
