"""Every connector of ``examples/`` runs on the real engine through ``streamsvc run``.

Each test checks what its example computes, so a broken example (or a folder feature it
relies on: modules in sub-folders, configuration, a requirements.txt) fails here.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, ServerProcess, streamsvc

pytestmark = pytest.mark.docker

EXAMPLES = ROOT / "examples"


def run(server: ServerProcess, name: str, tmp_path: Path, *options: str) -> dict[str, Any]:
    done = streamsvc(
        "run", str(EXAMPLES / name), "--json", "--url", server.url, *options, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr + done.stdout
    answer: dict[str, Any] = json.loads(done.stdout)
    assert answer["ok"] is True, answer
    return answer


def test_every_example_has_a_test() -> None:
    tested = {"hello", "word-stats", "csv-report"}
    assert {p.name for p in EXAMPLES.iterdir() if p.is_dir()} == tested


def test_hello_imports_its_own_module_and_takes_overrides(
    server: ServerProcess, tmp_path: Path
) -> None:
    assert run(server, "hello", tmp_path)["result"] == {"greeting": "Hello, world!"}
    answer = run(server, "hello", tmp_path, "--set", "who=Ada", "--set", "punctuation=?")
    assert answer["result"] == {"greeting": "Hello, Ada?"}
    assert answer["stdout"].startswith("Hello, Ada?\n")


def test_word_stats_uses_its_dependency(server: ServerProcess, tmp_path: Path) -> None:
    answer = run(server, "word-stats", tmp_path)
    assert answer["result"] == {
        "words": 14,
        "distinct": 11,
        "most_common": {"word": "the", "times": 3, "ordinal": "3rd"},
        "summary": "three times: the",
    }
    assert answer["stderr"] == "read 65 Bytes\n"  # humanize.naturalsize


def test_csv_report_writes_its_files(server: ServerProcess, tmp_path: Path) -> None:
    answer = run(server, "csv-report", tmp_path)
    assert answer["result"] == {"regions": 3, "total": 272.75}
    assert answer["stdout"].startswith("3 regions written to report.csv\n")
    files = {file["name"]: file for file in answer["files"]}
    assert sorted(files) == ["report.csv", "summary.json"]
    report = base64.b64decode(files["report.csv"]["content_base64"])
    assert report == b"region,total\r\neast,42.25\r\nnorth,150.50\r\nsouth,80.00\r\n"
    assert files["report.csv"]["size"] == len(report)
    assert files["report.csv"]["sha256"] == hashlib.sha256(report).hexdigest()
    summary = json.loads(base64.b64decode(files["summary.json"]["content_base64"]))
    assert summary == {"regions": 3, "total": 272.75}


def test_save_writes_the_files_that_came_back(server: ServerProcess, tmp_path: Path) -> None:
    done = streamsvc(
        "run", str(EXAMPLES / "csv-report"), "--save", "out", "--url", server.url, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "report.csv").read_text().startswith("region,total\n")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["regions"] == 3
    assert "[streamsvc] saved out/report.csv" in done.stderr
