"""Settings: the environment over ``.env``, defaults, and malformed values.

``load_settings`` is checked directly; start-up failures are checked on the
real ``python -m streamsvc`` command, which must exit with a message naming
the variable and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from streamsvc import settings as settings_module
from streamsvc.settings import SettingsError, dotenv_files, load_client_settings, load_settings
from tests.harness import ROOT

AZURE = {
    "AZURE_OPENAI_API_KEY": "k",
    "AZURE_OPENAI_ENDPOINT": "https://example.openai.azure.com",
    "AZURE_OPENAI_DEPLOYMENT": "gpt-4o",
}


def test_the_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# a comment\n"
        "export OPENAI_TEMPERATURE=0.1\n"
        "OPENAI_MAX_TOKENS='123'\n"
        'AZURE_OPENAI_DEPLOYMENT="from-dotenv"  \n'
        "STREAMSVC_PORT=9001 # trailing comment\n"
        "\n"
        "UNRELATED=ignored\n"
    )
    settings = load_settings({"OPENAI_TEMPERATURE": "1.5", "STREAMSVC_PORT": "9002"}, dotenv)
    assert settings.chat.temperature == 1.5  # environment
    assert settings.server.port == 9002  # environment
    assert settings.chat.max_tokens == 123  # .env, quotes stripped
    assert settings.chat.azure_deployment == "from-dotenv"
    assert not settings.chat.configured


def test_defaults_and_empty_values(tmp_path: Path) -> None:
    settings = load_settings({"OPENAI_MAX_TOKENS": "", "STREAMSVC_HOST": ""}, None)
    assert settings.chat.max_tokens == 2000
    assert settings.chat.temperature == 0.7
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert settings.server.max_body_bytes_in_flight == 16 * settings.server.max_body_bytes
    assert settings.chat.azure_api_version == "2024-10-21"
    assert settings.chat.reasoning_models == ("gpt-5", "o1", "o3", "o4")
    assert not settings.chat.configured
    assert settings.sandbox.warm_pool_size == 2  # the pool is on unless 0 turns it off
    # A missing .env file is no error.
    assert load_settings({}, tmp_path / "absent.env") == load_settings({}, None)


def test_field_names_drop_the_env_prefix_the_env_names_stay() -> None:
    structs = [
        value
        for value in vars(settings_module).values()
        if isinstance(value, type) and issubclass(value, msgspec.Struct)
    ]
    assert settings_module.ClientSettings in structs
    prefixed = [
        f"{struct.__name__}.{field.name}"
        for struct in structs
        for field in msgspec.structs.fields(struct)
        if field.name.startswith(("streamsvc_", "STREAMSVC_"))
    ]
    assert prefixed == []
    env = {"STREAMSVC_URL": "https://example.test", "STREAMSVC_API_KEY": "k-1"}
    client = load_client_settings(env, None)
    assert (client.url, client.api_key) == ("https://example.test", "k-1")
    assert load_client_settings({}, None).url == "http://127.0.0.1:8000"
    with pytest.raises(SettingsError, match="STREAMSVC_URL"):
        load_client_settings({"STREAMSVC_URL": "localhost:1"}, None)


def test_lists_and_chat_configuration() -> None:
    settings = load_settings({**AZURE, "OPENAI_REASONING_MODELS": " r1, ,thinker ,"}, None)
    assert settings.chat.reasoning_models == ("r1", "thinker")
    assert settings.chat.configured
    for name in AZURE:
        assert not load_settings({**AZURE, name: ""}, None).chat.configured


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPENAI_TEMPERATURE", "hot"),
        ("OPENAI_TEMPERATURE", "2.5"),
        ("OPENAI_MAX_TOKENS", "0"),
        ("OPENAI_MAX_TOKENS", "many"),
        ("STREAMSVC_PORT", "70000"),
        ("STREAMSVC_KEEPALIVE_SECONDS", "0"),
        ("STREAMSVC_FIRST_TOKEN_TIMEOUT_SECONDS", "-1"),
        ("STREAMSVC_MAX_RETRIES", "99"),
        ("STREAMSVC_ALLOW_INSECURE", "perhaps"),
        ("STREAMSVC_LOG_LEVEL", "loud"),
        ("AZURE_OPENAI_ENDPOINT", "example.openai.azure.com"),
        ("STREAMSVC_CORS_ORIGINS", "app.example.com"),
        ("STREAMSVC_CORS_ORIGINS", "https://app.example.com/,https://ok.example"),
        ("STREAMSVC_MAX_BODY_BYTES_IN_FLIGHT", "0"),
        ("STREAMSVC_MAX_BODY_BYTES_IN_FLIGHT", "1048576"),  # under the 4 MiB body cap
    ],
)
def test_a_malformed_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"invalid setting {name}"):
        load_settings({name: value}, None)


def test_the_sandbox_ca_bundle_defaults_to_the_hosts_pip_bundle(tmp_path: Path) -> None:
    """Unset or empty (as in ``.env.example``, which scripts/run copies): the host's bundle."""
    host, own = tmp_path / "host.pem", tmp_path / "own.pem"
    host.write_text("host")
    own.write_text("own")
    dotenv = tmp_path / ".env"
    dotenv.write_text("STREAMSVC_SANDBOX_CA_BUNDLE=\n")
    host_env = {"PIP_CERT": str(host)}
    assert load_settings(host_env, None).sandbox.ca_bundle == str(host)
    assert load_settings(host_env, dotenv).sandbox.ca_bundle == str(host)
    assert load_settings({"SSL_CERT_FILE": str(host)}, dotenv).sandbox.ca_bundle == str(host)
    # A bundle named by a candidate that is not a file is passed over.
    assert load_settings({"PIP_CERT": str(tmp_path / "gone.pem")}, None).sandbox.ca_bundle != str(
        tmp_path / "gone.pem"
    )
    chosen = {**host_env, "STREAMSVC_SANDBOX_CA_BUNDLE": str(own)}
    assert load_settings(chosen, dotenv).sandbox.ca_bundle == str(own)
    off = {**host_env, "STREAMSVC_SANDBOX_CA_BUNDLE": "none"}
    assert load_settings(off, dotenv).sandbox.ca_bundle is None


