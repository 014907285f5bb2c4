"""The playground's example menu, ``GET /playground/examples`` (in-process ASGI).

The seed example comes first; each connector folder becomes a whole request body, as
``streamsvc run DIR`` reads it (Python files and ``include`` patterns with relative paths,
``requirements.txt`` as dependencies, ``connector.json`` or ``.toml`` for the rest). Links,
cache or hidden folders are left out; a folder with an oversized file or a link out of it
is not an example (``streamsvc run DIR`` refuses it too).
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from streamsvc.connectors.request import decode_request
from streamsvc.web import examples
from tests.fake_azure import FakeAzure
from tests.harness import asgi_client, check_answer, seed_request, server_env

SEED = seed_request()


async def test_the_index_starts_with_the_seed(fake_azure: FakeAzure) -> None:
    async with asgi_client(server_env(fake_azure)) as app:
        answer = await app.get("/playground/examples")
    check_answer("/playground/examples", "get", answer)
    index = answer.json()["examples"]
    assert index[0]["id"] == "seed"
    assert index[0]["request"] == SEED
    for example in index:  # every entry is a body the endpoint accepts
        decode_request(json.dumps(example["request"]).encode())


def _folder(root: Path, hostile: bool = False) -> Path:
    folder = root / "csv-report"
    (folder / "lib").mkdir(parents=True)
    (folder / "main.py").write_text("from lib.rows import rows\nprint(rows())\n")
    (folder / "lib" / "rows.py").write_text("def rows():\n    return [1, 2]\n")
    (folder / "lib" / "header.csv").write_text("n,square\n")
    (folder / "notes.md").write_text("not sent: neither Python nor included\n")
    (folder / "requirements.txt").write_text("# pinned\nrequests==2.32.3  # http\n\n")
    manifest = {
        "name": "CSV report",
        "description": "Writes a CSV.",
        "runtime": {"timeoutMs": 5000, "network": "none"},
        "configuration": {"rows": 2},
        "include": ["lib/*.csv"],
    }
    (folder / "connector.json").write_text(json.dumps(manifest))
    for skipped in (".git", "__pycache__", "venv"):
        (folder / skipped).mkdir()
        (folder / skipped / "x.py").write_text("x = 1\n")
    if hostile:
        (folder / "big.py").write_text("#" * (examples.MAX_FILE_BYTES + 1))
        (folder / "linked.py").symlink_to(root / "outside.py")
        (root / "outside.py").write_text("print('outside')\n")
    return folder


def test_a_connector_folder_becomes_a_request(tmp_path: Path) -> None:
    example = examples.folder_example(_folder(tmp_path))
    assert example is not None
    assert (example.id, example.title, example.description) == (
        "csv-report",
        "CSV report",
        "Writes a CSV.",
    )
    connector = example.request["connector"]
    assert sorted(connector["files"]) == ["lib/header.csv", "lib/rows.py", "main.py"]
    assert connector["runtime"] == {
        "timeoutMs": 5000,
        "language": "python",
        "entryPoint": "main.py",
        "dependencies": ["requests==2.32.3"],
    }
    assert example.request["network_mode"] == "none"
    assert connector["configuration"] == {"rows": 2}
    assert "include" not in connector
    decode_request(msgspec.json.encode(example.request))


def test_a_folder_with_an_oversized_file_or_an_outside_link_is_not_an_example(
    tmp_path: Path,
) -> None:
    folder = _folder(tmp_path, hostile=True)
    assert examples.folder_example(folder) is None
    (folder / "big.py").unlink()
    assert examples.folder_example(folder) is None  # the link out is left
    (folder / "linked.py").unlink()
    assert examples.folder_example(folder) is not None


def test_a_toml_manifest_in_snake_case(tmp_path: Path) -> None:
    folder = tmp_path / "hello"
    folder.mkdir()
    (folder / "hello.py").write_text("print('hi')\n")
    (folder / "connector.toml").write_text(
        'name = "hello"\n[runtime]\ntimeout_ms = 3000\n[configuration]\nwho = "world"\n'
    )
    example = examples.folder_example(folder)
    assert example is not None
    runtime = example.request["connector"]["runtime"]
    assert runtime == {"timeoutMs": 3000, "language": "python", "entryPoint": "hello.py"}
    assert example.request["connector"]["configuration"] == {"who": "world"}
    # Both manifests, or a broken one: not an example.
    (folder / "connector.json").write_text("{}")
    assert examples.folder_example(folder) is None
    (folder / "connector.json").unlink()
    (folder / "connector.toml").write_text("name = ")
    assert examples.folder_example(folder) is None


def test_the_menu_lists_the_folders_of_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _folder(tmp_path)
    (tmp_path / "not-a-connector").mkdir()
    (tmp_path / "not-a-connector" / "README.md").write_text("no code here")
    monkeypatch.setattr(examples, "examples_dir", lambda: tmp_path)
    index = examples.load_examples().examples
    assert [e.id for e in index] == ["seed", "csv-report"]
