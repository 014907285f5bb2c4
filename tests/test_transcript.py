"""The result rule and the transcript: unit tests, then one real run."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest

from streamsvc.connectors.transcript import MAX_RESULT_DEPTH, Transcript, find_result
from streamsvc.sandbox.types import Exited, Output, OutputFile
from tests.harness import ServerProcess, read_sse

NOTHING = find_result("")


def exited(**changes: Any) -> Exited:
    base = {"exit_code": 0, "timed_out": False, "oom_killed": False, "duration_ms": 12}
    return Exited(**{**base, **changes})


def answer(stdout: str, stderr: str = "", cap: int = 1 << 20, **exit: Any) -> dict[str, Any]:
    """The JSON answer for a run that wrote ``stdout`` and ``stderr``."""
    transcript = Transcript([], cap)
    transcript.output(Output("stdout", stdout))
    transcript.output(Output("stderr", stderr))
    transcript.flush()
    result: dict[str, Any] = msgspec.to_builtins(transcript.result(exited(**exit)))
    return result


# -- which JSON is the result ----------------------------------------------------


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('  {"a": 1}\n\n', {"a": 1}),
        ("42", 42),
        ('"text"', "text"),
        ("[1, 2]", [1, 2]),
        ("null", None),
        ('{\n  "pretty": [\n    1,\n    2\n  ]\n}\n', {"pretty": [1, 2]}),
        ('starting\n{"a": 1}\n', {"a": 1}),
        ('{"a": 1}\n{"b": 2}\n', {"b": 2}),
        ('{"a": 1}\ndone, bye\n', {"a": 1}),
        ('{"a": 1}\r\nlog line\r\n', {"a": 1}),
        ('{"a": 1}\n   {"b": 2}   \nnot json {"c": 3}\n', {"b": 2}),
        ('{"a": 1}\n{"broken": \n', {"a": 1}),
        ('{"a": 1}\n[1, 2]\n', {"a": 1}),
        ('{"a": 1}\n7\n', {"a": 1}),
    ],
)
def test_the_result_is_the_whole_document_or_the_last_object_line(
    stdout: str, expected: Any
) -> None:
    assert find_result(stdout) == expected


@pytest.mark.parametrize(
    "stdout",
    [
        "",
        "   \n\n",
        "hello world\n",
        "1\n2\n",
        "[1]\n[2]\n",
        '{"broken": 1\n',
        "{not json}\n",
        "NaN\n",
        "[" * 5000 + "\n",
        "[" * 50_000 + "]" * 50_000,
    ],
)
def test_no_json_object_means_no_result(stdout: str) -> None:
    assert find_result(stdout) is NOTHING


def test_values_nested_too_deeply_do_not_count() -> None:
    deep = json.dumps(json.loads("[" * (MAX_RESULT_DEPTH + 1) + "]" * (MAX_RESULT_DEPTH + 1)))
    shallow = "[" * MAX_RESULT_DEPTH + "]" * MAX_RESULT_DEPTH
    assert find_result(deep) is NOTHING
    assert find_result(shallow) == json.loads(shallow)
    inner = {"x": json.loads(deep)}
    assert find_result('{"first": 1}\n' + json.dumps(inner) + "\n") == {"first": 1}


# -- the answer --------------------------------------------------------------------


def test_the_seed_shape_gives_ok_and_result() -> None:
    stdout = json.dumps({"ok": True, "result": {"hello": "world"}}) + "\n"
    got = answer(stdout, "a warning\n")
    assert got == {
        "ok": True,
        "result": {"hello": "world"},
        "error": None,
        "exit_code": 0,
        "timed_out": False,
        "oom_killed": False,
        "duration_ms": 12,
        "stdout": stdout,
        "stderr": "a warning\n",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "output_limit_exceeded": False,
        "pids_limited": False,
        "run_id": None,  # set by the run manager, not the transcript
        "executor": None,  # likewise
        "redacted": False,
        "usage": None,
        "files": [],
        "files_omitted": 0,
    }


def test_any_other_value_is_the_result_itself() -> None:
    assert answer('{"rows": 3}')["result"] == {"rows": 3}
    assert answer('{"rows": 3}')["ok"] is True
    assert answer("[1, 2, 3]")["result"] == [1, 2, 3]
    # "ok" that is not a boolean is not the seed's shape: the object is the result.
    odd = answer('{"ok": "yes", "result": 1}')
    assert (odd["ok"], odd["result"]) == (True, {"ok": "yes", "result": 1})


def test_the_program_reporting_failure_is_connector_failed() -> None:
    got = answer(json.dumps({"ok": False, "error": "sheet not found", "result": None}))
    assert got["ok"] is False
    assert got["error"] == {
        "code": "connector_failed",
        "message": "sheet not found",
        "details": "sheet not found",
    }
    structured = answer(json.dumps({"ok": False, "error": {"message": "no", "status": 404}}))
    assert structured["error"]["message"] == "no"
    assert structured["error"]["details"] == {"message": "no", "status": 404}
    bare = answer('{"ok": false}')
    assert bare["error"]["code"] == "connector_failed"
    assert bare["error"]["message"] == "the connector reported failure"


def test_no_json_at_all_is_no_result() -> None:
    got = answer("just text\n")
    assert got["ok"] is False
    assert got["result"] is None
    assert got["error"]["code"] == "no_result"
    assert got["stdout"] == "just text\n"


def test_a_non_zero_exit_fails_but_keeps_the_result() -> None:
    got = answer('{"ok": true, "result": 5}\n', "Traceback ...\n", exit_code=3)
    assert got["ok"] is False
    assert got["result"] == 5
    assert got["exit_code"] == 3
    assert got["error"]["code"] == "nonzero_exit"
    assert "3" in got["error"]["message"]


@pytest.mark.parametrize(
    ("exit", "code"),
    [
        ({"timed_out": True, "exit_code": None}, "timeout"),
        ({"oom_killed": True, "exit_code": 137}, "out_of_memory"),
        ({"output_capped": True, "exit_code": None}, "output_limit"),
        ({"pids_limited": True, "exit_code": 1}, "process_limit"),
        ({"timed_out": True, "oom_killed": True, "exit_code": None}, "timeout"),
    ],
)
def test_limits_win_over_everything_else(exit: dict[str, Any], code: str) -> None:
    got = answer('{"ok": true, "result": 1}\n', **exit)
    assert got["ok"] is False
    assert got["error"]["code"] == code
    assert got["timed_out"] is bool(exit.get("timed_out"))
    assert got["oom_killed"] is bool(exit.get("oom_killed"))
    assert got["output_limit_exceeded"] is bool(exit.get("output_capped"))


def test_each_stream_is_capped_with_a_flag() -> None:
    transcript = Transcript([], 10)
    for _ in range(3):
        assert transcript.output(Output("stdout", "abcdef")) == Output("stdout", "abcdef")
    transcript.output(Output("stderr", "short"))
    got = transcript.result(exited())
    assert got.stdout == "abcdefabcd"
    assert got.stdout_truncated is True
    assert got.stderr == "short"
    assert got.stderr_truncated is False


def test_the_cap_counts_bytes_and_never_splits_a_character() -> None:
    transcript = Transcript([], 5)
    transcript.output(Output("stdout", "ééé"))  # 6 bytes
    got = transcript.result(exited())
    assert got.stdout == "éé"
    assert got.stdout_truncated is True


def test_a_json_line_cut_by_the_cap_is_not_a_result() -> None:
    transcript = Transcript([], 20)
    transcript.output(Output("stdout", '{"ok": true, "result": "a long value"}\n'))
    got = transcript.result(exited())
    assert got.error is not None
    assert got.error.code == "no_result"


def test_secrets_are_redacted_in_forwarded_chunks_and_the_answer() -> None:
    secret = "s3cr3t-value"
    transcript = Transcript([secret, "abc"], 1 << 20)
    first = transcript.output(Output("stdout", '{"ok": true, "result": "s3cr'))
    second = transcript.output(Output("stdout", '3t-value"}\n'))
    transcript.output(Output("stderr", "abc s3cr3t-value"))
    # The start of the secret is held back until the next chunk shows what it is.
    assert first == Output("stdout", '{"ok": true, "result": "')
    forwarded = "".join(chunk.text for chunk in (first, second) if chunk is not None)
    assert secret not in forwarded
    got = transcript.result(exited())
    assert got.result == "[REDACTED]"
    assert got.stderr == "abc [REDACTED]"
    assert secret not in got.stdout
    assert got.redacted is True


def test_an_answer_without_any_secret_masked_says_so() -> None:
    transcript = Transcript(["s3cr3t-value"], 1 << 20)
    transcript.output(Output("stdout", '{"ok": true}\n'))
    assert transcript.result(exited()).redacted is False


def test_a_secret_in_an_output_file_name_is_masked() -> None:
    transcript = Transcript(["s3cr3t-value"], 1 << 20)
    transcript.output(Output("stdout", '{"ok": true}\n'))
    named = OutputFile("dump-s3cr3t-value.txt", 1, None, "text/plain")
    got = transcript.result(exited(files=[named, OutputFile("a.txt", 1, None, None)]))
    assert [item.name for item in got.files] == ["dump-[REDACTED].txt", "a.txt"]
    assert got.redacted is True


# -- end to end ----------------------------------------------------------------------

RULE_PROGRAM = """\
import json, sys
print("starting")
print(json.dumps({"ok": True, "result": {"rows": [1, 2]}}))
print("warning: slow", file=sys.stderr)
print("bye")
"""


@pytest.mark.docker
async def test_the_rule_on_a_real_run(server: ServerProcess, client: httpx.AsyncClient) -> None:
    body = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py"},
            "files": {"main.py": RULE_PROGRAM},
        },
        "stream": True,
    }
    response = await read_sse(client, server.url + "/execute-connector", body)
    assert response.status == 200
    done = response.last
    assert done.event == "done"
    assert done.data["ok"] is True
    assert done.data["result"] == {"rows": [1, 2]}
    assert done.data["stdout"].splitlines() == [
        "starting",
        '{"ok": true, "result": {"rows": [1, 2]}}',
        "bye",
    ]
    assert done.data["stderr"] == "warning: slow\n"
    streamed = "".join(event.data["text"] for event in response.named("stdout"))
    assert streamed == done.data["stdout"]
