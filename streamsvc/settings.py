"""Settings: one frozen struct, built once from the environment and ``.env``.

Every field is named by the environment variable that sets it. The seed's
names (``AZURE_OPENAI_*``, ``OPENAI_*``) keep working; the service's own
settings start with ``STREAMSVC_``. The environment wins over ``.env``.
A malformed value raises ``SettingsError`` naming the variable, so start-up
fails with a message instead of a traceback. ``.env.example`` documents each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "ClientSettings",
    "Settings",
    "SettingsError",
    "load_client_settings",
    "load_settings",
    "read_dotenv",
]

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65_535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]

#: Settings that hold comma-separated lists in the environment.
_LIST_FIELDS = frozenset(
    {
        "STREAMSVC_API_KEYS",
        "STREAMSVC_CORS_ORIGINS",
        "OPENAI_REASONING_MODELS",
        "STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS",
    }
)
_DEFAULT_CA_CANDIDATES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")


class SettingsError(ValueError):
    """A setting is malformed; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=False, rename="upper"):
    # --- Azure OpenAI (names from the original contract) ---------------------
    azure_openai_api_key: str | None = None
    azure_openai_endpoint: str | None = None
    azure_openai_deployment: str | None = None
    azure_openai_api_version: str = "2024-10-21"
    openai_max_tokens: Positive = 2000
    openai_temperature: Temperature = 0.7
    #: Model-name prefixes that take ``max_completion_tokens`` and no temperature.
    openai_reasoning_models: tuple[str, ...] = ("gpt-5", "o1", "o3", "o4")
    #: ``key`` (AZURE_OPENAI_API_KEY) or ``entra`` (Microsoft Entra ID, needs azure-identity).
    azure_openai_auth: Literal["key", "entra"] = "key"

    # --- chat provider ----------------------------------------------------------
    #: ``azure`` (Azure OpenAI) or ``openai`` (any OpenAI-compatible base URL).
    streamsvc_chat_provider: Literal["azure", "openai"] = "azure"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = None
    #: The ``openai`` provider's default model (Azure's is AZURE_OPENAI_DEPLOYMENT).
    openai_model: str | None = None
    #: Deployments (models) tried in order when the one asked for answers 429 or 5xx.
    streamsvc_chat_fallback_deployments: tuple[str, ...] = ()
    #: The SDK's HTTP client for the upstream: ``aiohttp`` (its C parser and pool cost less
    #: CPU per streamed chunk) or ``httpx`` (the SDK's default).
    streamsvc_chat_http_client: Literal["aiohttp", "httpx"] = "aiohttp"
    #: Most upstream connections open at once (each open stream holds one).
    streamsvc_chat_max_connections: Positive = 1000

    # --- HTTP server ----------------------------------------------------------
    streamsvc_host: str = "127.0.0.1"
    streamsvc_port: Port = 8000
    #: Server processes sharing the listening socket; each has its own limits and warm pool.
    streamsvc_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    streamsvc_api_keys: tuple[str, ...] = ()
    streamsvc_allow_insecure: bool = False
    #: Origins whose pages may call the API from a browser (CORS); ``*`` for any. None: off.
    streamsvc_cors_origins: tuple[str, ...] = ()
    streamsvc_max_body_bytes: Positive = 4 * 1024 * 1024
    streamsvc_keepalive_seconds: Seconds = 15.0
    streamsvc_shutdown_grace_seconds: Seconds = 10.0
    streamsvc_log_level: str = "info"
    #: ``text`` (readable; the default) or ``json`` (one object per line, for collectors).
    streamsvc_log_format: Literal["text", "json"] = "text"
    #: Log chat content at debug level; never by default.
    streamsvc_log_content: bool = False

    # --- chat upstream timeouts -------------------------------------------------
    streamsvc_connect_timeout_seconds: Seconds = 10.0
    streamsvc_first_token_timeout_seconds: Seconds = 60.0
    streamsvc_idle_timeout_seconds: Seconds = 60.0
    streamsvc_retry_max_wait_seconds: Annotated[float, msgspec.Meta(ge=0, le=600)] = 20.0
    streamsvc_max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3

    # --- sandbox ----------------------------------------------------------------
    docker_host: str | None = None
    streamsvc_sandbox_image: str = "streamsvc-sandbox:latest"
    streamsvc_allow_bridge: bool = True
    streamsvc_max_timeout_ms: Positive = 300_000
    streamsvc_min_memory_mb: Annotated[int, msgspec.Meta(ge=6)] = 32
    streamsvc_max_memory_mb: Positive = 2048
    streamsvc_cpus: Annotated[float, msgspec.Meta(gt=0, le=64)] = 1.0
    streamsvc_pids_limit: Positive = 128
    streamsvc_tmpfs_mb: Positive = 64
    streamsvc_output_cap_bytes: Positive = 1024 * 1024
    streamsvc_install_timeout_seconds: Seconds = 180.0
    streamsvc_max_concurrent_runs: Positive = 4
    streamsvc_queue_size: NonNegative = 16
    #: Longest wait in that queue; past it the request gets ``busy`` (429, or its stream's error).
    streamsvc_queue_timeout_seconds: Seconds = 120.0
    #: CA bundle the dependency-install step trusts (copied in through stdin). Unset or
    #: empty: the host's pip/SSL bundle (``_default_ca_bundle``); ``none``: no bundle.
    streamsvc_sandbox_ca_bundle: str | None = None
    streamsvc_deps_cache_mb: Positive = 4096
    #: Warm sandboxes kept ready per key (image, network, dependency set, memory); 0 = off.
    streamsvc_warm_pool_size: Annotated[int, msgspec.Meta(ge=0, le=8)] = 0
    #: Most keys kept warm at once (least recently used dropped first).
    streamsvc_warm_pool_keys: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4
    streamsvc_max_files: Positive = 200
    streamsvc_max_file_bytes: Positive = 1024 * 1024

    @property
    def chat_deployment(self) -> str | None:
        """The default deployment (Azure) or model (``openai`` provider)."""
        if self.streamsvc_chat_provider == "openai":
            return self.openai_model
        return self.azure_openai_deployment

    @property
    def chat_missing(self) -> tuple[str, ...]:
        """The settings chat still needs, by name (empty when chat is configured)."""
        if self.streamsvc_chat_provider == "openai":
            needed: dict[str, str | None] = {"OPENAI_MODEL": self.openai_model}
        else:
            needed = {
                "AZURE_OPENAI_ENDPOINT": self.azure_openai_endpoint,
                "AZURE_OPENAI_DEPLOYMENT": self.azure_openai_deployment,
            }
            if self.azure_openai_auth == "key":
                needed = {"AZURE_OPENAI_API_KEY": self.azure_openai_api_key, **needed}
        return tuple(name for name, value in needed.items() if not value)

    @property
    def chat_configured(self) -> bool:
        return not self.chat_missing

    @property
    def ca_bundle(self) -> str | None:
        return self.streamsvc_sandbox_ca_bundle or None


