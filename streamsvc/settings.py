"""Settings: frozen structs per subsystem, built once from the environment and ``.env``.

``Settings`` holds one group per subsystem; each component receives only its group. The rule:
the only module that reads the environment (``ENV_NAMES``, ``dotenv_files``). Over 400 lines:
every group, every env name and the ``.env`` search are here, so one module owns the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "ENV_NAMES",
    "ChatSettings",
    "ClientSettings",
    "SandboxSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "dotenv_files",
    "load_client_settings",
    "load_settings",
    "read_dotenv",
]

#: The environment variable naming the one ``.env`` to read (``none``: read none).
ENV_FILE_VARIABLE = "STREAMSVC_ENV_FILE"
#: The source checkout this package runs from, when it runs from one (an editable install).
_PROJECT = Path(__file__).resolve().parent.parent
#: ``dotenv`` argument meaning: look for ``.env`` files as ``dotenv_files`` says.
AUTO: Literal["auto"] = "auto"

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65_535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]

_DEFAULT_CA_CANDIDATES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")


class SettingsError(ValueError):
    """A setting is malformed; the message names the variable."""


class ServerSettings(msgspec.Struct, frozen=True):
    """The HTTP server: listening, auth, CORS, bodies, streams, logging."""

    host: str = "127.0.0.1"
    port: Port = 8000
    #: Server processes sharing the listening socket; each has its own limits and warm pool.
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    api_keys: tuple[str, ...] = ()
    allow_insecure: bool = False
    #: Origins whose pages may call the API from a browser (CORS); ``*`` for any. None: off.
    cors_origins: tuple[str, ...] = ()
    #: Names a request's ``Host`` may carry besides loopback and ``host``; ``*`` for any.
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: Positive = 4 * 1024 * 1024
    #: Request-body bytes all requests of this worker may hold at once while they arrive;
    #: a body that would exceed it is refused with ``busy`` (429) before more of it is read.
    max_body_bytes_in_flight: Positive = 64 * 1024 * 1024
    #: Longest time a request body may take to arrive, whole.
    body_timeout_seconds: Seconds = 30.0
    #: Longest wait for a client to take one piece of an answer; past it, it is dropped.
    send_timeout_seconds: Seconds = 30.0
    keepalive_seconds: Seconds = 15.0
    shutdown_grace_seconds: Seconds = 10.0
    log_level: str = "info"
    #: ``text`` (readable; the default) or ``json`` (one object per line, for collectors).
    log_format: Literal["text", "json"] = "text"
    #: Log chat content at debug level; never by default.
    log_content: bool = False
    #: Requests per minute each API key may make (0: no limit); per worker process.
    key_requests_per_minute: NonNegative = 0
    #: Chat tokens per minute each API key may use (0: no limit); per worker process.
    key_tokens_per_minute: NonNegative = 0


class ChatSettings(msgspec.Struct, frozen=True):
    """The chat upstream: provider, credentials, defaults, fallbacks and timeouts."""

    #: ``azure`` (Azure OpenAI) or ``openai`` (any OpenAI-compatible base URL).
    provider: Literal["azure", "openai"] = "azure"
    azure_api_key: str | None = None
    azure_endpoint: str | None = None
    azure_deployment: str | None = None
    azure_api_version: str = "2024-10-21"
    #: ``key`` (AZURE_OPENAI_API_KEY) or ``entra`` (Microsoft Entra ID, needs azure-identity).
    azure_auth: Literal["key", "entra"] = "key"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = None
    #: The ``openai`` provider's default model (Azure's is AZURE_OPENAI_DEPLOYMENT).
    openai_model: str | None = None
    max_tokens: Positive = 2000
    temperature: Temperature = 0.7
    #: Model-name prefixes that take ``max_completion_tokens`` and no temperature.
    reasoning_models: tuple[str, ...] = ("gpt-5", "o1", "o3", "o4")
    #: Deployments (models) tried in order when the one asked for answers 429 or 5xx.
    fallback_deployments: tuple[str, ...] = ()
    #: The SDK's HTTP client for the upstream: ``aiohttp`` (its C parser and pool cost less
    #: CPU per streamed chunk) or ``httpx`` (the SDK's default).
    http_client: Literal["aiohttp", "httpx"] = "aiohttp"
    #: Most upstream connections open at once (each open stream holds one).
    max_connections: Positive = 1000
    connect_timeout_seconds: Seconds = 10.0
    first_token_timeout_seconds: Seconds = 60.0
    idle_timeout_seconds: Seconds = 60.0
    retry_max_wait_seconds: Annotated[float, msgspec.Meta(ge=0, le=600)] = 20.0
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3

    @property
    def deployment(self) -> str | None:
        """The default deployment (Azure) or model (``openai`` provider)."""
        if self.provider == "openai":
            return self.openai_model
        return self.azure_deployment

    @property
    def missing(self) -> tuple[str, ...]:
        """The settings chat still needs, by name (empty when chat is configured)."""
        if self.provider == "openai":
            needed: dict[str, str | None] = {"OPENAI_MODEL": self.openai_model}
        else:
            needed = {
                "AZURE_OPENAI_ENDPOINT": self.azure_endpoint,
                "AZURE_OPENAI_DEPLOYMENT": self.azure_deployment,
            }
            if self.azure_auth == "key":
                needed = {"AZURE_OPENAI_API_KEY": self.azure_api_key, **needed}
        return tuple(name for name, value in needed.items() if not value)

    @property
    def configured(self) -> bool:
        return not self.missing


class SandboxSettings(msgspec.Struct, frozen=True):
    """Connector runs: the Docker engine, the image, per-run limits, admission, caches."""

    docker_host: str | None = None
    image: str = "streamsvc-sandbox:latest"
    allow_bridge: bool = True
    #: The bridge network of ``network_mode: bridge`` runs and of installs (firewalled).
    network: str = "streamsvc-sandbox"
    max_timeout_ms: Positive = 300_000
    min_memory_mb: Annotated[int, msgspec.Meta(ge=6)] = 32
    max_memory_mb: Positive = 2048
    cpus: Annotated[float, msgspec.Meta(gt=0, le=64)] = 1.0
    pids_limit: Positive = 128
    tmpfs_mb: Positive = 64
    output_cap_bytes: Positive = 1024 * 1024
    install_timeout_seconds: Seconds = 180.0
    max_concurrent_runs: Positive = 4
    queue_size: NonNegative = 16
    #: Longest wait in that queue; past it the request gets ``busy`` (429, or its stream's error).
    queue_timeout_seconds: Seconds = 120.0
    #: CA bundle the dependency-install step trusts (copied in through stdin). Unset or
    #: empty: the host's pip/SSL bundle (``_default_ca_bundle``); ``none``: no bundle (None).
    ca_bundle: str | None = None
    deps_cache_mb: Positive = 4096
    #: Warm sandboxes kept ready per key (image, network, dependency set, memory); 0 = off.
    warm_pool_size: Annotated[int, msgspec.Meta(ge=0, le=8)] = 2
    #: Most keys kept warm at once (least recently used dropped first).
    warm_pool_keys: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4
    max_files: Positive = 200
    max_file_bytes: Positive = 1024 * 1024


class RunSettings(msgspec.Struct, frozen=True):
    """Run records: the store, disconnect grace per kind, retention, read tokens."""

    #: ``sqlite:////abs/path.db`` or ``memory://`` (default: in the XDG state dir); grace: how
    #: long a run goes on without a reader before it is cancelled as abandoned.
    store: str = "memory://"
    connector_grace_seconds: Seconds = 30.0
    chat_grace_seconds: Seconds = 10.0
    retention_seconds: Annotated[float, msgspec.Meta(gt=0, le=366 * 86_400)] = 86_400.0
    token_secret: str | None = None
    #: Unfinished runs (background, streamed, or left in their grace) this process holds at
    #: once, in all and per API key; past either a new one is refused (429 too_many_runs).
    max_active_runs: Positive = 2000
    max_active_runs_per_key: Positive = 500
    #: With a Redis store (issue 16): queued plus running connector runs across the cluster
    #: (past it: 429 ``busy``); how long an executor may go without a heartbeat before its
    #: runs end ``executor_lost``; how often executors heartbeat (and nodes reap); how long
    #: a queued run may wait for an executor before the reapers fail it (``queue_timeout``).
    queue_capacity: Positive = 64
    lease_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 15.0
    queue_wait_seconds: Annotated[float, msgspec.Meta(gt=0, le=7 * 86_400)] = 600.0
    heartbeat_seconds: Annotated[float, msgspec.Meta(gt=0, le=600)] = 3.0


class Settings(msgspec.Struct, frozen=True):
    """All the server's settings, one group per subsystem."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    chat: ChatSettings = msgspec.field(default_factory=ChatSettings)
    sandbox: SandboxSettings = msgspec.field(default_factory=SandboxSettings)
    runs: RunSettings = msgspec.field(default_factory=RunSettings)


