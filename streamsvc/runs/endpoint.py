"""The /runs routes: list, show, follow (resumable SSE), download files, cancel and delete runs.

With API keys a run is visible only to the key that created it (others get 404); a run's
``events_url`` token opens that run's events and files and nothing else. Reads never touch
the loop's CPU.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any
from urllib.parse import quote

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from streamsvc.errors import (
    EventsExpired,
    RunElsewhere,
    RunFileNotFound,
    RunNotFinished,
    RunNotFound,
    Unauthorized,
    ValidationFailed,
)
from streamsvc.runs.manager import STOP_TIMEOUT, RunManager, encode_frame
from streamsvc.runs.redis import RedisRunStore
from streamsvc.runs.respond import manager_of
from streamsvc.runs.store import FINISHED, RunKind, RunRecord, RunStatus
from streamsvc.web import sse
from streamsvc.web.auth import key_matches, key_owner, offered_key
from streamsvc.web.rendering import json_response
from streamsvc.web.services import Services, services

MAX_LIMIT = 200
#: A file name longer than this is not one the runner listed.
MAX_FILE_NAME = 4096
#: The largest event id a cursor may name (``Last-Event-ID``, ``?after=``): far past any log.
MAX_EVENT_ID = 10**15
_EVENT_ID = re.compile(r"[0-9]{1,16}")
#: A run cancelled before an executor took it (the executor skips it).
QUEUED_CANCEL = {"code": "cancelled", "message": "the run was cancelled"}


class RunView(msgspec.Struct):
    """``GET /runs/{id}``: ``completed`` ended with ``done``, ``failed`` with ``error``."""

    id: str
    kind: RunKind
    status: RunStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    last_event_id: int
    #: The final object (the stream's ``done`` data), or null.
    result: Any
    #: The error object (``{code, message, ...}``), or null.
    error: Any
    #: The run's events (SSE) with a read-only token for this run.
    events_url: str
    #: The process running (or that ran) it, ``host:pid``; null while queued.
    executor: str | None = None


class RunSummary(msgspec.Struct):
    """One run of ``GET /runs`` (no result body)."""

    id: str
    kind: RunKind
    status: RunStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    last_event_id: int
    error: Any
    url: str


class RunList(msgspec.Struct):
    """Newest first; ``next`` is the next page's URL, or null on the last page."""

    runs: list[RunSummary]
    next: str | None


class _Query(msgspec.Struct, forbid_unknown_fields=True):
    kind: RunKind | None = None
    status: RunStatus | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)] = 50
    before: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    token: str | None = None
    after: Annotated[int, msgspec.Meta(ge=0, le=MAX_EVENT_ID)] | None = None


def _query(request: Request) -> _Query:
    try:
        return msgspec.convert(dict(request.query_params), _Query, strict=False)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).rpartition(" - at `$")
        raise ValidationFailed(message or str(exc), path="$.query" + where.rstrip("`")) from None


def _caller(request: Request, found: Services) -> str | None:
    """The owner id of the calling key (None when keys are off); 401 without a valid key."""
    keys = found.settings.server.api_keys
    if not keys:
        return None
    offered = offered_key(request.scope)
    if not key_matches(offered, [hashlib.sha256(k.encode()).digest() for k in keys]):
        raise Unauthorized("a valid API key is required")
    return key_owner(offered)


async def _visible(manager: RunManager, run_id: str, owner: str | None) -> RunRecord:
    record = await manager.store.get(run_id)
    if record is None or record.owner != owner:
        raise RunNotFound(f"no run {run_id}")  # another key's run does not exist for this one
    return record


def _view(manager: RunManager, record: RunRecord) -> RunView:
    url = f"/runs/{record.id}/events?token={manager.token(record.id)}"
    return RunView(
        record.id, record.kind, record.status, record.created_at, record.started_at,
        record.finished_at, record.last_event_id, record.result, record.error, url,
        record.executor,
    )  # fmt: skip


def _summary(r: RunRecord) -> RunSummary:
    return RunSummary(
        r.id, r.kind, r.status, r.created_at, r.started_at, r.finished_at,
        r.last_event_id, r.error, f"/runs/{r.id}",
    )  # fmt: skip


async def list_runs(request: Request) -> Response:
    found = services(request)
    owner = _caller(request, found)
    query = _query(request)
    manager = manager_of(found)
    if query.before is not None:
        cursor = await manager.store.get(query.before)
        if cursor is None or cursor.owner != owner:  # another key's run is no cursor either
            return json_response(RunList([], None))
    records = await manager.store.find(
        owner=owner, kind=query.kind, status=query.status, limit=query.limit, before=query.before
    )
    summaries = [_summary(r) for r in records]
    following = None
    if len(records) == query.limit:
        params = {"kind": query.kind, "status": query.status, "limit": str(query.limit)}
        extra = "".join(f"&{k}={v}" for k, v in params.items() if v is not None)
        following = f"/runs?before={records[-1].id}{extra}"
    return json_response(RunList(summaries, following))


async def show_run(request: Request) -> Response:
    found = services(request)
    manager = manager_of(found)
    record = await _visible(manager, request.path_params["run_id"], _caller(request, found))
    return json_response(_view(manager, record))


