"""The OpenAPI document, the docs page, and a schema-driven fuzz run against a real server.

The document is checked for what a reader relies on (every route documented,
every ``$ref`` resolves, every schema is valid JSON Schema 2020-12), then
held to the truth: real answers of a real server must match it. The fuzz run
(hypothesis, with bodies generated from the document's own request schemas
by ``from_schema`` below, plus arbitrary JSON, mutated bodies and raw bytes)
covers every operation in /openapi.json and asserts no 500 and no status,
content type, body or SSE event outside what the document says. Its server
has no Docker engine (``DOCKER_HOST`` points nowhere), so a valid-looking
connector is answered 503 at once and the fuzz never starts containers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Mount, Route

from streamsvc.settings import load_settings
from streamsvc.web.app import create_app
from tests.fake_azure import FakeAzure
from tests.harness import (
    DOC,
    JSON_TYPE,
    ROOT,
    SCHEMAS,
    ServerProcess,
    asgi_client,
    check_answer,
    inline,
    server_env,
)

KEY = "fuzz-key-0123456789"
STATIC = ROOT / "streamsvc" / "web" / "static"

#: Routes that are pages for people, not API operations.
PAGES = {"/", "/docs"}


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in DOC["paths"].items()
        for method, operation in item.items()
    ]


# ---------------------------------------------------------------- the document


def test_document_covers_every_route_and_its_refs_resolve() -> None:
    app = create_app(load_settings({}, None))
    routes = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route) and route.path not in PAGES
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert routes == {(path, method) for path, method, _ in operations()}
    assert any(isinstance(r, Mount) and r.path == "/static" for r in app.routes)
    assert DOC["openapi"] == "3.1.0"

    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(DOC))
    assert refs and set(refs) <= set(SCHEMAS)
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_document_describes_bodies_streams_and_errors() -> None:
    chat = DOC["paths"]["/chat"]["post"]
    execute = DOC["paths"]["/execute-connector"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatRequest"}
    streamed = chat["responses"]["200"]["content"]["text/event-stream"]
    assert set(streamed["x-sse-events"]) == {"delta", "done", "error"}
    events = execute["responses"]["200"]["content"]["text/event-stream"]["x-sse-events"]
    assert set(events) == {"status", "stdout", "stderr", "done", "error"}
    assert events["done"]["schema"] == {"$ref": "#/components/schemas/ExecutionResult"}
    for operation in (chat, execute):
        errors = {s for s in operation["responses"] if s not in {"200", "202"}}
        assert {"400", "401", "413", "422", "503"} <= errors
        for status in errors:
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}
    # The connector's shape is documented, not just "an object".
    assert "runtime" in SCHEMAS["Connector"]["properties"]
    assert SCHEMAS["Connector"]["additionalProperties"] is True
    assert "entryPoint" in SCHEMAS["Runtime"]["properties"]


async def test_served_document_docs_page_and_no_external_assets(fake_azure: FakeAzure) -> None:
    async with asgi_client(server_env(fake_azure)) as app:
        served = await app.get("/openapi.json")
        assert served.status_code == 200
        assert served.headers["content-type"] == "application/json"
        assert served.json() == json.loads(json.dumps(DOC))

        for path, marker in (("/docs", "/static/docs.js"), ("/", "/static/app.js")):
            page = await app.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert marker in page.text
            assert "default-src 'self'" in page.headers["content-security-policy"]
        for name in ("app.js", "docs.js", "style.css", "seed-example.json"):
            assert (await app.get(f"/static/{name}")).status_code == 200
    # The machine is offline and the pages use no CDN: nothing outside this origin.
    for file in STATIC.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", file.read_text()), file.name


# ---------------------------------------------------------------- real answers match


def test_real_chat_answers_match_the_document(server: ServerProcess, azure: FakeAzure) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}]}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        check_answer("/chat", "post", http.post("/chat", json=body))
        check_answer("/chat", "post", http.post("/chat", json={**body, "stream": True}))
        check_answer("/chat", "post", http.post("/chat", json={"messages": []}))
        check_answer("/chat", "post", http.post("/chat", content=b"{", headers=JSON_TYPE))
        check_answer("/chat", "post", http.post("/chat", content=b"{"))  # 415: not JSON
        check_answer("/health", "get", http.get("/health"))


@pytest.mark.docker
def test_real_runs_match_the_document(server: ServerProcess) -> None:
    seed = json.loads((STATIC / "seed-example.json").read_text())
    noisy = {
        "runtime": {"language": "python", "entryPoint": "m.py"},
        "files": {"m.py": "import sys\nprint('x')\nprint('y', file=sys.stderr)\nsys.exit(2)"},
    }
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for body in (seed, {**seed, "stream": True}, {"connector": noisy, "stream": True}):
            answer = http.post("/execute-connector", json=body)
            check_answer("/execute-connector", "post", answer)
        assert "event: stderr" in answer.text


# ---------------------------------------------------------------- the fuzz run

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under ``schema`` (inlined), for the JSON Schema subset msgspec emits."""
    if not schema:
        return JSON_VALUES
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s) for s in schema.get("anyOf") or schema["oneOf"]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False)
    if kind == "string":
        return st.text(
            min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 30), 30)
        )
    if kind == "array":
        low = schema.get("minItems", 0)
        return st.lists(from_schema(schema.get("items", {})), min_size=low,
                        max_size=max(low, min(schema.get("maxItems", 4), 4)))  # fmt: skip
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        extra = schema.get("additionalProperties", not properties)
        values = from_schema(extra) if isinstance(extra, dict) else JSON_VALUES
        free = st.dictionaries(st.text(max_size=12), values, max_size=3) if extra else st.just({})
        fixed = st.fixed_dictionaries(
            {k: from_schema(v) for k, v in properties.items() if k in required},
            optional={k: from_schema(v) for k, v in properties.items() if k not in required},
        )
        return st.tuples(free, fixed).map(lambda pair: {**pair[0], **pair[1]})
    raise AssertionError(f"no strategy for {schema}")


