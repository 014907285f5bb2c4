"""One run loop over a sandbox: start, stream the output, report the end.

``ColdStart`` makes a sandbox for the request, ``WarmStart`` takes a started one; both send
the run over stdin (never in the config). The rule: limits are reported, never silent.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

import anyio
import anyio.lowlevel
from aiodocker.containers import DockerContainer
from aiodocker.stream import Message, Stream
from anyio.abc import TaskGroup

from streamsvc.errors import EngineUnreachable
from streamsvc.sandbox.docker.api import (
    CLEANUP_TIMEOUT,
    ENGINE_ERRORS,
    docker_call,
    kill_container,
)
from streamsvc.sandbox.docker.config import PoolKey, run_env
from streamsvc.sandbox.docker.containers import Containers
from streamsvc.sandbox.docker.warm import WarmMaker, WarmSandbox
from streamsvc.sandbox.docker.warm_protocol import (
    STREAMS,
    EndLines,
    delivery,
    frame,
    new_nonce,
)
from streamsvc.sandbox.runner.runner import PIDS_MARKER
from streamsvc.sandbox.types import Exited, Output, RunSpec, SandboxEvent, Status, Usage
from streamsvc.sandbox.warm_pool import WarmPool
from streamsvc.settings import SandboxSettings

#: Output frames handled between two returns to the event loop.
YIELD_EVERY_FRAMES = 32
#: An end line longer than this is decoded in a worker thread (it carries files' bytes).
DECODE_INLINE_BYTES = 256 * 1024


class Start(Protocol):
    """How a run gets a sandbox, starts its program, and lets the sandbox go."""

    @property
    def nonce(self) -> str | None:
        """Warm runs: the runner's end lines carry this nonce."""
        ...

    async def choose(self) -> str:
        """Prepare what fails before the first event may; what ``starting`` says."""
        ...

    @property
    def warm(self) -> bool:
        """Once chosen: whether a started sandbox takes the run (else one starts now)."""
        ...

    async def ready(self) -> tuple[DockerContainer, Stream]:
        """The sandbox and its attached output stream."""
        ...

    async def launch(self, spec: RunSpec, stream: Stream) -> float:
        """Start the program; when its wall clock starts."""
        ...

    def release(self) -> None:
        """Let the sandbox go (it is removed in the background); called once, always."""
        ...


async def execute(
    start: Start, spec: RunSpec, settings: SandboxSettings, tasks: TaskGroup
) -> AsyncGenerator[SandboxEvent, None]:
    """The run's events: ``starting``, ``running``, its output, then its ``Exited``."""
    run: Run | None = None
    try:
        message = await start.choose()
        yield Status("starting", message, start="warm" if start.warm else "cold")
        container, stream = await start.ready()
        run = Run(container, stream, settings.output_cap_bytes, start.nonce)
        started = await start.launch(spec, stream)
        run.started = started
        run.deadline = started + spec.timeout_ms / 1000
        tasks.start_soon(_watchdog, run)
        yield Status("running", f"running {spec.entry_point}")
        async for output in _pump(run):
            yield output
        yield await _exited(run)
    finally:
        if run is not None:
            run.watchdog.cancel()
        start.release()


async def _deliver(
    stream: Stream, spec: RunSpec, key: PoolKey, nonce: str, *, fresh: bool
) -> float:
    """Write the run to the runner waiting on stdin; the wall clock starts now."""
    message = frame(delivery(spec, run_env(spec, key.deps_volume), nonce, fresh=fresh))
    started = anyio.current_time()
    await docker_call("deliver the run", stream.write_in(message))
    return started


