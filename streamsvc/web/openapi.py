"""The OpenAPI 3.1 document, generated from the msgspec types the routes use.

The rule: built from the structs, so it cannot drift; streams are ``text/event-stream`` with
one schema per event (``x-sse-events``). It imports the endpoints for their types only.
Over 400 lines: the whole document (every route, /runs included) is built in one place.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.chat.endpoint import ChatDelta, ChatRequest, ChatResult
from streamsvc.chat.openai_chunks import AZURE_EXTRAS_HEADER
from streamsvc.chat.openai_compat import CompletionRequest, Model, ModelList
from streamsvc.chat.openai_errors import OpenAIErrorEnvelope
from streamsvc.connectors.request import ConnectorCore, ExecuteRequest
from streamsvc.connectors.transcript import ExecutionResult
from streamsvc.errors import ErrorEnvelope
from streamsvc.runs.endpoint import RunList, RunView
from streamsvc.runs.respond import Accepted
from streamsvc.runs.store import RunStatus
from streamsvc.sandbox.types import Status
from streamsvc.web import health
from streamsvc.web.examples import ExampleIndex

REF = "#/components/schemas/{name}"


class OutputText(msgspec.Struct):
    """The data of a ``stdout`` or ``stderr`` event: a chunk as the program wrote it."""

    text: str


class HealthReport(msgspec.Struct):
    """GET /health: ``ok`` when every component is ready, else ``degraded``."""

    status: Literal["ok", "degraded"]
    #: ``chat`` ({state, deployment}) and ``sandbox`` ({state, image, running, queued}).
    components: dict[str, dict[str, Any]]


class CompletionChoice(msgspec.Struct):
    index: int
    #: ``{role, content}``, and ``tool_calls``, ``refusal``, ... as the upstream answered.
    message: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct):
    """OpenAI's ``chat.completion`` (more fields may appear, e.g. Azure's filter results)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, Any] | None = None


class ChatCompletionChunk(msgspec.Struct):
    """One ``chat.completion.chunk``: every choice has a ``delta``; ``choices`` is empty only
    in the usage chunk asked for. ``id``, ``model`` and ``created`` are the same all along."""

    choices: list[dict[str, Any]]
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    usage: dict[str, Any] | None = None


_TYPES = (
    ChatRequest,
    ChatResult,
    ChatDelta,
    ExecuteRequest,
    ConnectorCore,
    ExecutionResult,
    Status,
    OutputText,
    ErrorEnvelope,
    HealthReport,
    health.Liveness,
    health.Readiness,
    ExampleIndex,
    CompletionRequest,
    ChatCompletion,
    ChatCompletionChunk,
    OpenAIErrorEnvelope,
    Model,
    ModelList,
    Accepted,
    RunView,
    RunList,
)

CHAT_EVENTS = {
    "delta": ("ChatDelta", "One content delta, in order."),
    "done": ("ChatResult", "The last event: exactly the JSON answer."),
    "error": ("ErrorEnvelope", "The last event when the stream failed after the headers."),
}
EXECUTE_EVENTS = {
    "status": (
        "Status",
        "One per step: validated, queued (position), installing_dependencies (then its"
        " elapsed time), dependencies_ready (cache hit or miss), starting (warm or cold), running.",
    ),
    "stdout": ("OutputText", "A chunk of the program's standard output, live."),
    "stderr": ("OutputText", "A chunk of the program's standard error, live."),
    "done": ("ExecutionResult", "The last event: exactly the JSON answer."),
    "error": ("ErrorEnvelope", "The last event when the run could not finish."),
}