#: Every environment variable, by the group and field it sets.
ENV_NAMES: dict[str, tuple[str, str]] = {
    # the seed's names
    "AZURE_OPENAI_API_KEY": ("chat", "azure_api_key"),
    "AZURE_OPENAI_ENDPOINT": ("chat", "azure_endpoint"),
    "AZURE_OPENAI_DEPLOYMENT": ("chat", "azure_deployment"),
    "AZURE_OPENAI_API_VERSION": ("chat", "azure_api_version"),
    "AZURE_OPENAI_AUTH": ("chat", "azure_auth"),
    "OPENAI_MAX_TOKENS": ("chat", "max_tokens"),
    "OPENAI_TEMPERATURE": ("chat", "temperature"),
    "OPENAI_REASONING_MODELS": ("chat", "reasoning_models"),
    "OPENAI_BASE_URL": ("chat", "openai_base_url"),
    "OPENAI_API_KEY": ("chat", "openai_api_key"),
    "OPENAI_MODEL": ("chat", "openai_model"),
    # chat
    "STREAMSVC_CHAT_PROVIDER": ("chat", "provider"),
    "STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS": ("chat", "fallback_deployments"),
    "STREAMSVC_CHAT_HTTP_CLIENT": ("chat", "http_client"),
    "STREAMSVC_CHAT_MAX_CONNECTIONS": ("chat", "max_connections"),
    "STREAMSVC_CONNECT_TIMEOUT_SECONDS": ("chat", "connect_timeout_seconds"),
    "STREAMSVC_FIRST_TOKEN_TIMEOUT_SECONDS": ("chat", "first_token_timeout_seconds"),
    "STREAMSVC_IDLE_TIMEOUT_SECONDS": ("chat", "idle_timeout_seconds"),
    "STREAMSVC_RETRY_MAX_WAIT_SECONDS": ("chat", "retry_max_wait_seconds"),
    "STREAMSVC_MAX_RETRIES": ("chat", "max_retries"),
    # the HTTP server
    "STREAMSVC_HOST": ("server", "host"),
    "STREAMSVC_PORT": ("server", "port"),
    "STREAMSVC_WORKERS": ("server", "workers"),
    "STREAMSVC_API_KEYS": ("server", "api_keys"),
    "STREAMSVC_ALLOW_INSECURE": ("server", "allow_insecure"),
    "STREAMSVC_CORS_ORIGINS": ("server", "cors_origins"),
    "STREAMSVC_ALLOWED_HOSTS": ("server", "allowed_hosts"),
    "STREAMSVC_MAX_BODY_BYTES": ("server", "max_body_bytes"),
    "STREAMSVC_MAX_BODY_BYTES_IN_FLIGHT": ("server", "max_body_bytes_in_flight"),
    "STREAMSVC_BODY_TIMEOUT_SECONDS": ("server", "body_timeout_seconds"),
    "STREAMSVC_SEND_TIMEOUT_SECONDS": ("server", "send_timeout_seconds"),
    "STREAMSVC_KEEPALIVE_SECONDS": ("server", "keepalive_seconds"),
    "STREAMSVC_SHUTDOWN_GRACE_SECONDS": ("server", "shutdown_grace_seconds"),
    "STREAMSVC_LOG_LEVEL": ("server", "log_level"),
    "STREAMSVC_LOG_FORMAT": ("server", "log_format"),
    "STREAMSVC_LOG_CONTENT": ("server", "log_content"),
    "STREAMSVC_KEY_REQUESTS_PER_MINUTE": ("server", "key_requests_per_minute"),
    "STREAMSVC_KEY_TOKENS_PER_MINUTE": ("server", "key_tokens_per_minute"),
    # the sandbox
    "DOCKER_HOST": ("sandbox", "docker_host"),
    "STREAMSVC_SANDBOX_IMAGE": ("sandbox", "image"),
    "STREAMSVC_ALLOW_BRIDGE": ("sandbox", "allow_bridge"),
    "STREAMSVC_SANDBOX_NETWORK": ("sandbox", "network"),
    "STREAMSVC_MAX_TIMEOUT_MS": ("sandbox", "max_timeout_ms"),
    "STREAMSVC_MIN_MEMORY_MB": ("sandbox", "min_memory_mb"),
    "STREAMSVC_MAX_MEMORY_MB": ("sandbox", "max_memory_mb"),
    "STREAMSVC_CPUS": ("sandbox", "cpus"),
    "STREAMSVC_PIDS_LIMIT": ("sandbox", "pids_limit"),
    "STREAMSVC_TMPFS_MB": ("sandbox", "tmpfs_mb"),
    "STREAMSVC_OUTPUT_CAP_BYTES": ("sandbox", "output_cap_bytes"),
    "STREAMSVC_INSTALL_TIMEOUT_SECONDS": ("sandbox", "install_timeout_seconds"),
    "STREAMSVC_MAX_CONCURRENT_RUNS": ("sandbox", "max_concurrent_runs"),
    "STREAMSVC_QUEUE_SIZE": ("sandbox", "queue_size"),
    "STREAMSVC_QUEUE_TIMEOUT_SECONDS": ("sandbox", "queue_timeout_seconds"),
    "STREAMSVC_SANDBOX_CA_BUNDLE": ("sandbox", "ca_bundle"),
    "STREAMSVC_DEPS_CACHE_MB": ("sandbox", "deps_cache_mb"),
    "STREAMSVC_WARM_POOL_SIZE": ("sandbox", "warm_pool_size"),
    "STREAMSVC_WARM_POOL_KEYS": ("sandbox", "warm_pool_keys"),
    "STREAMSVC_MAX_FILES": ("sandbox", "max_files"),
    "STREAMSVC_MAX_FILE_BYTES": ("sandbox", "max_file_bytes"),
    "STREAMSVC_RUN_STORE": ("runs", "store"),
    "STREAMSVC_RUN_GRACE_CONNECTOR_SECONDS": ("runs", "connector_grace_seconds"),
    "STREAMSVC_RUN_GRACE_CHAT_SECONDS": ("runs", "chat_grace_seconds"),
    "STREAMSVC_RUN_RETENTION_SECONDS": ("runs", "retention_seconds"),
    "STREAMSVC_RUN_TOKEN_SECRET": ("runs", "token_secret"),
    "STREAMSVC_MAX_ACTIVE_RUNS": ("runs", "max_active_runs"),
    "STREAMSVC_MAX_ACTIVE_RUNS_PER_KEY": ("runs", "max_active_runs_per_key"),
    "STREAMSVC_QUEUE_CAPACITY": ("runs", "queue_capacity"),
    "STREAMSVC_LEASE_SECONDS": ("runs", "lease_seconds"),
    "STREAMSVC_QUEUE_WAIT_SECONDS": ("runs", "queue_wait_seconds"),
    "STREAMSVC_HEARTBEAT_SECONDS": ("runs", "heartbeat_seconds"),
}
_VARIABLES = {place: name for name, place in ENV_NAMES.items()}