class ColdStart:
    """A sandbox made for this request, no pool: the run goes over stdin as for a warm one.

    The runner restarts in a fresh interpreter with the request's env, so what
    Python reads at start-up applies, while neither the env nor the files are
    ever in the container's config or on the host's disk.
    """

    def __init__(
        self, maker: WarmMaker, containers: Containers, key: PoolKey, spec: RunSpec
    ) -> None:
        self._maker = maker
        self._containers = containers
        self._key = key
        self._spec = spec
        self._warm: WarmSandbox | None = None
        self.nonce = new_nonce()
        self.warm = False

    async def choose(self) -> str:
        return "starting the sandbox"

    async def ready(self) -> tuple[DockerContainer, Stream]:
        self._warm = await self._maker.make(self._key, preload=False, role="run")
        return self._warm.container, self._warm.stream

    async def launch(self, spec: RunSpec, stream: Stream) -> float:
        """Send the run; the runner restarts in a fresh interpreter with its env first."""
        return await _deliver(stream, spec, self._key, self.nonce, fresh=True)

    def release(self) -> None:
        if self._warm is not None:
            self._containers.dispose(self._warm.container, self._warm.stream)


class WarmStart:
    """A started sandbox from the pool (else made now) that gets the run as one delivery."""

    def __init__(
        self,
        maker: WarmMaker,
        pool: WarmPool[PoolKey, WarmSandbox],
        containers: Containers,
        key: PoolKey,
        env: dict[str, str],
        early: WarmSandbox | None,
    ) -> None:
        self._maker = maker
        self._pool = pool
        self._containers = containers
        self._key = key
        self._env = env
        self._warm = early
        self._early = early is not None
        self.nonce = new_nonce()
        self.warm = False

    async def choose(self) -> str:
        key, env = self._key, self._env
        warm = self._warm if self._warm is not None else await self._pool.take(key, refill=False)
        if warm is not None and not warm.fits(env):
            # Its preloaded imports read a variable this request sets: they would
            # have seen another value in a cold run. Stop preloading this set.
            if key.deps_volume is not None:
                self._maker.stop_preloading(key.deps_volume)
            self._containers.dispose(warm.container, warm.stream)
            warm = None
        self._warm = warm
        self.warm = warm is not None
        if warm is None:
            return "starting a sandbox (none was warm)"
        if self._early:  # the sandbox made while the dependencies were installed
            return "using the sandbox started during the install"
        return "using a warm sandbox"

    async def ready(self) -> tuple[DockerContainer, Stream]:
        if self._warm is None:
            self._warm = await self._maker.make(self._key, preload=False)
        return self._warm.container, self._warm.stream

    async def launch(self, spec: RunSpec, stream: Stream) -> float:
        """Send the run to the waiting runner, whose interpreter may have preloaded the set."""
        return await _deliver(stream, spec, self._key, self.nonce, fresh=False)

    def release(self) -> None:
        if self._warm is not None:
            self._containers.dispose(self._warm.container, self._warm.stream)
        self._pool.touch(self._key)  # refilled now that the run no longer needs the CPU


class Run:
    """One started sandbox: its container, its output stream, and why it stopped."""

    def __init__(
        self, container: DockerContainer, stream: Stream, cap: int, nonce: str | None = None
    ) -> None:
        self.container = container
        self.stream = stream
        self.cap = cap
        self.ends = EndLines(nonce) if nonce is not None else None
        self.ended_at: float | None = None
        self.sizes = dict.fromkeys(STREAMS, 0)
        self.started = 0.0
        self.deadline = 0.0
        self.watchdog = anyio.CancelScope()
        self.timed_out = False
        self.capped = False
        self.pids_limited = False
        self.stopped_at: float | None = None
        self._stderr_tail = ""

    async def read(self) -> Message | None:
        """The next chunk of output, or ``None`` at the end (or once stopped)."""
        try:
            message: Message | None = await self.stream.read_out()
        except ENGINE_ERRORS as exc:
            if self.stopped_at is not None:
                return None  # we closed the stream ourselves
            raise EngineUnreachable("lost the connection to the Docker engine") from exc
        return message

    def count(self, stream: int, size: int) -> bool:
        """Count ``size`` bytes of ``stream``; true once it is past the cap.

        The chunk that passes the cap is still passed on (the transcript cuts
        its copy at the cap and flags it), so a stream carries at most one
        chunk (32 KiB) more than the cap.
        """
        self.sizes[stream] += size
        return self.sizes[stream] > self.cap

    def note(self, stream: int, text: str) -> str:
        """Watch stderr for the runner's process-limit line; ``text`` unchanged."""
        if stream == 2 and not self.pids_limited:
            seen = self._stderr_tail + text
            self.pids_limited = PIDS_MARKER.strip() in seen
            self._stderr_tail = seen[-len(PIDS_MARKER) :]
        return text

    async def stop(self) -> None:
        """Close the output stream first (an engine with unread output hangs a kill), then kill."""
        if self.stopped_at is not None:
            return
        self.stopped_at = anyio.current_time()
        with contextlib.suppress(*ENGINE_ERRORS):
            await self.stream.close()
        await kill_container(self.container)