#: Every error a route can answer with, by status.
ERRORS = {
    "400": (
        "Malformed JSON (`malformed_json`), under /v1 a body of the wrong shape "
        "(`validation_error`, `param` names it), or a request that cannot be served as asked."
    ),
    "401": "A valid API key is required (`unauthorized`), when the server has keys.",
    "403": "A browser page of another origin (`origin_not_allowed`), see STREAMSVC_CORS_ORIGINS.",
    "404": "The upstream has no such model or deployment.",
    "408": "The body did not arrive within STREAMSVC_BODY_TIMEOUT_SECONDS (`body_timeout`).",
    "413": "The body is larger than STREAMSVC_MAX_BODY_BYTES (`payload_too_large`).",
    "415": "The body is not `application/json` (`unsupported_media_type`).",
    "421": "A Host header this server does not answer for (`host_not_allowed`).",
    "422": "JSON of the wrong shape (`validation_error`); `path` points at it.",
    "429": "Too many requests (`busy`, `upstream_rate_limited`, `rate_limited`,"
    " `too_many_runs`); see Retry-After.",
    "500": "An unexpected failure (`internal_error`, `sandbox_failed`).",
    "502": "The chat upstream failed (`upstream_error`, `upstream_auth`).",
    "503": "Not configured or not available (`chat_not_configured`, `sandbox_unavailable`).",
    "504": "The chat upstream did not answer in time (`upstream_timeout`).",
    "409": "Not now: `run_not_finished` (cancel it first), `run_elsewhere` (another process).",
    "410": "Retention pruned the run's events (`events_expired`); its record is still there.",
}
#: The /runs routes' 404: no such run, or another key's (the same answer).
RUN_NOT_FOUND = "No such run (`not_found`), or one another API key created."
_GUARDS = ("401", "403", "408", "413", "415", "421", "422", "429", "500")
CHAT_ERRORS = ("400", *_GUARDS, "502", "503", "504")
EXECUTE_ERRORS = ("400", *_GUARDS, "503")
#: /v1 answers a body of the wrong shape with 400 (OpenAI's BadRequestError), never 422.
COMPLETIONS_ERRORS = (
    "400",
    *_GUARDS[:2],
    "404",
    *(status for status in _GUARDS[2:] if status != "422"),
    "502",
    "503",
    "504",
)

_CONNECTOR_NOTE = (
    "The connector definition. `runtime`, `files` and `configuration` are read "
    "by the engine (see the Connector schema); any other top-level key (`auth`, "
    "`schemaVersion`, `displayName`, ...) is kept and visible to the program. "
    "`runtime.dependencies` is an array of `{name, version}`, an array of strings "
    "or an object map of name to version. Validation problems are a 400 whose "
    "`details.problems` lists every one."
)