#: Settings that hold comma-separated lists in the environment.
_LIST_FIELDS = frozenset(
    {
        "STREAMSVC_API_KEYS",
        "STREAMSVC_CORS_ORIGINS",
        "STREAMSVC_ALLOWED_HOSTS",
        "OPENAI_REASONING_MODELS",
        "STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS",
    }
)


class ClientSettings(msgspec.Struct, frozen=True):
    """The command-line client's defaults (``streamsvc run`` and ``streamsvc chat``)."""

    url: str = msgspec.field(default="http://127.0.0.1:8000", name="STREAMSVC_URL")
    api_key: str | None = msgspec.field(default=None, name="STREAMSVC_API_KEY")


def dotenv_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The ``.env`` files to read, later ones winning: ``STREAMSVC_ENV_FILE`` alone when set
    (``none``: none), else the project's (a source checkout's) and the working directory's.
    """
    chosen = (os.environ if environ is None else environ).get(ENV_FILE_VARIABLE, "").strip()
    if chosen:
        if chosen.lower() != "none" and not Path(chosen).is_file():
            raise SettingsError(f"invalid setting {ENV_FILE_VARIABLE}: {chosen} is not a file")
        return [] if chosen.lower() == "none" else [Path(chosen)]
    project = [_PROJECT / ".env"] if (_PROJECT / "pyproject.toml").is_file() else []
    found: list[Path] = []
    for path in (*project, Path(".env")):
        if path.is_file() and not any(path.samefile(other) for other in found):
            found.append(path)
    return found


def _read_dotenvs(environ: Mapping[str, str] | None, dotenv: Path | str | None) -> dict[str, str]:
    merged: dict[str, str] = {}
    paths = dotenv_files(environ) if dotenv == AUTO else [] if dotenv is None else [Path(dotenv)]
    for path in paths:
        merged.update(read_dotenv(path))
    return merged


def load_client_settings(
    environ: Mapping[str, str] | None = None, dotenv: Path | Literal["auto"] | None = AUTO
) -> ClientSettings:
    """The client's settings from ``.env`` (``dotenv_files``) overlaid by the environment."""
    merged = _read_dotenvs(environ, dotenv)
    merged.update(os.environ if environ is None else environ)
    names = {f.encode_name for f in msgspec.structs.fields(ClientSettings)}
    raw = {key: value for key, value in merged.items() if key in names and value}
    settings = msgspec.convert(raw, ClientSettings)
    if not settings.url.startswith(("http://", "https://")):
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


