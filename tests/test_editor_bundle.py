"""The playground's code editor bundle (streamsvc/web/static/editor.js) matches its source.

The bundle is built from editor/ (CodeMirror 6 pinned by package-lock.json, esbuild) and
committed so a pip install serves it offline. Its banner names the sha256 of the build's
inputs and the CodeMirror versions; these tests recompute both, so an input changed without
a rebuild fails here. ``scripts/build-editor --check`` rebuilds it byte for byte (it needs npm).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from tests.harness import ROOT

EDITOR = ROOT / "editor"
BUNDLE = ROOT / "streamsvc" / "web" / "static" / "editor.js"
#: A ceiling that keeps the editor small (CodeMirror's view, Python and JSON, no extras).
MAX_BUNDLE_BYTES = 600 * 1024


def banner() -> str:
    return "\n".join(BUNDLE.read_text().splitlines()[:3])


def test_the_bundle_was_built_from_the_committed_inputs() -> None:
    digest = hashlib.sha256()
    for name in ("package-lock.json", "src.mjs", "build.mjs"):
        digest.update((EDITOR / name).read_bytes())
    found = re.search(r"inputs sha256:([0-9a-f]{64})", banner())
    assert found, banner()
    assert found.group(1) == digest.hexdigest(), "editor/ changed: run scripts/build-editor"


def test_the_bundle_names_the_locked_codemirror_versions() -> None:
    lock = json.loads((EDITOR / "package-lock.json").read_text())
    locked = {
        f"{path.removeprefix('node_modules/')}@{meta['version']}"
        for path, meta in lock["packages"].items()
        if path.startswith("node_modules/@codemirror/")
    }
    named = set(re.findall(r"@codemirror/[\w-]+@[\w.-]+(?<!\.)", banner()))
    assert locked and named == locked
    # Every direct dependency is pinned exactly (the lock is the source of truth).
    package = json.loads((EDITOR / "package.json").read_text())
    pins = {**package["dependencies"], **package["devDependencies"]}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", version) for version in pins.values()), pins


def test_the_bundle_is_small_and_exposes_the_editor() -> None:
    text = BUNDLE.read_text()
    assert len(text.encode()) <= MAX_BUNDLE_BYTES
    assert text.count("\n") < 100, "minified"
    assert "var StreamsvcEditor=" in text
    assert "MIT License" in banner()


def test_the_bundle_rebuilds_byte_for_byte() -> None:
    """The committed bundle is what the locked inputs build (npm ci, then esbuild)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        if os.environ.get("STREAMSVC_REQUIRE_DOCKER") == "1":
            pytest.fail("npm and node are needed to rebuild the editor bundle (CI)")
        pytest.skip("npm or node is missing")
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-editor"), "--check"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