def body_strategy(schema: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Valid bodies, valid bodies with one field broken, any JSON, and raw bytes."""
    valid = from_schema(inline(schema))

    def broken(value: Any, data: st.DataObject) -> Any:
        if isinstance(value, dict) and value:
            key = data.draw(st.sampled_from(sorted(value)))
            return {**value, key: data.draw(JSON_VALUES)}
        return value

    mutated = st.tuples(valid, st.data()).map(lambda pair: broken(*pair))
    as_json = st.one_of(valid, valid, mutated, JSON_VALUES).map(lambda v: json.dumps(v).encode())
    return st.one_of(as_json, as_json, as_json, st.binary(max_size=64))


AUTHORIZATION = st.sampled_from([f"Bearer {KEY}"] * 6 + ["", "Bearer wrong-key", "Basic x"])
HEADERS = st.fixed_dictionaries(
    {"authorization": AUTHORIZATION},
    optional={"accept": st.sampled_from(["application/json", "text/event-stream", "*/*"])},
).map(lambda headers: {k: v for k, v in headers.items() if v})


def fuzz(http: httpx.Client, path: str, method: str, operation: dict[str, Any], count: int) -> None:
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    bodies = body_strategy(body["schema"]) if body else st.just(b"")

    @settings(max_examples=count, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(content=bodies, headers=HEADERS)
    def one(content: bytes, headers: dict[str, str]) -> None:
        if body:
            headers = {"content-type": "application/json", **headers}
        response = http.request(method.upper(), path, content=content or None, headers=headers)
        check_answer(path, method, response)

    one()


def keeps_connections_usable(http: httpx.Client) -> None:
    """A refusal sent before the body was read closes the connection, and says so.

    The fuzz run found it: after a 401 or 413 that left the body unread the
    server dropped the connection silently, and a keep-alive client's next
    request on it failed with "Server disconnected without sending a response".
    """
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    auth = {"authorization": f"Bearer {KEY}", **JSON_TYPE}
    for refused, headers in ((b"{}" * 100_000, JSON_TYPE), (b"x" * 700_000, auth)):
        for _ in range(5):
            answer = http.post("/chat", content=refused, headers=headers)
            assert answer.status_code in (401, 413)
            assert answer.headers["connection"] == "close"
            assert http.post("/chat", json=chat, headers=auth).status_code == 200


def test_fuzz_every_operation_from_the_served_document(
    start_server: Callable[..., ServerProcess], azure: FakeAzure
) -> None:
    server = start_server(
        STREAMSVC_API_KEYS=KEY,
        DOCKER_HOST="unix:///nonexistent/streamsvc-fuzz.sock",
        STREAMSVC_MAX_BODY_BYTES="65536",
    )
    with httpx.Client(base_url=server.url, timeout=30) as http:
        keeps_connections_usable(http)
        document = http.get("/openapi.json").json()
        assert document == json.loads(json.dumps(DOC))
        tried = []
        for path, item in document["paths"].items():
            for method, operation in item.items():
                fuzz(http, path, method, operation, 250 if "requestBody" in operation else 5)
                tried.append((path, method))
    assert len(tried) == len(operations())
    assert azure.requests, "no fuzzed chat request reached the upstream"
