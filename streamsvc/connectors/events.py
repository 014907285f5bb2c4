"""A connector run's sandbox events as the run's SSE events (``status``, output, ``done``).

Shared by the embedded path (``connectors.endpoint``) and the executor (``runs.executor``):
both pump these into the run store. Output is redacted by the run's ``Transcript``; large
chunks and large secret sets are handled in a worker thread (the loop never blocks on them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

import anyio

from streamsvc.connectors.redact import secret_values
from streamsvc.connectors.request import ExecuteRequest
from streamsvc.connectors.transcript import Transcript
from streamsvc.errors import SandboxFailed
from streamsvc.runs.store import FILES_EVENT, RunFile
from streamsvc.sandbox.types import Exited, Output, OutputFile, SandboxEvent, Status
from streamsvc.web import observability, sse

#: Output chunks (and secrets) larger than this are redacted in a worker thread.
REDACT_INLINE_CHARS = 4096


async def transcript_for(body: ExecuteRequest, output_cap: int) -> Transcript:
    """The run's transcript: its secrets' scanner is built off the loop when large."""
    secrets = secret_values(body.env, body.secrets)
    if sum(map(len, secrets)) > REDACT_INLINE_CHARS:  # building the scanner is CPU-bound
        return await anyio.to_thread.run_sync(Transcript, secrets, output_cap)
    return Transcript(secrets, output_cap)


def _stored(item: OutputFile, data: bytes, run_id: str) -> RunFile:
    """The file for the run's store; its listing gets the url and no content."""
    item.url = f"/runs/{run_id}/files/{quote(item.name, safe='/')}"
    item.content_base64 = None
    return RunFile(item.name, item.media_type or "application/octet-stream", data)


async def connector_events(
    runs: AsyncIterator[SandboxEvent], transcript: Transcript, run_id: str
) -> AsyncIterator[sse.Event]:
    """Sandbox events as SSE events, ending with ``done``. The sandbox's first event is
    pulled before anything is yielded, so an engine that is down is a real status. Files
    past the inline cap go to the run's store first (``FILES_EVENT``, never in the log)."""
    try:
        pending = await anext(runs, None)
        if pending is None:
            raise SandboxFailed("the sandbox produced nothing")
        yield sse.Event("status", Status("validated", "the connector is valid"))
        while True:
            event = pending if pending is not None else await anext(runs, None)
            pending = None
            if event is None:
                raise SandboxFailed("the sandbox ended without an exit status")
            if isinstance(event, Output):
                if len(event.text) > REDACT_INLINE_CHARS:  # CPU-bound: off the event loop
                    forwarded = await anyio.to_thread.run_sync(transcript.output, event)
                else:
                    forwarded = transcript.output(event)
                if forwarded is not None:
                    yield sse.Event(forwarded.stream, {"text": forwarded.text})
            elif isinstance(event, Status):
                yield sse.Event("status", event)
            elif isinstance(event, Exited):
                for tail in transcript.flush():
                    yield sse.Event(tail.stream, {"text": tail.text})
                if event.files:  # secrets in the files' contents: CPU-bound
                    await anyio.to_thread.run_sync(transcript.redact_files, event)
                listed = {item.name: item for item in event.files}
                kept = [(listed[d.name], d.data) for d in event.downloads if d.name in listed]
                event.downloads = []
                result = transcript.result(event)  # may mask a secret in a name, in place
                if kept:
                    yield sse.Event(
                        FILES_EVENT, [_stored(item, data, run_id) for item, data in kept]
                    )
                error = result.error.code if result.error is not None else None
                observability.current().execution(result.exit_code, result.ok, error)
                yield sse.Event("done", result)
                return
    finally:
        with anyio.CancelScope(shield=True):
            await runs.aclose()  # type: ignore[attr-defined]
