"""The playground and the docs page in a real browser against a real server.

Debian's chromium, driven by tests/browser/driver.mjs (playwright-core; no
browser download), loads the pages from a real server: the chat panel shows
tokens from the fake upstream as they arrive; the connector panel loads the
seed example into its file tabs (CodeMirror editors), runs files edited in
them and shows the live status and output, usage and files; its EventSource
reconnects by itself when a proxy cuts it mid-run (every line shown once), a
reload re-attaches to the running run, and Stop cancels a long run, whose
container then disappears. Screenshots of each panel are kept in artifacts/.
``scripts/test`` installs chromium and playwright-core; in CI
(STREAMSVC_REQUIRE_DOCKER=1) their absence fails.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.fake_azure import FakeAzure, Reply, unauthorized
from tests.harness import ROOT, ForwardingProxy, ServerProcess, seed_request

pytestmark = pytest.mark.browser

BROWSER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


class Browser:
    """The node driver: one JSON command per line in, one JSON reply per line out."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            ["node", str(BROWSER_DIR / "driver.mjs")],
            cwd=BROWSER_DIR,
            env={**os.environ, "CHROMIUM": CHROMIUM},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._replies: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next = 0
        self.version = self._reply(0, 60)["value"]["version"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._replies.put(line)
        self._replies.put("")

    def _reply(self, expected: int, timeout: float) -> dict[str, Any]:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the browser driver did not answer within {timeout} s") from None
        if not line:
            assert self.process.stderr is not None
            raise AssertionError(f"the browser driver died:\n{self.process.stderr.read()}")
        reply: dict[str, Any] = json.loads(line)
        assert reply["id"] == expected, reply
        return reply

    def call(self, op: str, reply_within: float = 60, **args: Any) -> Any:
        self._next += 1
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": self._next, "op": op, **args}) + "\n")
        self.process.stdin.flush()
        reply = self._reply(self._next, reply_within)
        if not reply["ok"]:
            raise AssertionError(f"browser {op} {args}: {reply['error']}")
        return reply["value"]

    def wait(self, expression: str, timeout: float = 30) -> Any:
        return self.call(
            "wait_function", timeout + 10, expression=expression, timeout=timeout * 1000
        )

    def state(self, panel: str) -> str:
        return str(
            self.call("eval", expression=f"document.getElementById('{panel}').dataset.state")
        )

    def wait_state(self, panel: str, states: tuple[str, ...], timeout: float = 30) -> str:
        wanted = json.dumps(list(states))
        self.wait(f"{wanted}.includes(document.getElementById('{panel}').dataset.state)", timeout)
        return self.state(panel)

    def open(self, url: str) -> None:
        self.call("goto", url=url)
        self.call("wait_for", selector="body[data-ready=true]", state="attached")

    def screenshot(self, name: str, selector: str | None = None) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        where: dict[str, Any] = {"selector": selector} if selector else {}
        self.call("screenshot", path=str(path), **where)
        assert path.stat().st_size > 1000

    def close(self) -> None:
        assert self.process.stdin and self.process.stdout and self.process.stderr
        try:
            self.process.stdin.write(json.dumps({"id": -1, "op": "close"}) + "\n")
            self.process.stdin.close()
            self.process.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self._reader.join(10)
        self.process.stdout.close()
        self.process.stderr.close()


def _missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (scripts/test installs Debian's chromium)"
    if shutil.which("node") is None:
        return "node is missing"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is missing in tests/browser (scripts/test runs npm ci)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = _missing()
    if missing:
        if os.environ.get("STREAMSVC_REQUIRE_DOCKER") == "1":
            pytest.fail(f"the browser tests need chromium and playwright-core (CI): {missing}")
        pytest.skip(missing)
    driver = Browser()
    yield driver
    driver.close()


#: Chrome logs every error status as a console error; the tests provoke some on purpose.
_ANSWERED = re.compile(
    r"Failed to load resource: the server responded with a status of (4(?!04)|5)"
)


def page_errors(browser: Browser) -> list[str]:
    """What the page logged as errors, beyond the error statuses the server answered."""
    return [e for e in browser.call("errors") if not _ANSWERED.search(e)]


@pytest.fixture
def page(browser: Browser, server: ServerProcess) -> Iterator[Browser]:
    """The playground, freshly loaded; the page must not log errors."""
    browser.open(server.url + "/")
    yield browser
    assert page_errors(browser) == []


def _set_connector(page: Browser, connector: dict[str, Any], network: str = "none") -> None:
    """Fill the form from a request body, as the example menu does."""
    body = {"connector": connector, "network_mode": network}
    page.call("eval", expression=f"window.playground.loadRequest({json.dumps(body)})")


def _request(page: Browser) -> dict[str, Any]:
    """The body the form would send now."""
    body: dict[str, Any] = page.call("eval", expression="window.playground.buildRequest()")
    return body


def _editor_text(page: Browser, name: str) -> str:
    return str(page.call("text", selector=f'.editor[data-file="{name}"] .cm-content'))


def _python_connector(source: str, timeout_ms: int = 60_000) -> dict[str, Any]:
    return {
        "runtime": {"language": "python", "entryPoint": "main.py", "timeoutMs": timeout_ms},
        "files": {"main.py": source},
    }


def _containers(server: ServerProcess) -> list[str]:
    owner = f"{socket.gethostname()}:{server.process.pid}"
    result = subprocess.run(
        [
            "docker", "ps", "-a", "-q",
            "--filter", "label=streamsvc.managed=true",
            "--filter", f"label=streamsvc.owner={owner}",
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return result.stdout.split()


# ---------------------------------------------------------------- chat


CHUNKS = ["Streams ", "arrive ", "token ", "by ", "token, ", "as ", "they ", "are ", "made."]

#: Records every text the last assistant bubble shows, with the panel's state.
RECORD_CHAT = """(() => {
  window.__seen = [];
  const log = document.getElementById('chat-log');
  new MutationObserver(() => {
    const bubbles = log.querySelectorAll('.message.assistant .text');
    const last = bubbles[bubbles.length - 1];
    if (last) window.__seen.push({text: last.textContent, at: performance.now(),
      state: document.getElementById('chat-panel').dataset.state});
  }).observe(log, {childList: true, subtree: true, characterData: true});
})()"""


def test_chat_panel_shows_tokens_as_they_arrive(page: Browser, azure: FakeAzure) -> None:
    azure.push(Reply(text_chunks=CHUNKS, chunk_delay=0.3))
    page.call("eval", expression=RECORD_CHAT)
    page.call("fill", selector="#chat-prompt", value="How do streams arrive?")
    page.call("click", selector="#chat-send")
    assert page.wait_state("chat-panel", ("done", "error", "stopped")) == "done"

    final = "".join(CHUNKS)
    bubble = page.call("text", selector="#chat-log .message.assistant:last-child .text")
    assert bubble == final
    seen = page.call("eval", expression="window.__seen")
    partial = [s for s in seen if s["text"] and s["text"] != final]
    # Text grew piece by piece while the panel was still streaming ...
    assert all(final.startswith(s["text"]) and s["state"] == "streaming" for s in partial)
    assert len({s["text"] for s in partial}) >= 4, seen
    # ... over the time the upstream took, not all at once at the end.
    first_partial = min(s["at"] for s in partial)
    first_final = min(s["at"] for s in seen if s["text"] == final)
    assert first_final - first_partial > 1000, seen
    meta = page.call("text", selector="#chat-meta")
    assert "finish: stop" in meta

    sent = azure.requests[-1].body
    assert sent["stream"] is True
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    page.screenshot("playground-chat.png", "#chat-panel")


def test_chat_stop_cancels_the_upstream_call(
    page: Browser, azure: FakeAzure, server: ServerProcess
) -> None:
    azure.push(Reply(text_chunks=["partial ", "answer ", *["more "] * 200], chunk_delay=0.5))
    page.call("fill", selector="#chat-prompt", value="Say something slowly")
    page.call("click", selector="#chat-send")
    page.wait("(document.getElementById('chat-output')?.textContent || '').includes('answer')")
    run_id = page.call("eval", expression="chat.runId")
    page.call("click", selector="#chat-stop")  # POST /runs/{id}/cancel, then the abort
    assert page.wait_state("chat-panel", ("stopped", "done", "error")) == "stopped"
    assert azure.wait_disconnect(timeout=15), "the server kept the upstream call open"
    record = httpx.get(f"{server.url}/runs/{run_id}", timeout=30).json()
    # Cancelled by Stop, not abandoned after the grace a dropped stream gets.
    assert (record["status"], record["error"]["message"]) == ("cancelled", "the run was cancelled")
    bubble = "#chat-log .message.assistant:last-child .text"
    shown = page.call("text", selector=bubble)
    assert shown.startswith("partial answer ")
    assert len(shown) < 100
    time.sleep(1)
    assert page.call("text", selector=bubble) == shown


def test_chat_panel_shows_errors(page: Browser, azure: FakeAzure) -> None:
    azure.push(unauthorized())
    page.call("fill", selector="#chat-prompt", value="Hello?")
    page.call("click", selector="#chat-send")
    assert page.wait_state("chat-panel", ("error", "done")) == "error"
    error = page.call("text", selector="#chat-error")
    assert "upstream_auth" in error
    assert page.call("eval", expression="document.getElementById('chat-error').hidden") is False


# ---------------------------------------------------------------- connector

TABS = "[...document.querySelectorAll('#file-tabs .tab')].map((t) => t.dataset.file)"
EDITOR_IS_CODEMIRROR = (
    "!!document.querySelector('.editor:not([hidden]) .cm-editor .cm-content[contenteditable=true]')"
)
#: Each env row's name: [secret toggle checked, toggle locked by the name rule].
SECRET_TOGGLES = """Object.fromEntries(
  [...document.querySelectorAll('#env-rows .env-row')].map((r) =>
    [r.querySelector('.env-name').value,
     [r.querySelector('.env-secret').checked, r.querySelector('.env-secret').disabled]]))"""


@pytest.mark.docker
def test_connector_panel_runs_the_seed_example(page: Browser) -> None:
    assert page.call("value", selector="#run-example") == "seed"
    seed = seed_request()
    # One tab per file, in a code editor; the form sends back what the seed says.
    tabs = page.call("eval", expression=TABS)
    assert tabs == ["runner_entrypoint.py"]
    assert _editor_text(page, "runner_entrypoint.py").startswith("import json")
    assert page.call("eval", expression=EDITOR_IS_CODEMIRROR) is True
    body = _request(page)
    assert body["connector"]["files"] == seed["connector"]["files"]
    assert body["connector"]["configuration"] == seed["connector"]["configuration"]
    assert body["connector"]["runtime"]["dependencies"] == ["requests==2.32.3"]
    assert body["connector"]["runtime"]["entryPoint"] == "runner_entrypoint.py"
    assert body["env"] == seed["env"]
    assert body["configuration_overrides"] == seed["configuration_overrides"]
    assert "secrets" not in body  # CLIENT_SECRET looks secret: nothing to declare
    secret = page.call("eval", expression=SECRET_TOGGLES)
    assert secret == {"CLIENT_ID": [False, False], "CLIENT_SECRET": [True, True]}
    assert page.call("value", selector="#run-network") == "bridge"
    page.call("click", selector="#run-start")
    assert page.wait_state("run-panel", ("done", "failed", "error"), timeout=240) == "done"

    statuses = page.call("text", selector="#run-status")
    for phase in (
        "validated",
        "dependencies",  # "installing dependencies" then "dependencies ready", or only the latter
        "requests==2.32.3",
        "starting",
        "running",
    ):
        assert phase in statuses
    stdout = page.call("text", selector="#run-stdout")
    assert json.loads(stdout) == {"ok": True, "result": {"hello": "world"}}
    assert json.loads(page.call("text", selector="#run-result")) == {"hello": "world"}
    assert "ok · exit code 0" in page.call("text", selector="#run-summary")
    page.screenshot("playground-connector.png", "#run-panel")


LIVE = """import sys, time
print("first line", flush=True)
print("a warning", file=sys.stderr, flush=True)
time.sleep(2)
print("second line", flush=True)
print('{"ok": true, "result": {"lines": 2}}')
"""


@pytest.mark.docker
def test_connector_panel_shows_output_live(page: Browser) -> None:
    _set_connector(page, _python_connector(LIVE))
    page.call("click", selector="#run-start")
    page.wait("document.getElementById('run-stdout').textContent.includes('first line')", 120)
    # The first line is on screen while the program still sleeps before the second.
    assert "second line" not in page.call("text", selector="#run-stdout")
    assert page.state("run-panel") == "running"
    page.wait("document.getElementById('run-stderr').textContent.includes('a warning')", 30)
    assert page.wait_state("run-panel", ("done", "failed", "error"), timeout=60) == "done"
    assert page.call("text", selector="#run-stdout").startswith("first line\nsecond line\n")
    assert page.call("text", selector="#run-stderr") == "a warning\n"
    assert json.loads(page.call("text", selector="#run-result")) == {"lines": 2}
    page.screenshot("playground-connector-live.png", "#run-panel")


HELPERS = """def shout(text):
    return text.upper() + "!"
"""

EDITED_MAIN = """import json
import os
import sys
import time

from helpers import shout


def run(context):
    print(shout("first"), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(2)
    print(shout("second"), flush=True)
    out = os.environ.get("STREAMSVC_OUTPUT_DIR")
    if out:
        with open(os.path.join(out, "report.csv"), "w") as handle:
            handle.write("n,square\\n" + "".join(f"{n},{n * n}\\n" for n in range(5)))
    greeting = context["connector"]["configuration"]["greeting"]
    return {"greeting": greeting, "mode": os.environ["MODE"]}
"""


def _fields(server: ServerProcess, schema: str) -> set[str]:
    """The fields of one of the server's types, as its own /openapi.json documents them."""
    document = httpx.get(server.url + "/openapi.json", timeout=30).json()
    return set(document["components"]["schemas"][schema]["properties"])


@pytest.mark.docker
def test_connector_files_are_edited_in_tabs_and_run(page: Browser, server: ServerProcess) -> None:
    _set_connector(page, _python_connector('print("unchanged")\n'))
    assert page.call("eval", expression=TABS) == ["main.py"]
    # A second file, added from the form and written in its own editor tab.
    page.call("fill", selector="#file-new", value="helpers.py")
    page.call("click", selector="#file-add")
    assert page.call("eval", expression=TABS) == ["main.py", "helpers.py"]
    helpers = '.editor[data-file="helpers.py"] .cm-content'
    assert page.call("eval", expression=f"!!document.querySelector('{helpers}').offsetParent")
    page.call("replace_text", selector=helpers, text=HELPERS)
    # Back to main.py: its editor replaces the text, then a line typed key by key.
    page.call("click", selector='.tab[data-file="main.py"] .tab-name')
    main = '.editor[data-file="main.py"] .cm-content'
    page.call("replace_text", selector=main, text=EDITED_MAIN)
    page.call("press", selector=main, key="ControlOrMeta+End")
    page.call("type", selector=main, text="# typed by hand")
    page.call("replace_text", selector="#config-editor .cm-content", text='{"greeting": "hi"}')
    page.call("click", selector="#env-add")
    page.call("fill", selector="#env-rows .env-row:last-child .env-name", value="MODE")
    page.call("fill", selector="#env-rows .env-row:last-child .env-value", value="staging")

    body = _request(page)
    files = body["connector"]["files"]
    assert files["helpers.py"] == HELPERS
    assert files["main.py"] == EDITED_MAIN + "# typed by hand"
    assert body["connector"]["configuration"] == {"greeting": "hi"}
    assert body["env"] == {"MODE": "staging"}
    assert "secrets" not in body
    page.screenshot("playground-connector-files.png", "#run-panel form")

    page.call("click", selector="#run-start")
    page.wait("document.getElementById('run-stdout').textContent.includes('FIRST!')", 120)
    assert "SECOND!" not in page.call("text", selector="#run-stdout")
    assert page.state("run-panel") == "running"
    assert page.wait_state("run-panel", ("done", "failed", "error"), timeout=60) == "done"
    assert page.call("text", selector="#run-stdout").startswith("FIRST!\nSECOND!\n")
    assert page.call("text", selector="#run-stderr") == "to stderr\n"
    result = json.loads(page.call("text", selector="#run-result"))
    assert result == {"greeting": "hi", "mode": "staging"}

    fields = _fields(server, "ExecutionResult")
    usage = page.call("text", selector="#run-usage")
    if "usage" in fields:  # issue 15's usage, once the engine reports it
        assert re.search(r"usage: .*wall \d+ ms", usage), usage
    else:
        assert usage == ""
    shown = page.call("eval", expression=FILES_SHOWN)
    if "files" in fields:  # and its output files
        assert [f["name"] for f in shown] == ["report.csv"], shown
        assert shown[0]["download"] == "report.csv"
        assert "text/csv" in shown[0]["text"]
    else:
        assert shown == []
    page.screenshot("playground-connector-files-run.png", "#run-panel")


#: The files the result pane lists: name, its link's download name, the text shown.
FILES_SHOWN = """[...document.querySelectorAll('#run-files li[data-name]')].map((li) =>
  ({name: li.dataset.name, download: li.querySelector('a')?.getAttribute('download') ?? null,
    text: li.textContent}))"""


#: The href of each link the result pane shows, by file name.
FILE_LINKS = """Object.fromEntries([...document.querySelectorAll('#run-files li[data-name]')]
  .map((li) => [li.dataset.name, li.querySelector('a')?.getAttribute('href') ?? null]))"""


@pytest.mark.docker
def test_a_file_past_the_inline_cap_is_linked_for_download(
    page: Browser, server: ServerProcess
) -> None:
    source = (
        "import os\nout = os.environ['STREAMSVC_OUTPUT_DIR']\n"
        "open(os.path.join(out, 'big.txt'), 'w').write('x' * (1536 * 1024))\n"
        "print('{\"ok\": true}')\n"
    )
    _set_connector(page, _python_connector(source))
    page.call("click", selector="#run-start")
    assert page.wait_state("run-panel", ("done", "failed", "error"), timeout=120) == "done"
    href = page.call("eval", expression=FILE_LINKS)["big.txt"]
    assert href.startswith("/runs/") and "/files/big.txt?token=" in href, href
    got = httpx.get(server.url + href, timeout=30)  # the link alone opens it: no key sent
    assert got.status_code == 200 and got.content == b"x" * (1536 * 1024)
    assert got.headers["content-disposition"].startswith("attachment")


@pytest.mark.docker
def test_secret_toggle_declares_the_name(page: Browser, server: ServerProcess) -> None:
    source = 'import os\nprint("note is " + os.environ["NOTE"])\nprint(\'{"ok": true}\')\n'
    _set_connector(page, _python_connector(source))
    page.call("click", selector="#env-add")
    row = "#env-rows .env-row:last-child"
    page.call("fill", selector=f"{row} .env-name", value="NOTE")
    page.call("fill", selector=f"{row} .env-value", value="whisper-this-value")
    value_type = f"document.querySelector('{row} .env-value').type"
    assert page.call("eval", expression=value_type) == "text"
    page.call("check", selector=f"{row} .env-secret")
    assert page.call("eval", expression=value_type) == "password"  # shown as dots
    body = _request(page)
    assert body["env"] == {"NOTE": "whisper-this-value"}
    assert body["secrets"] == ["NOTE"]
    # A name the server's rule already treats as secret is locked on and not declared.
    page.call("click", selector="#env-add")
    page.call("fill", selector=f"{row} .env-name", value="SERVICE_TOKEN")
    page.call("fill", selector=f"{row} .env-value", value="x")
    assert page.call("eval", expression=SECRET_TOGGLES)["SERVICE_TOKEN"] == [True, True]
    assert _request(page)["secrets"] == ["NOTE"]
    page.call("click", selector=f"{row} .row-remove")

    page.call("click", selector="#run-start")
    final = page.wait_state("run-panel", ("done", "failed", "error"), timeout=120)
    if "secrets" in _fields(server, "ExecuteRequest"):  # issue 15's secrets, once on main
        assert final == "done"
        stdout = page.call("text", selector="#run-stdout")
        assert "whisper-this-value" not in stdout
        assert "note is [REDACTED]" in stdout
        assert "secrets redacted" in page.call("text", selector="#run-summary")
    else:  # the page sent the list; this server does not know it yet
        assert final == "error"
        assert "secrets" in page.call("text", selector="#run-error")


def test_the_example_menu_loads_each_example_into_tabs(
    page: Browser, server: ServerProcess
) -> None:
    index = httpx.get(server.url + "/playground/examples", timeout=30).json()["examples"]
    options = page.call("eval", expression=MENU)
    assert options == [[e["id"], e["title"]] for e in index]
    for example in index[::-1]:  # the last first: the menu starts on the seed
        page.call("select", selector="#run-example", value=example["id"])
        connector = example["request"]["connector"]
        assert page.call("eval", expression=TABS) == list(connector["files"])
        body = _request(page)
        assert body["connector"]["files"] == connector["files"]
        assert body["connector"]["runtime"]["entryPoint"] == connector["runtime"]["entryPoint"]
        assert body["connector"]["configuration"] == connector.get("configuration", {})
        assert body["network_mode"] == example["request"].get("network_mode", "none")
    # Reset brings the chosen example back after an edit.
    first = next(iter(index[0]["request"]["connector"]["files"]))
    page.call("replace_text", selector=f'.editor[data-file="{first}"] .cm-content', text="x = 1")
    assert _request(page)["connector"]["files"][first] == "x = 1"
    page.call("click", selector="#run-reset")
    assert _request(page)["connector"]["files"] == index[0]["request"]["connector"]["files"]


MENU = "[...document.querySelectorAll('#run-example option')].map((o) => [o.value, o.text])"


@pytest.mark.docker
def test_runs_follow_with_the_read_token_when_keys_are_on(
    browser: Browser, start_server: Callable[..., ServerProcess]
) -> None:
    """EventSource cannot send the API key: events_url's token opens the run's events."""
    key = "playground-key-0123456789"
    keyed = start_server(STREAMSVC_API_KEYS=key)
    browser.open(keyed.url + "/")
    browser.call("fill", selector="#api-key", value=key)
    _set_connector(browser, _python_connector(NUMBERED))
    browser.call("click", selector="#run-start")
    final = browser.wait_state("run-panel", ("done", "failed", "error", "stopped"), 120)
    assert final == "done", browser.call("text", selector="#run-error")
    _assert_every_line_once(browser)
    assert page_errors(browser) == []
    # Without the key the run is not there; the page's token opens its events only.
    run_id = browser.call("eval", expression="window.playground.run.current.id")
    assert httpx.get(f"{keyed.url}/runs/{run_id}", timeout=30).status_code == 401


def test_connector_panel_lists_validation_problems(page: Browser) -> None:
    connector = _python_connector("import os\nprint(os.environ['API_TOKEN'], connector.auth.key)")
    _set_connector(page, connector)
    page.call("click", selector="#run-start")
    assert page.wait_state("run-panel", ("error", "done", "failed")) == "error"
    error = page.call("text", selector="#run-error")
    assert "400" in error
    assert "env.API_TOKEN" in error
    assert "missing_env" in error


TICKING = """import time
for i in range(600):
    print(f"tick {i}", flush=True)
    time.sleep(0.25)
"""


@pytest.mark.docker
def test_stop_ends_a_long_run_and_removes_its_container(
    page: Browser, server: ServerProcess
) -> None:
    _set_connector(page, _python_connector(TICKING, timeout_ms=180_000))
    page.call("click", selector="#run-start")
    page.wait("document.getElementById('run-stdout').textContent.includes('tick 2')", 120)
    assert _containers(server), "no container is running for this server"
    run_id = page.call("eval", expression="window.playground.run.current.id")
    page.call("click", selector="#run-stop")  # POST /runs/{id}/cancel
    assert page.wait_state("run-panel", ("stopped", "done", "failed", "error")) == "stopped"
    record = httpx.get(f"{server.url}/runs/{run_id}", timeout=30).json()
    assert record["status"] == "cancelled"
    assert record["error"]["code"] == "cancelled"
    deadline = time.monotonic() + 20
    while _containers(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _containers(server) == [], "the container outlived the stopped request"
    assert "stopped" in page.call("text", selector="#run-status")
    page.screenshot("playground-connector-stopped.png", "#run-panel")


# ---------------------------------------------------------------- resumable runs (issue 13)


NUMBERED = """import time
for i in range(1, 41):
    print(f"line {i:02d}", flush=True)
    time.sleep(0.15)
print('{"ok": true, "result": {"lines": 40}}')
"""
EXPECTED_LINES = "".join(f"line {i:02d}\n" for i in range(1, 41))
#: The ids of the events the page took, in order, and how often its EventSource reconnected.
SEEN = "({ids: window.playground.run.seen, reconnects: window.playground.run.reconnects})"


def _stdout_lines(page: Browser) -> list[str]:
    return str(page.call("text", selector="#run-stdout")).splitlines()


def _assert_every_line_once(page: Browser) -> dict[str, Any]:
    stdout = page.call("text", selector="#run-stdout")
    assert stdout.startswith(EXPECTED_LINES), stdout
    assert stdout.count("line 01") == 1
    seen: dict[str, Any] = page.call("eval", expression=SEEN)
    assert seen["ids"] == list(range(1, len(seen["ids"]) + 1)), seen  # no gap, no repeat
    assert json.loads(page.call("text", selector="#run-result")) == {"lines": 40}
    return seen


@pytest.mark.docker
def test_a_dropped_event_stream_reconnects_by_itself(
    browser: Browser, server: ServerProcess
) -> None:
    proxy = ForwardingProxy.tcp(server.port)
    try:
        browser.open(proxy.url + "/")
        _set_connector(browser, _python_connector(NUMBERED))
        browser.call("click", selector="#run-start")
        browser.wait("document.getElementById('run-stdout').textContent.includes('line 08')", 120)
        assert browser.state("run-panel") == "running"
        assert proxy.drop() >= 1  # the EventSource's connection, mid-run
        shown = len(_stdout_lines(browser))
        assert 8 <= shown < 40
        final = browser.wait_state("run-panel", ("done", "failed", "error", "stopped"), 120)
        assert final == "done", browser.call("text", selector="#run-error")
        seen = _assert_every_line_once(browser)
        assert seen["reconnects"] >= 1, seen
        # Chrome reports the cut stream itself, and nothing else.
        errors = page_errors(browser)
        assert all("ERR_INCOMPLETE_CHUNKED_ENCODING" in e for e in errors), errors
    finally:
        proxy.close()


@pytest.mark.docker
def test_a_reload_reattaches_to_the_running_run(page: Browser, server: ServerProcess) -> None:
    _set_connector(page, _python_connector(NUMBERED))
    page.call("click", selector="#env-add")
    page.call("fill", selector="#env-rows .env-row:last-child .env-name", value="API_TOKEN")
    page.call("fill", selector="#env-rows .env-row:last-child .env-value", value="tok-0123456789")
    page.call("click", selector="#run-start")
    page.wait("document.getElementById('run-stdout').textContent.includes('line 05')", 120)
    kept = page.call("eval", expression="localStorage.getItem('streamsvc-last-run')")
    assert "tok-0123456789" not in kept  # a secret value is never stored
    stored = json.loads(kept)
    assert stored["events_url"].startswith(f"/runs/{stored['id']}/events?token=")
    page.open(server.url + "/")  # a reload, mid-run
    assert f"following run {stored['id']} again" in page.call("text", selector="#run-status")
    # The form shows the code that runs, not the example the page starts with.
    assert page.call("eval", expression=TABS) == ["main.py"]
    assert _editor_text(page, "main.py").startswith("import time")
    assert _request(page)["env"] == {"API_TOKEN": ""}
    assert page.state("run-panel") in ("running", "done")
    final = page.wait_state("run-panel", ("done", "failed", "error", "stopped"), 120)
    assert final == "done", page.call("text", selector="#run-error")
    _assert_every_line_once(page)
    assert f"run {stored['id']}" in page.call("text", selector="#run-summary")
    # The run ended: the next load starts clean.
    assert page.call("eval", expression="localStorage.getItem('streamsvc-last-run')") is None
    page.open(server.url + "/")
    assert page.state("run-panel") == "idle"
    assert page.call("text", selector="#run-stdout") == ""


# ---------------------------------------------------------------- docs


def test_docs_page_renders_the_openapi_document(browser: Browser, server: ServerProcess) -> None:
    browser.open(server.url + "/docs")
    text = browser.call("text", selector="#docs")
    for expected in ("/chat", "/execute-connector", "ExecutionResult", "ChatDelta", "stderr"):
        assert expected in text
    browser.screenshot("docs.png")
    assert page_errors(browser) == []
