"""The program that starts a connector inside its container (standard library only).

It gets every run (cold or warm) as one delivery on stdin, forks the entry point, supervises it,
then reports its usage and output files. The rule: it imports nothing of streamsvc. Over 400
lines because it is sent as one file. Its specification: docs/architecture.md ("Module notes").
"""

import asyncio
import atexit
import contextlib
import gc
import importlib
import inspect
import io
import json
import os
import re
import runpy
import select
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, NoReturn

WORK = "/work"
DEPS = "/opt/deps"
PIDS_MARKER = "streamsvc: the process limit was reached (a fork or thread creation failed)\n"
READY_MARKER = b"\x1estreamsvc-ready "
END_MARKER = b"\x1estreamsvc-end "
#: ``python3 -c`` program of a warm container: read this file's source from stdin, run it.
BOOTSTRAP = (
    "import sys;_in=sys.stdin.buffer;"
    "exec(compile(_in.read(int(_in.readline())),'/work/.streamsvc/runner.py','exec'))"
)
_PIDS_EVENTS = ("/sys/fs/cgroup/pids/pids.events", "/sys/fs/cgroup/pids.events")
_OOM_COUNTERS = ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events")
_POLL_SECONDS = 0.05
#: Where the program writes the files it returns (``$STREAMSVC_OUTPUT_DIR``).
OUTPUT_DIR = WORK + "/out"
#: Output files listed at most (the rest are only counted), directory levels walked,
#: bytes read and hashed in all, bytes returned inline (base64) in all, and then bytes
#: sent for download in all.
MAX_OUTPUT_FILES = 32
MAX_OUTPUT_DEPTH = 8
MAX_OUTPUT_BYTES = 256 * 1024 * 1024
MAX_INLINE_BYTES = 1024 * 1024
#: Bytes of the files past the inline cap sent out for download (``GET /runs/{id}/files/...``).
MAX_DOWNLOAD_BYTES = 32 * 1024 * 1024
#: Entries looked at, at most, while walking the output directory.
_MAX_OUTPUT_ENTRIES = 10_000
_CPU_USAGE = (
    "/sys/fs/cgroup/cpuacct/cpuacct.usage",
    "/sys/fs/cgroup/cpu,cpuacct/cpuacct.usage",
    "/sys/fs/cgroup/cpu.stat",
)
_MEMORY_PEAK = ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak")


def main() -> int:
    nonce = None
    if os.environ.pop("STREAMSVC_DELIVERY", None) == "restarted":
        nonce = _inherited_nonce()
    else:  # "stdin": wait for the run
        ready = _preload(os.environ.pop("STREAMSVC_PRELOAD", ""))
        os.write(1, READY_MARKER + json.dumps(ready).encode() + b"\n")
        if "refused" in ready:
            return 0  # not clean: the server discards this sandbox
        nonce = _receive()
        if nonce is None:
            return 0  # the server closed stdin without a run: discarded unused
    os.chdir(WORK)
    with contextlib.suppress(FileExistsError):
        os.mkdir(OUTPUT_DIR, 0o755)
    # The runner's own objects never need collecting in the child: freezing them
    # keeps the child's collections (and its exit) off their pages.
    gc.freeze()
    cpu_before, started = _cpu_ns(), time.monotonic()
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)  # a program that stops or kills its group misses the supervisor
        _finish(_run_program())
    code = _supervise(child)
    if nonce is not None:
        end: dict[str, object] = {"exit_code": code, "oom_killed": _oom_killed()}
        _write_line(2, nonce, end)
        end["usage"] = _usage(cpu_before, started)
        found = _output_files()
        end["files"], end["files_omitted"] = found.files, found.omitted
        _write_line(1, nonce, end, found.downloads)
    return code