async def _watchdog(run: Run) -> None:
    """Kill the run at its deadline, whatever its consumer is doing."""
    with run.watchdog:
        await anyio.sleep_until(run.deadline)
        run.timed_out = True
        await run.stop()


async def _pump(run: Run) -> AsyncIterator[Output]:
    """The program's output as it comes, until it ends or is stopped."""
    decoders = {number: _decoder() for number in STREAMS}
    frames = 0
    while (message := await run.read()) is not None:
        frames += 1
        if frames % YIELD_EVERY_FRAMES == 0:
            # Frames already buffered are read without suspending: let the loop
            # serve everyone else between batches of tiny writes.
            await anyio.lowlevel.checkpoint()
        if message.stream not in STREAMS:
            continue
        data = message.data if run.ends is None else run.ends.feed(message.stream, message.data)
        passed_cap = run.count(message.stream, len(data))
        text = decoders[message.stream].decode(data)
        if text:
            yield Output(STREAMS[message.stream], run.note(message.stream, text))
        if passed_cap:
            run.capped = True
            await run.stop()
            break
        if run.ends is not None and run.ends.complete:
            run.ended_at = anyio.current_time()
            break
    for number, decoder in decoders.items():
        held = b"" if run.ends is None else run.ends.leftover(number)
        tail = decoder.decode(held, final=True)
        if tail:
            yield Output(STREAMS[number], run.note(number, tail))


async def _exited(run: Run) -> Exited:
    """The run's end: from the runner's end lines (warm), else from Docker."""
    end = None
    if run.ends is not None:  # a line carrying files' bytes is decoded in a worker thread
        large = run.ends.size > DECODE_INLINE_BYTES
        end = await anyio.to_thread.run_sync(run.ends.verdict) if large else run.ends.verdict()
    if end is not None and run.ended_at is not None and not (run.timed_out or run.capped):
        run.watchdog.cancel()
        oom = end.oom_killed
        if oom is None:
            info = await docker_call("inspect the sandbox", run.container.show())
            oom = bool(info.get("State", {}).get("OOMKilled"))
        return Exited(
            exit_code=end.exit_code,
            timed_out=False,
            oom_killed=oom,
            duration_ms=int((run.ended_at - run.started) * 1000),
            pids_limited=run.pids_limited,
            usage=end.usage,
            files=end.files,
            files_omitted=end.files_omitted,
            downloads=end.downloads,
        )
    # Wait for the container to stop (the watchdog bounds that), then read its state.
    limit = max(run.deadline - anyio.current_time(), 0) + CLEANUP_TIMEOUT
    await docker_call("wait for the sandbox", run.container.wait(), limit=limit)
    run.watchdog.cancel()
    duration_ms = int(((run.stopped_at or anyio.current_time()) - run.started) * 1000)
    info = await docker_call("inspect the sandbox", run.container.show())
    state = info.get("State", {})
    killed = run.timed_out or run.capped
    return Exited(
        exit_code=None if killed else state.get("ExitCode"),
        timed_out=run.timed_out,
        oom_killed=bool(state.get("OOMKilled")),
        duration_ms=duration_ms,
        output_capped=run.capped,
        pids_limited=run.pids_limited,
        usage=Usage(cpu_ms=None, memory_peak_mb=None, wall_ms=duration_ms),
    )


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")
