"""Cost bounds of connector analysis: one pass per file, the ``ast`` budget, the time limit.

Past ``AST_BUDGET_CHARS`` Python is scanned as text (so comments count there); a worker plan
past ``PLAN_TIMEOUT_S`` is killed and answered ``connector_too_complex``.
"""

from __future__ import annotations

import json

import pytest

from streamsvc.connectors import request
from streamsvc.connectors.analysis import AST_BUDGET_CHARS, analyse, connector_paths, required_env
from streamsvc.errors import ConnectorTooComplex
from streamsvc.settings import SandboxSettings

SOURCE = 'import os\nkey = os.environ["TOKEN"]\nsheet = connector.configuration.sheet\n'


def test_one_pass_gives_the_paths_and_the_env_keys() -> None:
    files = {"main.py": SOURCE, "b.js": "process.env.JS_KEY; connector.auth.id"}
    found = analyse(files)
    assert found.paths == connector_paths(files) == {("configuration", "sheet"), ("auth", "id")}
    assert found.env == required_env(files, {}) == {"TOKEN", "JS_KEY"}


def test_files_past_the_ast_budget_are_scanned_as_text() -> None:
    source = SOURCE + '# connector.in_comment environ["IN_COMMENT"]\n'
    parsed = analyse({"main.py": source})
    assert parsed.paths == {("configuration", "sheet")}
    assert parsed.env == {"TOKEN"}
    scanned = analyse({"main.py": source}, ast_budget=len(source) - 1)
    assert scanned.paths == {("configuration", "sheet"), ("in_comment",)}
    assert scanned.env == {"TOKEN", "IN_COMMENT"}


def test_the_budget_is_for_all_files_of_a_request() -> None:
    comment = "# connector.noted\n"
    files = {"a.py": comment + "x = 1\n" * 10, "b.py": comment}
    assert analyse(files).paths == set()
    budget = len(files["a.py"])  # a.py uses it all: b.py is scanned
    assert analyse(files, ast_budget=budget).paths == {("noted",)}
    big = {"a.py": "x = 1\n" * (AST_BUDGET_CHARS // 6 + 1), "b.py": comment}
    assert analyse(big).paths == set()  # a file past the budget leaves the rest to others


def test_files_without_the_words_are_not_parsed() -> None:
    # Invalid Python without "connector" or "environ" needs no parse to find nothing.
    assert analyse({"a.py": "def (:\n" * 100}) == (set(), set())


async def test_a_worker_plan_past_the_time_limit_is_connector_too_complex(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payload = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py"},
            "files": {"main.py": "# connector\n" + "x[0]\n" * 50_000},
        }
    }
    raw = json.dumps(payload).encode()
    assert len(raw) > request.INLINE_PLAN_BYTES
    settings = SandboxSettings()
    monkeypatch.setattr(request, "PLAN_TIMEOUT_S", 0.001)
    with pytest.raises(ConnectorTooComplex) as caught:
        await request.plan_off_loop(request.decode_request(raw), raw, settings, 4 << 20)
    assert caught.value.status == 400
    assert caught.value.code == "connector_too_complex"
    assert caught.value.path == "connector.files"
    monkeypatch.setattr(request, "PLAN_TIMEOUT_S", 60.0)  # and the planners are free again
    spec = await request.plan_off_loop(request.decode_request(raw), raw, settings, 4 << 20)
    assert spec.entry_point == "main.py"
