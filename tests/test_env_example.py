""".env.example documents every setting, each with a comment, and loads cleanly."""

from __future__ import annotations

from pathlib import Path

import msgspec

from streamsvc.settings import ENV_NAMES, Settings, load_settings, read_dotenv

EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


def test_every_setting_is_listed_with_a_comment() -> None:
    lines = EXAMPLE.read_text().splitlines()
    listed = {}
    for number, line in enumerate(lines):
        if line and not line.startswith("#"):
            listed[line.partition("=")[0]] = number
    assert set(ENV_NAMES) == set(listed)
    for name, number in listed.items():
        above = lines[number - 1]
        assert above.startswith("#") or lines[number - 1].partition("=")[0] in listed, name


def test_every_field_is_set_by_exactly_one_variable() -> None:
    fields = {
        (group.name, field.name)
        for group in msgspec.structs.fields(Settings)
        for field in msgspec.structs.fields(group.type)
    }
    assert sorted(ENV_NAMES.values()) == sorted(fields)


def test_the_example_is_a_valid_configuration() -> None:
    assert read_dotenv(EXAMPLE)
    settings = load_settings({}, EXAMPLE)
    assert settings.server.port == 8000
    assert not settings.chat.configured


def test_the_example_keeps_the_hosts_ca_bundle(tmp_path: Path) -> None:
    """scripts/run copies the example to .env: pip in the sandbox must still trust the host's CA."""
    bundle = tmp_path / "host-ca.pem"
    bundle.write_text("a CA")
    assert load_settings({"PIP_CERT": str(bundle)}, EXAMPLE).sandbox.ca_bundle == str(bundle)
