"""A fake Azure OpenAI chat-completions server speaking Azure's real wire format.

A raw asyncio HTTP/1.1 server (keep-alive, Content-Length request bodies, chunked SSE
responses) on its own thread and event loop, so sync code, async tests and benchmark
scripts can all point the real, unpatched ``openai`` SDK at it::

    with FakeAzure(api_key="test-key") as fake:
        fake.push(rate_limited(retry_after_ms=50), Reply(text_chunks=["Hi", "!"]))
        client = AsyncAzureOpenAI(azure_endpoint=fake.url, api_key="test-key", ...)

Scripted replies are consumed FIFO, one per authorised chat request; a request refused
with 404 (route, api-version) or 401 (key) is recorded but consumes none. With the queue
empty the reply echoes ``"echo: " + last user message``, word by word.

It also serves OpenAI's route, ``POST /v1/chat/completions`` (``Authorization: Bearer
<api_key>``, no api-version), with OpenAI's wire format: the same replies without Azure's
extras (no prompt-filter chunk, no filter results or annotations). For benchmarks::

    python -m tests.fake_azure --port 9999 --chunks 50 --interval-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, urlsplit

Json: TypeAlias = dict[str, Any]
MODEL = "gpt-4o-2024-11-20"
FINGERPRINT = "fp_b705f0c291"
_ROUTE = re.compile(r"^/openai/deployments/(?P<deployment>[^/]+)/chat/completions/?$")
_OPENAI_ROUTE = re.compile(r"^/v1/chat/completions/?$")
_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


@dataclass
class Reply:
    """One scripted response. ``text_chunks=None`` echoes the request like the default."""

    status: int = 200
    text_chunks: list[str] | None = None  # content deltas (non-streaming: joined)
    finish_reason: str = "stop"
    headers: dict[str, str] = field(default_factory=dict)  # extra/overriding response headers
    error: Json | None = None  # JSON body sent with a non-200 ``status``
    first_byte_delay: float = 0.0  # seconds before the status line
    chunk_delay: float = 0.0  # seconds before each content chunk
    hang_after: int | None = None  # after N content chunks: silence until the client leaves
    drop_after: int | None = None  # after N content chunks: close the socket, no [DONE]
    raw_chunks: list[Json] | None = None  # sent verbatim as the whole stream (then [DONE])
    include_usage: bool | None = None  # None: follow the request's stream_options
    # OpenAI tool calls ({"id", "type", "function": {"name", "arguments"}}) after any text
    # (none: no echo); streamed as OpenAI does, finish_reason "tool_calls" unless set otherwise
    tool_calls: list[Json] | None = None


@dataclass
class Recorded:
    deployment: str  # Azure's path deployment, the body's model on /v1; else ""
    query: dict[str, str]
    headers: dict[str, str]  # names lowercased
    body: Json
    path: str = ""


# ---- Azure's JSON shapes, kept compact so they read like the wire -------------------------------
# fmt: off
NOT_FOUND: Json = {"error": {"code": "404", "message": "Resource not found"}}
INVALID_API_KEY: Json = {"error": {  # OpenAI's 401
    "message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None,
    "code": "invalid_api_key"}}
ACCESS_DENIED: Json = {"error": {"code": "401", "message": (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide"
    " a valid key for an active subscription and use a correct regional API endpoint for your"
    " resource.")}}


def content_filter_error() -> Reply:
    """400: the prompt tripped Azure's content filter (SDK: BadRequestError, .code set)."""
    result = {**_filter_results(), "hate": {"filtered": True, "severity": "high"},
              "jailbreak": {"filtered": False, "detected": False}}
    message = ("The response was filtered due to the prompt triggering Azure OpenAI's content"
               " management policy. Please modify your prompt and retry. To learn more about our"
               " content filtering policies please read our documentation:"
               " https://go.microsoft.com/fwlink/?linkid=2198766")
    return Reply(status=400, error={"error": {
        "message": message, "type": None, "param": "prompt", "code": "content_filter",
        "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation",
                                      "content_filter_result": dict(sorted(result.items()))}}})


