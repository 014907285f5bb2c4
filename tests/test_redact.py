"""Secret redaction: the streaming redactor, then real runs and the server's log."""

from __future__ import annotations

import itertools
import json
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsvc.connectors.redact import MASK, Redactor, looks_secret, secret_forms, secret_values
from tests.harness import ServerProcess, read_sse


def redact_chunks(secrets: list[str], chunks: list[str]) -> tuple[list[str], str]:
    redactor = Redactor(secrets)
    out = [redactor(chunk) for chunk in chunks]
    out.append(redactor.flush())
    return out, "".join(out)


def test_values_of_four_characters_or_more_are_redacted() -> None:
    _, text = redact_chunks(["123", "1234"], ["a 123 b 1234 c\n"])
    assert text == f"a 123 b {MASK} c\n"


@pytest.mark.parametrize(
    "name",
    ["CLIENT_SECRET", "client_secret", "GITHUB_TOKEN", "API_KEY", "apikey", "DB_PASSWORD",
     "PASSWORD", "MYSQL_PASSWD", "AWS_CREDENTIALS", "PRIVATE_PEM", "SMTP_PASS", "REDIS_DSN",
     "BASIC_AUTH", "SESSION_COOKIE", "SECRET"],
)  # fmt: skip
def test_names_that_look_secret(name: str) -> None:
    assert looks_secret(name)


@pytest.mark.parametrize(
    "name", ["MODE", "CLIENT_ID", "REGION", "KEYBOARD", "AUTHOR", "PASSAGE", "SHEET_NAME", "URL"]
)
def test_names_that_do_not_look_secret(name: str) -> None:
    assert not looks_secret(name)


def test_secret_values_are_declared_or_named_like_secrets_and_long_enough() -> None:
    env = {"MODE": "production", "CLIENT_SECRET": "abcdefgh", "PIN": "9876", "API_KEY": "abc"}
    assert secret_values(env) == ["abcdefgh"]
    assert secret_values(env, ["PIN"]) == ["abcdefgh", "9876"]
    assert secret_values(env, ["MODE", "PIN"]) == ["production", "abcdefgh", "9876"]


def test_every_occurrence_of_every_secret_is_masked() -> None:
    secrets = ["password-one", "token-two-xyz"]
    _, text = redact_chunks(
        secrets, ["password-one token-two-xyz password-one", "password-onepassword-one"]
    )
    assert text == f"{MASK} {MASK} {MASK}{MASK}{MASK}"


def test_a_secret_split_across_writes_is_held_back_then_masked() -> None:
    out, text = redact_chunks(["abcdefghij"], ["id=abcd", "efghij;\n"])
    assert out == ["id=", f"{MASK};\n", ""]
    assert text == f"id={MASK};\n"


def test_a_held_back_prefix_is_released_when_it_turns_out_not_to_be_the_secret() -> None:
    out, text = redact_chunks(["abcdefghij"], ["x abcde", "XYZ\n"])
    assert out == ["x ", "abcdeXYZ\n", ""]
    assert text == "x abcdeXYZ\n"


def test_output_without_a_secret_prefix_is_not_delayed() -> None:
    redactor = Redactor(["abcdefghij"])
    assert redactor("line one\n") == "line one\n"
    assert redactor("zzz") == "zzz"


def test_a_secret_split_over_many_tiny_writes() -> None:
    secret = "correct-horse-battery"
    chunks = ["<", *secret, ">"]
    out, text = redact_chunks([secret], chunks)
    assert text == f"<{MASK}>"
    assert all(secret[:2] not in chunk for chunk in out)


def test_the_tail_held_at_the_end_is_flushed() -> None:
    out, _ = redact_chunks(["abcdefghij"], ["done abcdefghi"])
    assert out == ["done ", "abcdefghi"]


def test_json_escaped_forms_are_secrets_too() -> None:
    secret = 'pa"ss\\wörd-1'
    assert json.dumps(secret)[1:-1] in secret_forms([secret])
    printed = json.dumps({"password": secret})
    _, text = redact_chunks([secret], [printed, "\n", secret])
    assert text == '{"password": "' + MASK + '"}\n' + MASK
    _, text = redact_chunks([secret], [json.dumps({"p": secret}, ensure_ascii=False)])
    assert text == '{"p": "' + MASK + '"}'