async def _opened(request: Request, found: Services, manager: RunManager) -> RunRecord:
    """The run by its read token (``?token=``), else by the caller's key."""
    run_id: str = request.path_params["run_id"]
    token = _query(request).token
    if token is None:
        return await _visible(manager, run_id, _caller(request, found))
    record = await manager.store.get(run_id) if manager.token_valid(run_id, token) else None
    if record is None:
        raise RunNotFound(f"no run {run_id}")
    return record


async def run_events(request: Request) -> Response:
    """SSE: the events after ``Last-Event-ID`` (or ``?after=N``), then live, to the end."""
    found = services(request)
    manager = manager_of(found)
    run_id: str = request.path_params["run_id"]
    query = _query(request)
    record = await _opened(request, found, manager)
    if record.events_expired:
        raise EventsExpired(f"the events of run {run_id} were pruned by retention")
    after = query.after or 0
    header = request.headers.get("last-event-id")
    if header is not None:
        # ASCII digits only (str.isdigit takes "²", which int() refuses), a bounded count.
        match = _EVENT_ID.fullmatch(header.strip())
        if match is None or int(match.group()) > MAX_EVENT_ID:
            raise ValidationFailed("Last-Event-ID must be an event id", path="$.headers")
        after = int(match.group())
    if isinstance(manager.store, RedisRunStore) and manager.running(run_id) is None:
        manager.store.admit_reader()  # each holds a Redis connection while it waits
    server = found.settings.server
    return sse.event_response(
        None,
        manager.reader(run_id, after),
        found.streams,
        keepalive=server.keepalive_seconds,
        headers={"X-Run-ID": run_id},
        send_timeout=server.send_timeout_seconds,
        encode=encode_frame,
    )


def _plain_name(name: str) -> bool:
    """A name as the runner lists them: relative, no ``.``/``..``/empty part, no NUL."""
    parts = name.split("/")
    return (
        0 < len(name) <= MAX_FILE_NAME
        and "\x00" not in name
        and "\\" not in name
        and all(part not in ("", ".", "..") for part in parts)
    )


async def run_file(request: Request) -> Response:
    """``GET /runs/{id}/files/{name}``: an output file past the inline cap, as an attachment.

    Visible as the run is (owner key, or the run's read token); names are looked up as keys
    of the run's store, never as paths. ETag: the sha256 (``If-None-Match`` answers 304).
    """
    found = services(request)
    manager = manager_of(found)
    record = await _opened(request, found, manager)
    name: str = request.path_params["name"]
    stored = await manager.store.get_file(record.id, name) if _plain_name(name) else None
    if stored is None:
        raise RunFileNotFound(f"run {record.id} kept no file {name[:MAX_FILE_NAME]!r}")
    digest = await anyio.to_thread.run_sync(lambda: hashlib.sha256(stored.data).hexdigest())
    etag = f'"{digest}"'
    base = name.rpartition("/")[2]
    headers = {
        "ETag": etag,
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(base, safe='')}",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, no-cache",
    }
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(stored.data, media_type=stored.media_type, headers=headers)


async def cancel_run(request: Request) -> Response:
    """Stop the run now; idempotent (a finished run is answered as it is)."""
    found = services(request)
    manager = manager_of(found)
    run_id: str = request.path_params["run_id"]
    record = await _visible(manager, run_id, _caller(request, found))
    if record.status not in FINISHED:
        if manager.running(run_id) is not None:
            await manager.cancel(run_id)
        elif record.executor is None and found.queue is not None:
            if not await found.queue.withdraw(run_id, QUEUED_CANCEL):  # taken meanwhile,
                latest = await _visible(manager, run_id, record.owner)  # or being withdrawn
                if not await _cancel_elsewhere(manager, latest):
                    await _ended(manager, run_id)
        elif not await _cancel_elsewhere(manager, record):
            raise RunElsewhere(f"run {run_id} is executed by another server process")
        record = await _visible(manager, run_id, record.owner)
    return json_response(_view(manager, record))


async def _cancel_elsewhere(manager: RunManager, record: RunRecord) -> bool:
    """Ask the process running it (through the store), then wait (bounded) for its end."""
    store = manager.store
    if record.executor is None:
        return False
    if not await store.request_cancel(record.id, record.executor):
        return False
    await _ended(manager, record.id)
    return True


async def _ended(manager: RunManager, run_id: str) -> None:
    """Wait (bounded) until the run's end is stored, by whoever ends it."""
    with anyio.move_on_after(STOP_TIMEOUT):
        for _ in range(int(STOP_TIMEOUT / 0.05)):
            ended = await manager.store.get(run_id)
            if ended is None or ended.status in FINISHED:
                break
            await anyio.sleep(0.05)


async def delete_run(request: Request) -> Response:
    found = services(request)
    manager = manager_of(found)
    run_id: str = request.path_params["run_id"]
    record = await _visible(manager, run_id, _caller(request, found))
    if record.status not in FINISHED:
        raise RunNotFinished(f"run {run_id} is {record.status}; cancel it first")
    await manager.store.delete(run_id)
    return Response(status_code=204)