def rate_limited(retry_after_ms: int | None = 100, retry_after: int | None = 1) -> Reply:
    """429 with Azure's retry headers; pass None to leave either header out."""
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0"}
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    seconds = retry_after if retry_after is not None else max(1, (retry_after_ms or 0) // 1000)
    message = ("Requests to the ChatCompletions_Create Operation under Azure OpenAI API version"
               " 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing"
               f" tier. Please retry after {seconds} seconds. Please go here:"
               " https://aka.ms/oai/quotaincrease if you would like to further increase the"
               " default rate limit.")
    return Reply(status=429, headers=headers, error={"error": {"code": "429", "message": message}})


def server_error(status: int = 500) -> Reply:
    message = "The server had an error while processing your request. Sorry about that!"
    return Reply(status=status, error={"error": {
        "code": "server_error", "message": message, "param": None, "type": None}})


def unauthorized() -> Reply:
    return Reply(status=401, error=ACCESS_DENIED)


def _filter_results(filtered: bool = False) -> Json:
    results: Json = {c: {"filtered": False, "severity": "safe"} for c in _CATEGORIES}
    if filtered:
        results["hate"] = {"filtered": True, "severity": "medium"}
    return results


def _prompt_filter_results() -> list[Json]:
    return [{"prompt_index": 0, "content_filter_results": _filter_results()}]


def _base(model: str, obj: str) -> Json:
    return {"created": int(time.time()), "id": f"chatcmpl-{uuid.uuid4().hex[:29]}",
            "model": model, "object": obj, "system_fingerprint": FINGERPRINT}


def _chunk(base: Json, delta: Json, results: Json, finish: str | None = None) -> Json:
    return {"choices": [{"content_filter_results": results, "delta": delta,
                         "finish_reason": finish, "index": 0, "logprobs": None}], **base}


def _stream_chunks(
    model: str, chunks: list[str], finish: str, usage: Json | None,
    tool_calls: list[Json] | None = None,
) -> tuple[list[Json], list[Json], list[Json]]:
    """Azure's stream as (prompt filter + role, content and tool-call deltas, finish +
    annotation + usage)."""
    base, filtered = _base(model, "chat.completion.chunk"), finish == "content_filter"
    preamble = [
        {"choices": [], "created": 0, "id": "", "model": "", "object": "",
         "prompt_filter_results": _prompt_filter_results()},
        # a reply that only calls tools has no text: its content is null, as non-streamed
        _chunk(base, {"role": "assistant", "content": None if tool_calls and not chunks else "",
                      "refusal": None}, {}),
    ]
    content = [_chunk(base, {"content": text}, _filter_results()) for text in chunks]
    content += [_chunk(base, delta, {}) for delta in _tool_call_deltas(tool_calls or [])]
    offsets = {"check_offset": 0, "start_offset": 0, "end_offset": len("".join(chunks))}
    tail = [
        _chunk(base, {}, _filter_results(filtered) if filtered else {}, finish),
        # the trailing content-filter annotation: a choice with no "delta" at all
        {"choices": [{"content_filter_offsets": offsets,
                      "content_filter_results": _filter_results(filtered),
                      "finish_reason": None, "index": 0}], **base},
    ]
    if usage is not None:
        tail.append({"choices": [], **base, "usage": usage})
    return preamble, content, tail


def _tool_call_deltas(calls: list[Json]) -> list[Json]:
    """OpenAI's streamed tool calls: id, type and name first, then the arguments in two parts."""
    deltas: list[Json] = []
    for index, call in enumerate(calls):
        function, arguments = call["function"], call["function"]["arguments"]
        head = {"index": index, "id": call["id"], "type": call.get("type", "function"),
                "function": {"name": function["name"], "arguments": ""}}
        deltas.append({"tool_calls": [head]})
        for part in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
    return deltas


def _completion(
    model: str, text: str, finish: str, usage: Json, tool_calls: list[Json] | None = None
) -> Json:
    message: Json = {"annotations": [], "content": text, "refusal": None, "role": "assistant"}
    if tool_calls:
        message |= {"content": text or None, "tool_calls": tool_calls}
    choice = {"content_filter_results": _filter_results(finish == "content_filter"),
              "finish_reason": finish, "index": 0, "logprobs": None, "message": message}
    return {"choices": [choice], **_base(model, "chat.completion"),
            "prompt_filter_results": _prompt_filter_results(), "usage": usage}


def _usage(body: Json, completion: int) -> Json:
    """Deterministic: prompt = words in all messages, completion = content chunks."""
    messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
    prompt = sum(len(_words(m.get("content"))) for m in messages)
    return {"completion_tokens": completion,
            "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                                          "reasoning_tokens": 0, "rejected_prediction_tokens": 0},
            "prompt_tokens": prompt,
            "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
            "total_tokens": prompt + completion}


def _without_filters(event: Json) -> Json:
    """A completion or chunk without Azure's filter results (OpenAI's shape)."""
    choices = [{k: v for k, v in c.items() if not k.startswith("content_filter")}
               for c in event["choices"]]
    return {**{k: v for k, v in event.items() if k != "prompt_filter_results"}, "choices": choices}


def _as_openai(events: list[Json]) -> list[Json]:
    """OpenAI's stream: no prompt-filter chunk, no annotation chunks, no filter results."""
    return [_without_filters(e) for e in events if "prompt_filter_results" not in e
            and all("delta" in c for c in e["choices"])]
# fmt: on


def _finish_reason(reply: Reply) -> str:
    return (
        "tool_calls" if reply.tool_calls and reply.finish_reason == "stop" else reply.finish_reason
    )


def _words(content: Any) -> list[str]:
    """Whitespace words of a message's content (a string or a list of text parts)."""
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "").split()