def test_without_secrets_text_passes_unchanged() -> None:
    redactor = Redactor(["abc", ""])
    assert redactor("anything abc") == "anything abc"
    assert redactor.masked == 0
    assert redactor.flush() == ""


def test_cost_is_bounded_for_repetitive_secrets_and_output() -> None:
    """Long periodic secrets and output that keeps almost matching them: the
    naive algorithms here are quadratic per chunk (minutes); this stays linear."""
    secrets = ["a" * 16_000 + "b", "a" * 15_999 + "c", "a" * 8 + "d"]
    redactor = Redactor(secrets)
    started = time.process_time()
    emitted = []
    for _ in range(200):
        emitted.append(redactor("a" * 15_000 + "x"))
    for _ in range(5_000):
        emitted.append(redactor("a"))
    emitted.append(redactor.flush())
    elapsed = time.process_time() - started
    assert "".join(emitted) == ("a" * 15_000 + "x") * 200 + "a" * 5_000
    assert elapsed < 10, elapsed


secret_text = st.text(alphabet="ab", min_size=8, max_size=24)


@settings(max_examples=300, deadline=None, database=None)
@given(
    secrets=st.lists(secret_text, min_size=1, max_size=4),
    text=st.text(alphabet="abc\n", max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_no_chunking_ever_leaks_a_secret(secrets: list[str], text: str, cuts: list[int]) -> None:
    """Over a two-letter alphabet (the worst case for partial matches), however
    the output is cut into writes, no secret survives and nothing else is lost."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    _, joined = redact_chunks(secrets, chunks)
    for secret in secrets:
        assert secret not in joined
    assert joined.replace(MASK, "").count("c") == text.count("c")
    if len(secrets) == 1:  # with one secret, chunking changes nothing at all
        assert joined == text.replace(secrets[0], MASK)


# -- real runs --------------------------------------------------------------------------

SECRET = "tok-9f8e7d6c5b4a"
SPLIT_PROGRAM = """\
import os, sys, time
secret = os.environ["API_TOKEN"]
sys.stdout.write("token: " + secret[:6])
sys.stdout.flush()
time.sleep(0.5)
print(secret[6:], flush=True)
print("also on stderr", secret, file=sys.stderr, flush=True)
print('{"ok": true, "result": "' + secret + '"}')
"""


@pytest.mark.docker
async def test_secrets_never_reach_the_client_or_the_log(
    start_server: object, client: httpx.AsyncClient
) -> None:
    server: ServerProcess = start_server(STREAMSVC_LOG_LEVEL="debug")  # type: ignore[operator]
    body = {
        "connector": {
            "runtime": {"language": "python", "entryPoint": "main.py"},
            "files": {"main.py": SPLIT_PROGRAM},
            "auth": {"token": "{{env:API_TOKEN}}"},
        },
        "env": {"API_TOKEN": SECRET, "SHORT": "1234567"},
    }
    streamed = await read_sse(client, server.url + "/execute-connector", {**body, "stream": True})
    assert streamed.status == 200
    chunks = [e.data["text"] for e in streamed.events if e.event in {"stdout", "stderr"}]
    # The first half was written and flushed 0.5 s before the rest: what came
    # before it was streamed at once, the half itself was held back, then masked.
    assert streamed.named("stdout")[0].data["text"] == "token: "
    assert all(SECRET[:6] not in chunk for chunk in chunks)
    stdout = "".join(e.data["text"] for e in streamed.named("stdout"))
    assert stdout == f'token: {MASK}\n{{"ok": true, "result": "{MASK}"}}\n'
    done = streamed.last.data
    assert done["stdout"] == stdout
    assert done["stderr"] == f"also on stderr {MASK}\n"
    assert done["result"] == MASK
    assert SECRET not in json.dumps([e.data for e in streamed.events])

    plain = await client.post(server.url + "/execute-connector", json=body)
    assert plain.status_code == 200
    assert SECRET not in plain.text
    assert plain.json()["stdout"] == stdout

    # A failing request that names the secret's key must not echo the value either.
    bad = await client.post(
        server.url + "/execute-connector",
        json={**body, "env": {"API_TOKEN": SECRET, "1BAD": SECRET}},
    )
    assert bad.status_code == 400
    assert SECRET not in bad.text

    server.stop()
    log = server.log()
    assert "execute-connector" in log or "streamsvc" in log  # the log is really there
    assert SECRET not in log