_VERSION = {"type": "string", "description": "A PEP 440 version or specifier."}
_DEPENDENCIES = {
    "description": (
        "Packages installed before the entry point runs (PEP 508 names; no pip "
        "options, URLs or paths). Three forms, as in the original contract."
    ),
    "anyOf": [
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "version": _VERSION},
                "required": ["name"],
            },
        },
        {"type": "array", "items": {"type": "string"}},
        {"type": "object", "additionalProperties": _VERSION},
        {"type": "null"},
    ],
    "default": None,
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _frame(events: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The schema of one SSE frame, one branch per event name."""
    return {
        "description": (
            "One Server-Sent Event: `event:` is its name, `id:` increases by one per "
            "event, `data:` is one JSON document (shown decoded). Comment lines are "
            "keep-alives."
        ),
        "oneOf": [
            {
                "type": "object",
                "description": description,
                "properties": {
                    "event": {"const": name},
                    "id": {"type": "string", "pattern": "^[0-9]+$"},
                    "data": _ref(schema),
                },
                "required": ["event", "data"],
            }
            for name, (schema, description) in events.items()
        ],
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(statuses: tuple[str, ...], envelope: str = "ErrorEnvelope") -> dict[str, Any]:
    return {status: _json(_ref(envelope), ERRORS[status]) for status in statuses}


_COMPLETIONS_FRAME = {
    "description": (
        "One Server-Sent Event of /v1/chat/completions: a `data:` line only (no "
        "`event:` or `id:`) holding an upstream chunk, a final error object, or the "
        "literal `[DONE]` that ends a stream that did not fail."
    ),
    "type": "object",
    "properties": {
        "data": {
            "oneOf": [
                _ref("ChatCompletionChunk"),
                _ref("OpenAIErrorEnvelope"),
                {"const": "[DONE]"},
            ]
        }
    },
    "required": ["data"],
}


def _completions() -> dict[str, Any]:
    return {
        "post": {
            "summary": "OpenAI-compatible chat completions (point an OpenAI SDK at /v1)",
            "description": (
                "OpenAI's request body: `messages` (objects with a `role`), `model` "
                "(the deployment; default: the configured one) and `stream` are checked, "
                "every other field (tools, tool_choice, functions, response_format, n, "
                "seed, ...) goes to the upstream untouched. OPENAI_MAX_TOKENS and "
                "OPENAI_TEMPERATURE fill only fields left out. The usage chunk is sent "
                "when `stream_options.include_usage` is true. Streams are cleaned for "
                "OpenAI's clients: Azure's prompt-filter chunk and its annotation chunks "
                "(no `delta`) are dropped; with the request header "
                f"`{AZURE_EXTRAS_HEADER}: 1` the prompt-filter results ride on the "
                "first chunk and annotations come with `delta: {}`. The JSON answer "
                "keeps Azure's filter results, as Azure answers without streaming."
            ),
            "security": [{"bearerAuth": []}, {"apiKeyHeader": []}, {}],
            "parameters": [
                {
                    "name": AZURE_EXTRAS_HEADER,
                    "in": "header",
                    "required": False,
                    "description": "`1`: keep Azure's filter results in the stream.",
                    "schema": {"type": "string", "enum": ["1", "true"]},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("CompletionRequest")}},
            },
            "responses": {
                "200": {
                    "description": "A `chat.completion`, or with `stream` true its chunks.",
                    "content": {
                        "application/json": {"schema": _ref("ChatCompletion")},
                        "text/event-stream": {"schema": _ref("CompletionStreamEvent")},
                    },
                },
                **_errors(COMPLETIONS_ERRORS, "OpenAIErrorEnvelope"),
            },
        }
    }


def _models() -> dict[str, Any]:
    listing = {
        "get": {
            "summary": "The configured deployments, in OpenAI's shape",
            "description": (
                "The default deployment (AZURE_OPENAI_DEPLOYMENT or OPENAI_MODEL), then "
                "STREAMSVC_CHAT_FALLBACK_DEPLOYMENTS. `created` is 0 (not known)."
            ),
            "security": [{"bearerAuth": []}, {"apiKeyHeader": []}, {}],
            "responses": {
                "200": _json(_ref("ModelList"), "The list."),
                **_errors(("401", "403", "421", "503"), "OpenAIErrorEnvelope"),
            },
        }
    }
    one = {
        "get": {
            "summary": "One configured deployment, in OpenAI's shape",
            "security": [{"bearerAuth": []}, {"apiKeyHeader": []}, {}],
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": _json(_ref("Model"), "The model."),
                "404": _json(
                    _ref("OpenAIErrorEnvelope"),
                    "Not one of the configured deployments (`model_not_found`).",
                ),
                **_errors(("401", "403", "421", "503"), "OpenAIErrorEnvelope"),
            },
        }
    }
    return {"/v1/models": listing, "/v1/models/{model}": one}


_RUN_HEADER = {
    "X-Run-ID": {"description": "The run's id (`GET /runs/{id}`).", "schema": {"type": "string"}}
}
_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
_RUN_ERRORS = ("401", "403", "421", "500")
RUN_EVENTS = {
    **{name: entry for name, entry in EXECUTE_EVENTS.items() if name != "done"},
    **{name: entry for name, entry in CHAT_EVENTS.items() if name != "done"},
    "done": ("RunResult", "The last event of a run that completed: its final object."),
}


def _run_operation(summary: str, description: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": description,
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}, {}],
        "parameters": [_RUN_ID],
        "responses": {
            **responses,
            "404": _json(_ref("ErrorEnvelope"), RUN_NOT_FOUND),
            **_errors(_RUN_ERRORS),
        },
    }


def _file_operation() -> dict[str, Any]:
    """``GET /runs/{id}/files/{name}``: an output file past the inline cap (issue 15)."""
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "The file's name as listed in the run's `files` (may contain `/`).",
        "schema": {"type": "string"},
    }
    token = {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}
    operation = _run_operation(
        "Download an output file kept with a run",
        "A file the program wrote past the inline cap (its `files` entry has this `url`), "
        "kept as long as the run (deleted and pruned with it). Visible as the run is: the "
        "key that created it, or `?token=` from `events_url` (the playground links it). "
        "`ETag` is the file's sha256; `If-None-Match` with it answers 304.",
        {
            "200": {
                "description": "The bytes, with the stored media type, as an attachment.",
                "headers": {
                    "ETag": {"schema": {"type": "string"}},
                    "Content-Disposition": {"schema": {"type": "string"}},
                    "Content-Length": {"schema": {"type": "integer"}},
                },
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            },
            "304": {"description": "Not modified (`If-None-Match` matched the ETag)."},
        },
    )
    operation["parameters"] = [_RUN_ID, name, token]
    operation["responses"]["404"] = _json(
        _ref("ErrorEnvelope"), RUN_NOT_FOUND + " Or no such file: `file_not_found`."
    )
    return operation


def _runs() -> dict[str, Any]:
    """The /runs routes (issue 13): records, resumable event streams, cancel, delete."""
    show = _json(_ref("RunView"), "The run's record.")
    query = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in (
            ("kind", {"enum": ["connector", "chat"]}),
            ("status", {"enum": list(get_args(RunStatus))}),
            ("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}),
            ("before", {"type": "string", "description": "A run id: the page after it."}),
        )
    ]
    events = {
        "summary": "A run's events: replayed after Last-Event-ID, then live",
        "description": (
            "Server-Sent Events with the run's own ids (1..n): the events after the "
            "`Last-Event-ID` header (or `?after=N`), then the live ones, ending after the "
            "terminal `done` or `error`. `?token=` (from `events_url`) opens this run's "
            "events without an API key (for EventSource)."
        ),
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}, {}],
        "parameters": [
            _RUN_ID,
            {"name": "after", "in": "query", "required": False, "schema": {"type": "integer"}},
            {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}},
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
        ],
        "responses": {
            "200": {
                "description": "The events as SSE.",
                "content": {
                    "text/event-stream": {
                        "schema": _ref("RunStreamEvent"),
                        "x-sse-events": {
                            name: {"description": text, "schema": _ref(schema)}
                            for name, (schema, text) in RUN_EVENTS.items()
                        },
                    }
                },
            },
            "404": _json(_ref("ErrorEnvelope"), RUN_NOT_FOUND),
            "410": _json(_ref("ErrorEnvelope"), ERRORS["410"]),
            **_errors((*_RUN_ERRORS, "422")),
        },
    }
    return {
        "/runs": {
            "get": {
                "summary": "The caller's runs, newest first, without result bodies",
                "security": [{"bearerAuth": []}, {"apiKeyHeader": []}, {}],
                "parameters": query,
                "responses": {
                    "200": _json(_ref("RunList"), "A page of runs; `next` is the next page."),
                    **_errors((*_RUN_ERRORS, "422")),
                },
            }
        },
        "/runs/{run_id}": {
            "get": _run_operation(
                "A run's record", "Status, times, result or error.", {"200": show}
            ),
            "delete": _run_operation(
                "Remove a finished run and its events",
                "A run still going is a 409 `run_not_finished`: cancel it first.",
                {
                    "204": {"description": "Removed."},
                    "409": _json(_ref("ErrorEnvelope"), ERRORS["409"]),
                },
            ),
        },
        "/runs/{run_id}/events": {"get": events},
        "/runs/{run_id}/files/{name}": {"get": _file_operation()},
        "/runs/{run_id}/cancel": {
            "post": _run_operation(
                "Stop a run now (idempotent)",
                "The container is killed or the upstream call closed; the run ends "
                "`cancelled` with a terminal `error` event (`code: cancelled`). A finished "
                "run is answered as it is.",
                {"200": show, "409": _json(_ref("ErrorEnvelope"), ERRORS["409"])},
            )
        },
    }


def _streaming_post(
    summary: str,
    description: str,
    body: str,
    answer: str,
    frame: str,
    events: dict[str, tuple[str, str]],
    errors: tuple[str, ...],
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "description": description,
            "security": [{"bearerAuth": []}, {"apiKeyHeader": []}, {}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(body)}},
            },
            "responses": {
                "202": {
                    "description": (
                        "`background` was true: the run goes on without a reader. "
                        "`Location: /runs/{id}`."
                    ),
                    "headers": _RUN_HEADER,
                    "content": {"application/json": {"schema": _ref("Accepted")}},
                },
                "200": {
                    "headers": _RUN_HEADER,
                    "description": (
                        "JSON, or a stream when `stream` is true (or, with `stream` "
                        "absent, when Accept asks for text/event-stream). Every answer "
                        "of a started run, errors included, carries `X-Run-ID`."
                    ),
                    "content": {
                        "application/json": {"schema": _ref(answer)},
                        "text/event-stream": {
                            "schema": _ref(frame),
                            "x-sse-events": {
                                name: {"description": text, "schema": _ref(schema)}
                                for name, (schema, text) in events.items()
                            },
                        },
                    },
                },
                **_errors(errors),
            },
        }
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The whole document; built once per process."""
    _, components = msgspec.json.schema_components(_TYPES, ref_template=REF)
    components["Connector"] = components.pop("ConnectorCore")
    components["Connector"].update(title="Connector", additionalProperties=True)
    components["ExecuteRequest"]["properties"]["connector"] = {
        **_ref("Connector"),
        "description": _CONNECTOR_NOTE,
    }
    components["Runtime"]["properties"]["dependencies"] = _DEPENDENCIES
    components["ChatStreamEvent"] = _frame(CHAT_EVENTS)
    components["ExecuteStreamEvent"] = _frame(EXECUTE_EVENTS)
    components["CompletionStreamEvent"] = _COMPLETIONS_FRAME
    components["RunResult"] = {"oneOf": [_ref("ExecutionResult"), _ref("ChatResult")]}
    components["RunStreamEvent"] = _frame(RUN_EVENTS)
    for passed_through in ("CompletionRequest", "CoreMessage"):
        components[passed_through]["additionalProperties"] = True
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streamsvc",
            "version": _version(),
            "description": (
                "Streaming chat completions (Azure OpenAI or any OpenAI-compatible "
                "API; also as OpenAI's own API under /v1) and connectors run in "
                "locked-down Docker containers. Both stream Server-Sent Events when "
                "asked and answer plain JSON otherwise. The playground is at `/`."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": {
            "/health": {
                "get": {
                    "summary": "Health of the service and its components",
                    "responses": {"200": _json(_ref("HealthReport"), "The health report.")},
                }
            },
            **health.openapi_paths(REF),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "The Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/chat": _streaming_post(
                "Chat completion, streamed token by token",
                "Forwards the messages to the configured chat provider's default "
                "deployment (`model` picks another deployment).",
                "ChatRequest",
                "ChatResult",
                "ChatStreamEvent",
                CHAT_EVENTS,
                CHAT_ERRORS,
            ),
            "/execute-connector": _streaming_post(
                "Run a connector in a fresh sandbox, streaming its output",
                "Validates the connector completely before any container exists, "
                "then runs its entry point with the dependencies installed. The "
                "answer's `result` is the whole stdout when it is one JSON document, "
                "otherwise its last line that is a JSON object.",
                "ExecuteRequest",
                "ExecutionResult",
                "ExecuteStreamEvent",
                EXECUTE_EVENTS,
                EXECUTE_ERRORS,
            ),
            "/v1/chat/completions": _completions(),
            **_models(),
            "/playground/examples": {
                "get": {
                    "summary": "The playground's example connectors",
                    "description": (
                        "The seed example, then each connector folder of the source tree's "
                        "`examples/`, as whole `POST /execute-connector` bodies."
                    ),
                    "responses": {"200": _json(_ref("ExampleIndex"), "The example index.")},
                }
            },
            **_runs(),
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI 3.1 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamsvc")
    except PackageNotFoundError:
        return "0"


_encoder = msgspec.json.Encoder()


async def openapi_endpoint(request: Request) -> Response:
    return Response(_encoder.encode(openapi_document()), media_type="application/json")