def _echo_chunks(body: Json, count: int | None = None) -> list[str]:
    """``"echo: <last user message>"`` word by word, cycled to ``count`` chunks if given."""
    users = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    words = ["echo:", *_words(users[-1].get("content") if users else "")]
    count = len(words) if count is None else count
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


def _http_head(status: int, headers: dict[str, str]) -> bytes:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    lines = [f"HTTP/1.1 {status} {phrase}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _sse(event: Json | str) -> bytes:
    """One SSE event framed as one HTTP/1.1 chunk."""
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    payload = f"data: {data}\n\n".encode()
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


class FakeAzure:
    """The server. Public attributes and methods are safe to use from any thread."""

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        ad_token: str | None = None,  # accept "Authorization: Bearer <ad_token>" too
        host: str = "127.0.0.1",
        port: int = 0,  # 0: an ephemeral port, see .url once started
        default_chunks: int | None = None,  # default reply: cycle the echo to N chunks
        default_chunk_delay: float = 0.0,  # default reply: seconds before each chunk
        model: str = MODEL,
    ) -> None:
        self.api_key, self.ad_token, self.model = api_key, ad_token, model
        self.host, self.port = host, port
        self.default_chunks, self.default_chunk_delay = default_chunks, default_chunk_delay
        self.disconnects = 0  # clients that hung up while a response was in progress
        self.open_streams = 0  # SSE responses being sent right now
        self.connections = 0  # TCP connections accepted (keep-alive reuses them)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[Reply] = deque()
        self._requests: list[Recorded] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """The Azure endpoint, e.g. ``http://127.0.0.1:41234`` (pass as azure_endpoint)."""
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Forget queued replies, recorded requests and the disconnect/connection counts."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self.disconnects = self.connections = 0

    def wait_disconnect(self, timeout: float = 5.0, count: int = 1) -> bool:
        """Block until ``disconnects >= count``; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.disconnects >= count, timeout)

    async def await_disconnect(self, count: int = 1, *, within: float = 5.0) -> bool:
        """``wait_disconnect`` for async callers (waits in a worker thread, not on the loop)."""
        return await asyncio.to_thread(self.wait_disconnect, within, count)

    def start(self) -> FakeAzure:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait()
        if self._server is None:
            self.stop()
            raise OSError(f"fake azure could not listen on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        loop, thread, self._thread = self._loop, self._thread, None
        if loop is None or thread is None:
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._server = None

    def __enter__(self) -> FakeAzure:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- everything below runs on the server thread ---------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            serving = asyncio.start_server(self._connection, self.host, self.port)
            self._server = self._loop.run_until_complete(serving)
            self.port = self._server.sockets[0].getsockname()[1]
        except OSError:
            return  # start() reports it
        finally:
            ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self.connections += 1
        graceful = False
        try:
            while await self._exchange(reader, writer):
                pass
            graceful = True
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client vanished mid-request or mid-response
        except asyncio.CancelledError:
            pass  # stop(): ending normally keeps asyncio's stream callback from logging it
        finally:
            self._tasks.discard(task)
            try:
                if graceful:  # flush the last response (or a deliberate drop) before closing
                    writer.close()
                    with contextlib.suppress(ConnectionError, TimeoutError):
                        await asyncio.wait_for(writer.wait_closed(), 1.0)
            finally:
                writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return whether the connection stays open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # an idle keep-alive connection closed by the client
        request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        fields = (line.partition(":") for line in lines)
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        try:
            method, target, _ = request_line.split(" ", 2)
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return False  # not HTTP/1.1 as we know it: hang up
        raw = await reader.readexactly(length)
        keep_alive = headers.get("connection", "").lower() != "close"
        url = urlsplit(target)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        route = _ROUTE.match(url.path)
        openai = _OPENAI_ROUTE.match(url.path) is not None
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        with self._lock:
            recorded = body if isinstance(body, dict) else {"_raw": raw.decode("utf-8", "replace")}
            deployment = route["deployment"] if route else ""
            if openai:
                deployment = str(recorded.get("model", ""))
            self._requests.append(Recorded(deployment, query, headers, recorded, url.path))
            if method != "POST" or not (openai or (route and "api-version" in query)):
                reply = Reply(status=404, error=NOT_FOUND)
            elif openai and headers.get("authorization") != f"Bearer {self.api_key}":
                reply = Reply(status=401, error=INVALID_API_KEY)
            elif not openai and not self._authorised(headers):
                reply = unauthorized()
            elif not isinstance(body, dict):
                error = {"code": "BadRequest", "message": "Request body is not a JSON object."}
                reply = Reply(status=400, error={"error": error})
            elif self._queue:
                reply = self._queue.popleft()
            else:
                reply = Reply(chunk_delay=self.default_chunk_delay)
        respond = self._respond(writer, reply, recorded, keep_alive, openai)
        return await self._guard(reader, respond)

    def _authorised(self, headers: dict[str, str]) -> bool:
        if headers.get("api-key") == self.api_key:
            return True
        bearer = headers.get("authorization", "")
        return self.ad_token is not None and bearer == f"Bearer {self.ad_token}"

    async def _guard(
        self, reader: asyncio.StreamReader, respond: Coroutine[Any, Any, bool]
    ) -> bool:
        """Run ``respond`` while watching the socket: a client hang-up aborts it and counts."""

        async def hang_up() -> None:
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass  # HTTP/1.1 clients send nothing more until the response is complete

        sender, watcher = asyncio.ensure_future(respond), asyncio.ensure_future(hang_up())
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher):
                task.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
        if not sender.cancelled():
            error = sender.exception()
            if error is None:
                return sender.result()
            if not isinstance(error, ConnectionError):
                raise error
        with self._changed:
            self.disconnects += 1
            self._changed.notify_all()
        raise ConnectionAbortedError("client hung up mid-response")

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        reply: Reply,
        body: Json,
        keep_alive: bool,
        openai: bool = False,
    ) -> bool:
        await asyncio.sleep(reply.first_byte_delay)
        stream = body.get("stream") is True
        if reply.status == 200 and not stream:
            if reply.hang_after is not None:
                await asyncio.Future()  # never answer; _guard notices the client leaving
            if reply.drop_after is not None:
                return False  # close without answering
        request_id = str(uuid.uuid4())
        headers = {
            "x-request-id": request_id,
            "apim-request-id": request_id,
            "x-ms-region": "Sweden Central",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-remaining-tokens": "99000",
            "connection": "keep-alive" if keep_alive else "close",
        }
        chunks = reply.text_chunks
        if chunks is None:
            chunks = [] if reply.tool_calls else _echo_chunks(body, self.default_chunks)
        if reply.status != 200 or not stream:
            payload = reply.error or {"error": {"code": str(reply.status), "message": "Error"}}
            if reply.status == 200:
                calls = reply.tool_calls
                usage = _usage(body, len(chunks) + len(_tool_call_deltas(calls or [])))
                finish = _finish_reason(reply)
                payload = _completion(self.model, "".join(chunks), finish, usage, calls)
                if openai:
                    payload = _without_filters(payload)
            data = json.dumps(payload).encode()
            headers |= {"content-type": "application/json", "content-length": str(len(data))}
            writer.write(_http_head(reply.status, headers | reply.headers) + data)
            await writer.drain()
            return keep_alive
        headers |= {"content-type": "text/event-stream; charset=utf-8"}
        headers |= {"transfer-encoding": "chunked", "cache-control": "no-cache"}
        writer.write(_http_head(200, headers | reply.headers))
        with self._lock:
            self.open_streams += 1
        try:
            return await self._stream(writer, reply, body, chunks, openai) and keep_alive
        finally:
            with self._lock:
                self.open_streams -= 1

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        reply: Reply,
        body: Json,
        chunks: list[str],
        openai: bool = False,
    ) -> bool:
        """Send the SSE body; return False if it was dropped on purpose."""
        include_usage = reply.include_usage
        if include_usage is None:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
        calls = reply.tool_calls
        usage = _usage(body, len(chunks) + len(_tool_call_deltas(calls or [])))
        preamble, content, tail = _stream_chunks(
            self.model, chunks, _finish_reason(reply), usage if include_usage else None, calls
        )
        if openai:
            preamble, content, tail = _as_openai(preamble), _as_openai(content), _as_openai(tail)
        if reply.raw_chunks is not None:
            preamble, content, tail = [], reply.raw_chunks, []
        writer.write(b"".join(_sse(event) for event in preamble))
        for sent in range(len(content) + 1):
            if sent == reply.drop_after:
                await writer.drain()
                writer.close()  # flush what was sent, then FIN mid-body: no [DONE]
                return False
            if sent == reply.hang_after:
                await writer.drain()
                await asyncio.Future()  # until the client hangs up (see _guard)
            if sent < len(content):
                await asyncio.sleep(reply.chunk_delay)
                writer.write(_sse(content[sent]))
                await writer.drain()
        writer.write(b"".join(_sse(event) for event in tail) + _sse("[DONE]") + b"0\r\n\r\n")
        await writer.drain()
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Azure OpenAI chat-completions server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999, help="0 picks a free port")
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--chunks", type=int, default=None, help="content chunks per reply")
    parser.add_argument("--interval-ms", type=float, default=0.0, help="pause before each chunk")
    args = parser.parse_args(argv)
    fake = FakeAzure(
        args.api_key,
        host=args.host,
        port=args.port,
        default_chunks=args.chunks,
        default_chunk_delay=args.interval_ms / 1000,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with fake:
        print(f"fake azure openai listening on {fake.url} (api-key {args.api_key!r})", flush=True)
        done.wait()


if __name__ == "__main__":
    main()