class ClientSettings(msgspec.Struct, frozen=True, rename="upper"):
    """The command-line client's defaults (``streamsvc run`` and ``streamsvc chat``)."""

    streamsvc_url: str = "http://127.0.0.1:8000"
    streamsvc_api_key: str | None = None


def load_client_settings(
    environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")
) -> ClientSettings:
    """The client's settings from ``.env`` overlaid by the environment."""
    merged = read_dotenv(dotenv) if dotenv is not None else {}
    merged.update(os.environ if environ is None else environ)
    names = {f.encode_name for f in msgspec.structs.fields(ClientSettings)}
    raw = {key: value for key, value in merged.items() if key in names and value}
    settings = msgspec.convert(raw, ClientSettings)
    if not settings.streamsvc_url.startswith(("http://", "https://")):
        raise SettingsError("invalid setting STREAMSVC_URL: expected an http(s) URL")
    return settings


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


_FIELDS = frozenset(f.encode_name for f in msgspec.structs.fields(Settings))


def _default_ca_bundle(source: Mapping[str, str]) -> str:
    """The host's pip/SSL CA bundle, so pip in the sandbox trusts what the host trusts."""
    for name in _DEFAULT_CA_CANDIDATES:
        candidate = source.get(name)
        if candidate and Path(candidate).is_file():
            return candidate
    for pip_conf in (Path("/etc/pip.conf"), Path.home() / ".config/pip/pip.conf"):
        if pip_conf.is_file():
            for line in pip_conf.read_text(encoding="utf-8").splitlines():
                key, sep, value = line.partition("=")
                if sep and key.strip() == "cert" and Path(value.strip()).is_file():
                    return value.strip()
    return ""


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")
) -> Settings:
    """Build the settings from ``.env`` overlaid by the environment."""
    env = dict(os.environ if environ is None else environ)
    merged = read_dotenv(dotenv) if dotenv is not None else {}
    merged.update(env)
    raw: dict[str, Any] = {}
    for key, value in merged.items():
        if key not in _FIELDS:
            continue
        if value == "":
            continue  # an empty assignment means "use the default"
        if key in _LIST_FIELDS:
            raw[key] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            raw[key] = value
    ca_bundle = raw.get("STREAMSVC_SANDBOX_CA_BUNDLE")
    if ca_bundle is None:
        raw["STREAMSVC_SANDBOX_CA_BUNDLE"] = _default_ca_bundle(merged)
    elif ca_bundle.strip().lower() == "none":
        raw["STREAMSVC_SANDBOX_CA_BUNDLE"] = ""
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(exc)) from None
    _check(settings)
    return settings


def _explain(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    head, _, where = message.rpartition(" - at `$.")
    if where:
        return f"invalid setting {where.rstrip('`')}: {head}"
    return f"invalid settings: {message}"


def _check(settings: Settings) -> None:
    if settings.streamsvc_min_memory_mb > settings.streamsvc_max_memory_mb:
        raise SettingsError(
            "invalid setting STREAMSVC_MIN_MEMORY_MB: larger than STREAMSVC_MAX_MEMORY_MB"
        )
    ca_bundle = settings.ca_bundle
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        raise SettingsError(f"invalid setting STREAMSVC_SANDBOX_CA_BUNDLE: no file {ca_bundle}")
    for origin in settings.streamsvc_cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise SettingsError(
                f"invalid setting STREAMSVC_CORS_ORIGINS: {origin!r} is not scheme://host[:port]"
            )
    endpoint = settings.azure_openai_endpoint
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise SettingsError("invalid setting AZURE_OPENAI_ENDPOINT: expected an http(s) URL")
    if not settings.openai_base_url.startswith(("http://", "https://")):
        raise SettingsError("invalid setting OPENAI_BASE_URL: expected an http(s) URL")
    if settings.streamsvc_log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise SettingsError(
            "invalid setting STREAMSVC_LOG_LEVEL: expected debug, info, warning or error"
        )