def _write_line(
    fd: int,
    nonce: str,
    end: dict[str, object],
    downloads: list[tuple[str, bytearray]] | None = None,
) -> None:
    """One end line on ``fd``, written whole (it may be larger than a pipe's buffer); the
    ``downloads`` (``[{name, data}]``, data in base64) are encoded a slice at a time."""
    head = json.dumps(end).encode()
    if downloads:
        head = head[:-1] + b', "downloads": ['
    _write_all(fd, END_MARKER + nonce.encode() + b" " + head)
    if not downloads:
        _write_all(fd, b"\n")
        return
    (base64,) = _stdlib("base64")
    for number, (name, data) in enumerate(downloads):
        comma = b", " if number else b""
        _write_all(fd, comma + b'{"name": ' + json.dumps(name).encode() + b', "data": "')
        view, step = memoryview(data), 3 << 18  # a multiple of 3: no padding inside
        for at in range(0, len(view), step):
            _write_all(fd, base64.b64encode(view[at : at + step]))
        _write_all(fd, b'"}')
    _write_all(fd, b"]}\n")


def _write_all(fd: int, data: bytes) -> None:
    line = memoryview(data)
    while line:
        line = line[os.write(fd, line) :]


# -- what the run used and wrote ----------------------------------------------------


def _read_number(paths: tuple[str, ...], key: str = "") -> int | None:
    """The first readable counter of ``paths``: the file's number, or its ``key`` line's."""
    for path in paths:
        try:
            with open(path, encoding="ascii") as handle:
                if path.endswith(".stat"):
                    for line in handle:
                        name, _, value = line.partition(" ")
                        if name == key:
                            return int(value)
                    continue
                return int(handle.read().strip())
        except (OSError, ValueError):
            continue
    return None


def _cpu_ns() -> int | None:
    """The container's CPU time so far (cgroup v1 ``cpuacct.usage``, v2 ``usage_usec``)."""
    found = _read_number(_CPU_USAGE[:2])
    if found is not None:
        return found
    micro = _read_number(_CPU_USAGE[2:], "usage_usec")
    return None if micro is None else micro * 1000