def _default_ca_bundle(source: Mapping[str, str]) -> str | None:
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
    return None


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv: Path | Literal["auto"] | None = AUTO
) -> Settings:
    """Build the settings from ``.env`` (``dotenv_files``) overlaid by the environment."""
    env = dict(os.environ if environ is None else environ)
    merged = _read_dotenvs(environ, dotenv)
    merged.update(env)
    raw: dict[str, dict[str, Any]] = {"server": {}, "chat": {}, "sandbox": {}, "runs": {}}
    for key, value in merged.items():
        if key not in ENV_NAMES or value == "":
            continue  # not ours, or an empty assignment: "use the default"
        group, field = ENV_NAMES[key]
        if key in _LIST_FIELDS:
            raw[group][field] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            raw[group][field] = value
    ca_bundle = raw["sandbox"].get("ca_bundle")
    if ca_bundle is None:
        raw["sandbox"]["ca_bundle"] = _default_ca_bundle(merged)
    elif ca_bundle.strip().lower() == "none":
        raw["sandbox"]["ca_bundle"] = None
    state = Path(merged.get("XDG_STATE_HOME") or "~/.local/state").expanduser()  # runs: XDG
    raw["runs"].setdefault("store", f"sqlite:///{state.absolute()}/streamsvc/runs.db")
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(exc)) from None
    _check(settings)
    return settings


