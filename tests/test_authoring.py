"""Connector folders: ``load_folder`` on folders made here, ``streamsvc init`` run for real.

The scaffold and a folder with a ``requirements.txt`` run through the ``streamsvc`` command
against the session's server on the real engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamsvc.authoring import AuthoringError, init, load_folder, load_request
from tests.harness import ServerProcess, streamsvc


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def test_a_folder_becomes_a_request_with_relative_paths(tmp_path: Path) -> None:
    folder = write(
        tmp_path,
        {
            "connector.json": json.dumps(
                {
                    "name": "demo",
                    "auth": {"clientId": "x"},
                    "runtime": {"entryPoint": "app.py", "memoryMb": 128, "network": "bridge"},
                    "configuration": {"a": 1},
                    "include": ["data/*.csv"],
                }
            ),
            "app.py": "from lib.util import f\n",
            "lib/__init__.py": "",
            "lib/util.py": "def f(): pass\n",
            "data/rows.csv": "a,b\n",
            "data/notes.txt": "not included\n",
            "__pycache__/app.cpython-311.py": "skipped\n",
            ".venv/lib/site.py": "skipped\n",
            "requirements.txt": "# a comment\nrequests==2.32.3  # pinned\n\nidna\n",
        },
    )
    body = load_folder(folder)
    connector = body["connector"]
    assert body["network_mode"] == "bridge"
    assert sorted(connector["files"]) == [
        "app.py",
        "data/rows.csv",
        "lib/__init__.py",
        "lib/util.py",
    ]
    assert connector["runtime"] == {
        "entryPoint": "app.py",
        "memoryMb": 128,
        "language": "python",
        "dependencies": ["requests==2.32.3", "idna"],
    }
    assert connector["name"] == "demo" and connector["auth"] == {"clientId": "x"}
    assert connector["configuration"] == {"a": 1}
    assert "include" not in connector
    assert load_request(folder) == body


def test_a_toml_manifest_reads_like_json_and_snake_case_runtime_keys_work(tmp_path: Path) -> None:
    folder = write(
        tmp_path,
        {
            "connector.toml": '[runtime]\nentry_point = "run.py"\ntimeout_ms = 5000\n'
            '[configuration]\nsheet = "S1"\n',
            "run.py": "print(1)\n",
        },
    )
    connector = load_folder(folder)["connector"]
    assert connector["runtime"] == {"entryPoint": "run.py", "timeoutMs": 5000, "language": "python"}
    assert connector["configuration"] == {"sheet": "S1"}


def test_without_a_manifest_main_py_or_the_only_file_is_the_entry_point(tmp_path: Path) -> None:
    only = write(tmp_path / "only", {"job.py": "print(1)\n"})
    assert load_folder(only)["connector"]["runtime"]["entryPoint"] == "job.py"
    two = write(tmp_path / "two", {"main.py": "", "other.py": ""})
    assert load_folder(two)["connector"]["runtime"]["entryPoint"] == "main.py"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"main.py": "", "requirements.txt": "-r other.txt\n"}, "pip options (-r)"),
        ({"main.py": "", "connector.json": "{}", "connector.toml": ""}, "keep one"),
        ({"main.py": "", "connector.json": "[1]"}, "must hold an object"),
        ({"main.py": "", "connector.json": "{nope"}, "not valid JSON"),
        ({"main.py": "", "connector.json": '{"files": {}}'}, "files come from the folder"),
        ({"main.py": "", "connector.json": '{"include": ["*.csv"]}'}, "matches no file"),
        ({"notes.txt": ""}, "no Python file"),
        (
            {
                "main.py": "",
                "requirements.txt": "idna\n",
                "connector.json": '{"runtime": {"dependencies": ["idna"]}}',
            },
            "in both",
        ),
    ],
)
def test_unusable_folders_are_refused_naming_the_problem(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    with pytest.raises(AuthoringError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_folder(write(tmp_path, files))


def test_a_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.py"
    outside.write_text("TOKEN = 'x'\n")
    folder = write(tmp_path / "c", {"main.py": ""})
    (folder / "linked.py").symlink_to(outside)
    with pytest.raises(AuthoringError, match="a link out of the folder"):
        load_folder(folder)


@pytest.mark.parametrize("pattern", ["../*.txt", "/etc/host*", "sub/../../*.txt"])
def test_an_include_pattern_that_leaves_the_folder_is_refused(tmp_path: Path, pattern: str) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "main.py").write_text("print(1)\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    (folder / "connector.json").write_text(json.dumps({"include": [pattern]}))
    with pytest.raises(AuthoringError, match="leaves the folder"):
        load_folder(folder)


def test_init_refuses_a_folder_with_files(tmp_path: Path) -> None:
    write(tmp_path / "taken", {"keep.txt": "mine"})
    with pytest.raises(AuthoringError, match="not an empty folder"):
        init(tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.docker
def test_init_scaffolds_a_connector_that_runs_as_is(server: ServerProcess, tmp_path: Path) -> None:
    created = streamsvc("init", "my-connector", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert "next: streamsvc run my-connector" in created.stdout
    assert sorted(p.name for p in (tmp_path / "my-connector").iterdir()) == [
        "connector.json",
        "main.py",
        "requirements.txt",
    ]
    again = streamsvc("init", "my-connector", cwd=tmp_path)
    assert again.returncode == 2 and "not an empty folder" in again.stderr

    done = streamsvc("run", "my-connector", "--json", "--url", server.url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["result"] == {"greeting": "Hello, world!"}
    assert [f["name"] for f in result["files"]] == ["greeting.txt"]
    changed = streamsvc(
        "run", "my-connector", "--set", "who=Ada", "--save", "out", "--url", server.url,
        cwd=tmp_path,
    )  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.startswith("Hello, Ada!\n")
    assert (tmp_path / "out" / "greeting.txt").read_text() == "Hello, Ada!\n"
    assert "[streamsvc] file greeting.txt (12 bytes)" in changed.stderr


@pytest.mark.docker
def test_run_folder_with_requirements_imports_the_package(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The issue's "done when": requirements.txt names a package the code imports (and the
    manifest is TOML)."""
    write(
        tmp_path / "needs-idna",
        {
            "requirements.txt": "idna==3.10\n",
            "connector.toml": '[runtime]\nentry_point = "app.py"\n[configuration]\n'
            'host = "bücher.example"\n',
            "app.py": "import idna\n\ndef run(context):\n"
            "    host = context['connector']['configuration']['host']\n"
            "    return {'ascii': idna.encode(host).decode()}\n",
        },
    )
    done = streamsvc("run", "needs-idna", "--json", "--url", server.url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert json.loads(done.stdout)["result"] == {"ascii": "xn--bcher-kva.example"}