def _usage(cpu_before: int | None, started: float) -> dict[str, int | None]:
    """CPU time since the program started, the container's memory peak, the wall clock."""
    cpu_after = _cpu_ns()
    cpu_ms = None
    if cpu_before is not None and cpu_after is not None:
        cpu_ms = max(cpu_after - cpu_before, 0) // 1_000_000
    peak = _read_number(_MEMORY_PEAK)
    return {
        "cpu_ms": cpu_ms,
        "memory_peak_mb": None if peak is None else -(-peak // (1024 * 1024)),
        "wall_ms": int((time.monotonic() - started) * 1000),
    }


class _Collected:
    """What the walk of the output directory found so far."""

    def __init__(self) -> None:
        self.files: list[dict[str, object]] = []
        self.omitted = 0
        self.seen = 0
        self.read = 0
        self.inline = 0
        self.download = 0
        #: The files past the inline room kept for download: (name, bytes).
        self.downloads: list[tuple[str, bytearray]] = []


def _output_files() -> _Collected:
    """The files under ``OUTPUT_DIR``, without following a link, and how many were left out.

    Each is ``{name, size, sha256, media_type, content_base64, error}``; anything
    but a regular file (a link, a FIFO, a device, a socket) is listed with an
    ``error`` and never opened. Walked through directory descriptors, so a
    directory swapped for a link meanwhile is refused, not followed.
    """
    found = _Collected()
    try:
        top = os.open(OUTPUT_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return found
    try:
        _walk(top, "", 0, found)
    finally:
        os.close(top)
    return found


def _walk(directory: int, prefix: str, depth: int, found: _Collected) -> None:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    for raw in names:
        found.seen += 1
        if found.seen > _MAX_OUTPUT_ENTRIES:
            found.omitted += 1
            return
        name = prefix + raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        try:
            info = os.stat(raw, dir_fd=directory, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            if depth + 1 >= MAX_OUTPUT_DEPTH:
                found.omitted += 1
                continue
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
            try:
                inner = os.open(raw, flags, dir_fd=directory)
            except OSError:
                continue
            try:
                _walk(inner, name + "/", depth + 1, found)
            finally:
                os.close(inner)
        elif len(found.files) >= MAX_OUTPUT_FILES:
            found.omitted += 1
        else:
            found.files.append(_output_file(directory, raw, name, info, found))


def _output_file(
    directory: int, raw: str, name: str, info: os.stat_result, found: _Collected
) -> dict[str, object]:
    base64, hashlib, mimetypes = _stdlib("base64", "hashlib", "mimetypes")
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    entry: dict[str, object] = {
        "name": name, "size": info.st_size, "sha256": None, "media_type": media,
        "content_base64": None, "error": None,
    }  # fmt: skip
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        entry["size"], entry["media_type"] = 0, None
        entry["error"] = {"code": "not_a_regular_file", "message": f"refused: {kind}"}
        return entry
    if found.read + info.st_size > MAX_OUTPUT_BYTES:
        entry["error"] = {
            "code": "output_too_large",
            "message": f"past the {MAX_OUTPUT_BYTES} bytes read for all output files",
        }
        return entry
    try:
        fd = os.open(raw, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except OSError as exc:
        entry["error"] = {"code": "unreadable", "message": f"cannot open it: {exc.strerror}"}
        return entry
    digest, size, kept = hashlib.sha256(), 0, bytearray()
    room = max(MAX_INLINE_BYTES - found.inline, MAX_DOWNLOAD_BYTES - found.download)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the listing
            entry["error"] = {"code": "not_a_regular_file", "message": "refused: it changed"}
            return entry
        while size <= MAX_OUTPUT_BYTES and (chunk := os.read(fd, 1 << 20)):
            digest.update(chunk)
            size += len(chunk)
            if size <= room:
                kept += chunk
            elif kept:
                kept = bytearray()  # past both caps: only hashed from here
    finally:
        os.close(fd)
    found.read += size
    entry["size"], entry["sha256"] = size, digest.hexdigest()
    if size <= MAX_INLINE_BYTES - found.inline:
        entry["content_base64"] = base64.b64encode(kept).decode("ascii")
        found.inline += size
    elif size <= MAX_DOWNLOAD_BYTES - found.download:
        found.downloads.append((name, kept))
        found.download += size
    else:
        entry["error"] = {
            "code": "too_large_to_download",
            "message": f"past the {MAX_INLINE_BYTES} bytes returned inline and the"
            f" {MAX_DOWNLOAD_BYTES} bytes kept for download for all files",
        }
    return entry


def _stdlib(*names: str) -> list[Any]:
    """Import ``names`` from the standard library only, now that they are needed (hashlib
    alone loads OpenSSL): never a module of the same name in /work or /opt/deps."""
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if p and not p.startswith((WORK, DEPS))]
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path[:] = saved


_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


# -- the warm delivery ----------------------------------------------------------------


def _receive() -> str | None:
    """Wait for one delivery on stdin and unpack it; its nonce (``None`` at end of input)."""
    stdin = sys.stdin.buffer
    header = stdin.readline()
    if not header.strip():
        return None
    delivery = json.loads(stdin.read(int(header)))
    null = os.open(os.devnull, os.O_RDONLY)  # the program's stdin, as in a cold run
    os.dup2(null, 0)
    os.close(null)
    _write_files(delivery["files"])
    os.environ.update(delivery["env"])
    nonce: str = delivery["nonce"]
    if delivery.get("fresh"):
        _restart(nonce)
    time.tzset()  # a TZ from env applies as it would at start-up
    importlib.invalidate_caches()  # /opt/deps may have been filled since start-up
    return nonce


def _restart(nonce: str) -> NoReturn:
    """Run this file again in a new interpreter that starts with the delivered env.

    For a run whose env sets what Python reads only at start-up (``PYTHON*``,
    ``LANG``, ``LC_*``): the env still never is in the container's config.
    The nonce goes over an inherited pipe, never in the environment.
    """
    read, write = os.pipe()
    os.write(write, nonce.encode())
    os.close(write)
    os.set_inheritable(read, True)
    env = {**os.environ, "STREAMSVC_DELIVERY": "restarted", "STREAMSVC_NONCE_FD": str(read)}
    runner = os.path.join(WORK, ".streamsvc", "runner.py")
    os.execve(sys.executable, [sys.executable, runner], env)  # noqa: S606 (no shell wanted)


def _inherited_nonce() -> str:
    """The nonce ``_restart`` left on its pipe."""
    fd = int(os.environ.pop("STREAMSVC_NONCE_FD"))
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read().decode()


def _write_files(files: dict[str, str]) -> None:
    """Write ``files`` under /work as the cold copy leaves them.

    Files 0644, directories 0555 and /work itself 0755 (as the earlier cold
    copy of a read-only bundle left them).
    """
    directories = set()
    for name, text in files.items():
        path = os.path.join(WORK, name)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        while parent != WORK and parent not in directories:
            directories.add(parent)
            parent = os.path.dirname(parent)
        with open(path, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    for directory in sorted(directories, key=len, reverse=True):
        os.chmod(directory, 0o555)  # noqa: S103 (read-only, as the cold copy leaves it)
    os.chmod(WORK, 0o755)  # noqa: S103 (as the cold copy leaves it)


def _preload(names: str) -> dict[str, object]:
    """Import the top-level modules of the distributions ``names`` (comma-separated).

    Only a *clean* import is kept: no exception, nothing written to stdout or
    stderr, no thread or process started (a fork would lose the thread; the
    process would outlive the import), and the environment variables it read
    (through ``os.environ``/``os.getenv``; not C code's own ``getenv``) are
    reported, so the server never uses this sandbox for a request whose env
    sets one of them (``"*"``: it listed them all). Anything else is
    ``{"refused": why}``. What the import allocates counts against the run's
    memory limit, as it would once the program imports it.
    """
    if not names:
        return {}
    modules = _top_level_modules(names.split(","))
    reads: set[str] = set()
    sink = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
    saved = os.dup(1), os.dup(2)
    environ_type = type(os.environ)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.environ.__class__ = _recording(environ_type, reads)
    refused = ""
    try:
        for module in modules:
            importlib.import_module(module)
    except BaseException as exc:  # anything at all: the sandbox is not clean
        refused = f"importing raised {type(exc).__name__}"
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.environ.__class__ = environ_type
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        written = os.fstat(sink).st_size
        for fd in (*saved, sink):
            os.close(fd)
    if not refused and written:
        refused = "importing wrote output"
    if not refused and len(os.listdir("/proc/self/task")) > 1:
        refused = "importing started a thread"
    if not refused and _children():
        refused = "importing started a process"
    if refused:
        return {"refused": refused}
    return {"modules": modules, "env": sorted(reads)}


def _children() -> bool:
    """Whether this process has a child (``/proc/.../children``; unknown: false)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return bool(handle.read().strip())
    except OSError:
        return False


def _recording(base: type, reads: set[str]) -> type:
    """A subclass of ``os.environ``'s class that notes every variable read."""

    class Recording(base):  # type: ignore[misc]
        def __getitem__(self, key: str) -> str:
            reads.add(key)
            value: str = super().__getitem__(key)
            return value

        def __iter__(self) -> Iterator[str]:
            reads.add("*")
            keys: Iterator[str] = super().__iter__()
            return keys

        def copy(self) -> dict[str, str]:
            reads.add("*")
            return dict(super().copy())

    return Recording


def _top_level_modules(names: list[str]) -> list[str]:
    """The importable top-level names the distributions ``names`` installed in /opt/deps."""
    wanted = {_canonical(name) for name in names if name}
    found: set[str] = set()
    for entry in os.listdir(DEPS):
        if not entry.endswith(".dist-info"):
            continue
        if _canonical(entry[: -len(".dist-info")].rsplit("-", 1)[0]) not in wanted:
            continue
        found |= _record_tops(os.path.join(DEPS, entry, "RECORD"))
    return sorted(found)


def _record_tops(record: str) -> set[str]:
    tops: set[str] = set()
    with contextlib.suppress(OSError), open(record, encoding="utf-8") as handle:
        for line in handle:
            path = line.split(",", 1)[0]
            top = path.split("/", 1)[0]
            if "/" not in path:  # a module file: name.py or name.cpython-311-x86_64.so
                top = top.split(".", 1)[0] if top.endswith((".py", ".so")) else ""
            if top.isidentifier() and not top.endswith(("dist-info", "data")):
                tops.add(top)
    return tops


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _oom_killed() -> bool | None:
    """Whether the kernel's OOM killer struck in this container (``None``: cannot tell)."""
    for path in _OOM_COUNTERS:
        try:
            with open(path, encoding="ascii") as handle:
                for line in handle:
                    key, _, count = line.partition(" ")
                    if key == "oom_kill":
                        return int(count) > 0
        except (OSError, ValueError):
            continue
    return None


# -- the connector (the child) ----------------------------------------------------


def _run_program() -> int:
    """Run the connector; its exit status, reporting an uncaught exception as Python does."""
    try:
        _run_connector()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException as exc:
        trimmed = _user_frames(exc.__traceback__)
        sys.excepthook(type(exc), exc.with_traceback(trimmed), trimmed)
        if isinstance(exc, KeyboardInterrupt):  # Python ends by SIGINT then
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _finish(0, signal.SIGINT)
        return 1
    return 0


def _user_frames(traceback: TracebackType | None) -> TracebackType | None:
    """The traceback from the program's first frame on (the runner's and ``runpy``'s
    frames above it dropped); whole when no frame is the program's."""
    found = traceback
    while found is not None:
        name = found.tb_frame.f_code.co_filename
        if name.startswith(WORK + "/") and not name.startswith(WORK + "/.streamsvc/"):
            return found
        found = found.tb_next
    return traceback


def _finish(code: int, by_signal: int = 0) -> NoReturn:
    """End the connector's process the way the interpreter would, without its teardown.

    The interpreter's exit waits for non-daemon threads, runs ``atexit``
    handlers, flushes open files and the standard streams (exit status 120 if
    that fails), then takes every module apart. That last part is slow in a
    process forked from the runner (each object it touches is a copy-on-write
    page fault) and shows nothing, so it is skipped: the
    process ends with ``os._exit``. What is lost is only what a ``__del__``
    would have printed during the teardown.
    """
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    atexit._run_exitfuncs()
    for found in gc.get_objects():  # the program's own objects (the runner's are frozen)
        with contextlib.suppress(Exception):
            if isinstance(found, io.IOBase) and not found.closed and found.writable():
                found.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = 120
    if by_signal:
        os.kill(os.getpid(), by_signal)
    os._exit(code)


def _run_connector() -> None:
    with open(os.environ["STREAMSVC_CONTEXT_FILE"], encoding="utf-8") as handle:
        context = json.load(handle)
    for stream in (sys.stdout, sys.stderr):  # one write per line, even under PYTHONUNBUFFERED
        stream.reconfigure(line_buffering=True, write_through=False)  # type: ignore[union-attr]
    entry = os.path.join(WORK, os.environ["STREAMSVC_ENTRY_POINT"])
    sys.argv = [entry]
    sys.path[0] = os.path.dirname(entry)  # instead of the runner's own directory
    connector_pid = os.getpid()
    namespace = runpy.run_path(entry, run_name="__main__")
    run = namespace.get("run")
    if os.getpid() != connector_pid or not callable(run):
        return  # no run(), or a forked child that fell off the end of the script
    value = run(context)
    if inspect.isawaitable(value):
        value = asyncio.run(_wait(value))
    if not (isinstance(value, dict) and "ok" in value):
        value = {"ok": True, "result": value}
    print(json.dumps(value, default=str), flush=True)


async def _wait(value: object) -> object:
    return await value  # type: ignore[misc]


# -- the supervisor (the parent) ---------------------------------------------------


def _supervise(child: int) -> int:
    """Wait for ``child`` while watching the process limit; its exit code."""
    counter = next((p for p in _PIDS_EVENTS if os.path.exists(p)), None)
    exited = _exit_watch(child)
    reported = False
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if not reported and counter and _limit_hits(counter):
            os.write(2, PIDS_MARKER.encode())
            reported = True
        if pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
        exited(_POLL_SECONDS)


def _exit_watch(child: int) -> Callable[[float], object]:
    """A function that sleeps up to N seconds, waking early when ``child`` exits."""
    try:
        pidfd = os.pidfd_open(child)
    except (AttributeError, OSError):
        return time.sleep
    return lambda seconds: select.select([pidfd], [], [], seconds)


def _limit_hits(path: str) -> int:
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                key, _, count = line.partition(" ")
                if key == "max":
                    return int(count)
    except (OSError, ValueError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