def _explain(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    head, _, where = message.rpartition(" - at `$.")
    group, _, field = where.rstrip("`").partition(".")
    name = _VARIABLES.get((group, field.split("[", 1)[0]))
    if name is not None:
        return f"invalid setting {name}: {head}"
    return f"invalid settings: {message}"


def _check(settings: Settings) -> None:
    server, chat, sandbox = settings.server, settings.chat, settings.sandbox
    if sandbox.min_memory_mb > sandbox.max_memory_mb:
        raise SettingsError(
            "invalid setting STREAMSVC_MIN_MEMORY_MB: larger than STREAMSVC_MAX_MEMORY_MB"
        )
    if server.max_body_bytes_in_flight < server.max_body_bytes:
        raise SettingsError(
            "invalid setting STREAMSVC_MAX_BODY_BYTES_IN_FLIGHT: smaller than"
            " STREAMSVC_MAX_BODY_BYTES"
        )
    if sandbox.ca_bundle is not None and not Path(sandbox.ca_bundle).is_file():
        raise SettingsError(
            f"invalid setting STREAMSVC_SANDBOX_CA_BUNDLE: no file {sandbox.ca_bundle}"
        )
    for origin in server.cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise SettingsError(
                f"invalid setting STREAMSVC_CORS_ORIGINS: {origin!r} is not scheme://host[:port]"
            )
    for name in server.allowed_hosts:
        if name != "*" and not re.fullmatch(r"[A-Za-z0-9.:\[\]_-]+", name):
            raise SettingsError(
                f"invalid setting STREAMSVC_ALLOWED_HOSTS: {name!r} is not a host name or address"
            )
    if not re.fullmatch(r"memory://|sqlite:////.+|rediss?://.+", settings.runs.store):
        raise SettingsError("invalid setting STREAMSVC_RUN_STORE: sqlite:////, memory://, redis://")
    if chat.azure_endpoint and not chat.azure_endpoint.startswith(("http://", "https://")):
        raise SettingsError("invalid setting AZURE_OPENAI_ENDPOINT: expected an http(s) URL")
    if not chat.openai_base_url.startswith(("http://", "https://")):
        raise SettingsError("invalid setting OPENAI_BASE_URL: expected an http(s) URL")
    if server.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise SettingsError(
            "invalid setting STREAMSVC_LOG_LEVEL: expected debug, info, warning or error"
        )