def test_a_sandbox_ca_bundle_that_is_not_a_file_names_its_variable(tmp_path: Path) -> None:
    missing = {"STREAMSVC_SANDBOX_CA_BUNDLE": str(tmp_path / "missing.pem")}
    with pytest.raises(SettingsError, match="invalid setting STREAMSVC_SANDBOX_CA_BUNDLE"):
        load_settings(missing, None)


def test_a_malformed_dotenv_line_names_the_file_and_line(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("OPENAI_MAX_TOKENS=5\nthis is not a setting\n")
    with pytest.raises(SettingsError, match=r"\.env:2: expected KEY=VALUE"):
        load_settings({}, dotenv)


def _start(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m streamsvc`` with only ``env`` set (plus PATH and the import path)."""
    base = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG"}}
    return subprocess.run(
        [sys.executable, "-m", "streamsvc"],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("env", "dotenv", "name"),
    [
        ({"OPENAI_TEMPERATURE": "hot"}, "", "OPENAI_TEMPERATURE"),
        ({"STREAMSVC_PORT": "http"}, "", "STREAMSVC_PORT"),
        ({}, "STREAMSVC_IDLE_TIMEOUT_SECONDS=soon\n", "STREAMSVC_IDLE_TIMEOUT_SECONDS"),
        ({"STREAMSVC_HOST": "0.0.0.0"}, "", "STREAMSVC_HOST"),  # public without API keys
    ],
    ids=["env", "port", "dotenv", "exposed"],
)
def test_start_up_stops_with_a_message_naming_the_variable(
    tmp_path: Path, env: dict[str, str], dotenv: str, name: str
) -> None:
    (tmp_path / ".env").write_text(dotenv)
    done = _start({"STREAMSVC_PORT": "0", **env}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"streamsvc: invalid setting {name}")
    assert "Traceback" not in done.stderr + done.stdout


def test_dotenv_is_found_in_the_project_and_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, work = tmp_path / "project", tmp_path / "work"
    project.mkdir()
    work.mkdir()
    (project / "pyproject.toml").write_text("")
    (project / ".env").write_text("STREAMSVC_PORT=9001\nOPENAI_TEMPERATURE=1.0\n")
    (work / ".env").write_text("OPENAI_TEMPERATURE=1.5\n")
    monkeypatch.setattr(settings_module, "_PROJECT", project)
    monkeypatch.chdir(work)
    assert [p.resolve() for p in dotenv_files({})] == [project / ".env", work / ".env"]
    found = load_settings({})
    assert (found.server.port, found.chat.temperature) == (9001, 1.5)  # the working dir's wins
    assert load_settings({"OPENAI_TEMPERATURE": "0.1"}).chat.temperature == 0.1
    # Started from elsewhere, the project's .env still counts.
    monkeypatch.chdir(tmp_path)
    assert load_settings({}).server.port == 9001
    # STREAMSVC_ENV_FILE names the one file to read, or none.
    only = tmp_path / "only.env"
    only.write_text("STREAMSVC_PORT=9002\n")
    assert load_settings({"STREAMSVC_ENV_FILE": str(only)}).server.port == 9002
    assert load_settings({"STREAMSVC_ENV_FILE": "none"}).server.port == 8000
    with pytest.raises(SettingsError, match="STREAMSVC_ENV_FILE"):
        load_settings({"STREAMSVC_ENV_FILE": str(tmp_path / "absent.env")})


def test_serve_env_file_reads_that_file(tmp_path: Path) -> None:
    chosen = tmp_path / "elsewhere" / "prod.env"
    chosen.parent.mkdir()
    chosen.write_text("STREAMSVC_IDLE_TIMEOUT_SECONDS=soon\n")
    base = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG"}}
    done = subprocess.run(
        [sys.executable, "-m", "streamsvc", "serve", "--env-file", str(chosen)],
        env={**base, "PYTHONPATH": str(ROOT), "STREAMSVC_PORT": "0"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("streamsvc: invalid setting STREAMSVC_IDLE_TIMEOUT_SECONDS")


def test_help_is_plain_text() -> None:
    base = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG"}}
    for args in ([], ["run"], ["init"], ["serve"]):
        done = subprocess.run(
            [sys.executable, "-m", "streamsvc", *args, "--help"],
            env={**base, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert "``" not in done.stdout and "usage: streamsvc" in done.stdout
