"""Execution benchmark: ``docker run`` against POST /execute-connector, cold and warm.

Run as ``python -m benchmarks.execution``; ``--help`` gives the method (``METHOD``). Every
count and wait is bounded; raw figures go to .bench/exec-last-run.json. One module for
all the cases (a-f), their table and notes, so a run reads top to bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BENCH,
    ROOT,
    load_average,
    machine_facts,
    markdown_table,
    percentile,
    write_docs_section,
)
from tests.harness import free_port

METHOD = """\
Side by side in one run, on loopback only, every count bounded:

a. `docker run --rm --network none IMAGE python3 -c '<seed program>'` through the CLI;
b. POST /execute-connector with the seed example (no dependencies, network `none`),
   on a server with the warm pool off (STREAMSVC_WARM_POOL_SIZE=0);
c. the same on a server with the warm pool on (size 2), each request sent once the pool
   is full again (the latency of a warm run); `c2` sends them back to back instead
   (then some find the pool empty and make their sandbox on the spot);
d. a connector importing `requests==2.32.3` (cache warm, pool on);
e. the first run of a dependency set never seen before (`requests` pinned to a
   different version each iteration; its cached volume, if any, removed first), against
   plain `pip install` of the same set in a fresh container
   (`docker run --rm --network bridge` with the host's CA bundle); the two alternate
   which goes first, so neither always meets a cold index proxy;
f. --concurrency runs at once (default 20), pool on and off: runs per second.

Each server is `python -m streamsvc` from this tree, in an empty directory (no .env),
with the default limits (4 runs at once, 16 queued). Requests are unstreamed
("stream": false) over one keep-alive connection (http.client); a run counts only
when it answers `ok: true` with the seed's result. Medians and p95s are over
--runs runs (default 20) after two warm-up runs; every ratio is to (a).

Targets (issue 5): c <= 0.15 x a; d <= 1.3 x c; e <= 0.5 x plain pip.

    .venv/bin/python -m benchmarks.execution                # ~3 minutes
    .venv/bin/python -m benchmarks.execution --write-docs   # also record docs/benchmarks.md
"""

IMAGE = os.environ.get("STREAMSVC_SANDBOX_IMAGE", "streamsvc-sandbox:latest")
SEED_PROGRAM = "import json\nprint(json.dumps({'ok': True, 'result': {'hello': 'world'}}))"
#: ``requests`` versions for (e): each iteration installs one not used elsewhere here.
NEW_SET_VERSIONS = ["2.31.0", "2.30.0", "2.29.0", "2.28.2", "2.28.1", "2.28.0", "2.27.1"]
REQUEST_TIMEOUT = 180.0
DEADLINE = time.monotonic() + 30 * 60  # the whole run, whatever happens


def seed_body(dependencies: list[dict[str, str]] | None = None, code: str = SEED_PROGRAM) -> Any:
    """The seed's example request: network none, and no dependencies unless given."""
    return {
        "connector": {
            "runtime": {
                "language": "python",
                "entryPoint": "runner_entrypoint.py",
                "timeoutMs": 30000,
                "memoryMb": 256,
                "dependencies": dependencies or [],
            },
            "configuration": {
                "spreadsheetId": "SPREADSHEET_ID",
                "sheetName": "Sheet1",
                "columnIndex": 3,
                "valueToInsert": "Hello",
            },
            "files": {"runner_entrypoint.py": code},
        },
        "env": {"CLIENT_ID": "...", "CLIENT_SECRET": "..."},
        "configuration_overrides": {"valueToInsert": "Value set at execution time"},
        "network_mode": "none",
        "stream": False,
    }


REQUESTS_PROGRAM = (
    "import json, requests\n"
    "result = {'hello': 'world', 'requests': requests.__version__}\n"
    "print(json.dumps({'ok': True, 'result': result}))"
)


# ==== the server ===========================================================================


class Server:
    """``python -m streamsvc`` from this tree on a free loopback port, no ``.env``."""

    def __init__(self, **settings: str) -> None:
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="bench-exec-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMSVC_", "AZURE_"))}
        env |= {
            "STREAMSVC_HOST": "127.0.0.1",
            "STREAMSVC_PORT": str(self.port),
            "STREAMSVC_LOG_LEVEL": "warning",
            "PYTHONPATH": str(ROOT),
            **settings,
        }
        self.log = open(Path(self.dir.name) / "server.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamsvc"],
            cwd=self.dir.name,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{self.log_text()}")
            with contextlib.suppress(OSError):
                if self.get("/health")["components"]["sandbox"]["state"] == "ready":
                    break
            time.sleep(0.1)
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def execute(self, body: Any, conn: http.client.HTTPConnection | None = None) -> float:
        """Seconds for one run; raises unless it answered ``ok`` with the seed's result."""
        conn = conn or self.conn
        data = json.dumps(body).encode()
        started = time.perf_counter()
        try:
            conn.request("POST", "/execute-connector", data, {"content-type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            # The server closed the idle keep-alive connection (a step in between,
            # such as plain pip, outlasted its keep-alive timeout): the request was
            # not sent; send it again on a new connection, timed from now.
            conn.close()
            started = time.perf_counter()
            conn.request("POST", "/execute-connector", data, {"content-type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        elapsed = time.perf_counter() - started
        result = answer.get("result") if isinstance(answer, dict) else None
        if (
            response.status != 200
            or not isinstance(result, dict)
            or not answer.get("ok")
            or result.get("hello") != "world"
        ):
            raise RuntimeError(f"bad answer {response.status}: {str(answer)[:400]}")
        return elapsed

    def pool(self) -> dict[str, Any]:
        warm: dict[str, Any] = self.get("/health")["components"]["sandbox"].get("warm", {})
        return warm

    def wait_pool_full(self, limit: float = 30.0) -> None:
        """Until no fill is in flight and every key in use has its sandboxes ready."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            warm = self.pool()
            if warm["filling"] == 0 and warm["ready"] >= warm["size"] * warm["keys"]:
                return
            time.sleep(0.02)
        raise RuntimeError(f"the warm pool did not fill: {self.pool()}")

    def log_text(self) -> str:
        return (Path(self.dir.name) / "server.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        self.conn.close()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        self.dir.cleanup()


@contextlib.contextmanager
def server(**settings: str) -> Iterator[Server]:
    started = Server(**settings)
    try:
        yield started
    finally:
        started.close()


# ==== measuring ============================================================================


def check_time() -> None:
    if time.monotonic() > DEADLINE:
        raise SystemExit("bench-exec: past its 30-minute bound; stopping")


def sample(
    runs: int,
    once: Callable[[], float],
    before: Callable[[], None] | None = None,
    timed: Callable[[], None] | None = None,
) -> list[float]:
    """``runs`` timings (seconds) of ``once`` after two warm-up calls (then ``timed()``)."""
    for _ in range(2):
        if before:
            before()
        once()
    if timed:
        timed()
    found = []
    for _ in range(runs):
        check_time()
        if before:
            before()
        found.append(once())
    return found


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_ms": statistics.median(values) * 1000,
        "p95_ms": percentile(values, 0.95) * 1000,
    }


def docker_run_once() -> float:
    started = time.perf_counter()
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", IMAGE, "python3", "-c", SEED_PROGRAM],
        capture_output=True,
        text=True,
        timeout=REQUEST_TIMEOUT,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or '"hello": "world"' not in result.stdout:
        raise RuntimeError(f"docker run failed: {result.stderr[-400:]}")
    return elapsed


def ca_bundle() -> str | None:
    for name in ("STREAMSVC_SANDBOX_CA_BUNDLE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return value
    return None


def plain_pip_once(requirement: str) -> float:
    """``pip install`` of one set in a fresh container on the default bridge."""
    command = ["docker", "run", "--rm", "--network", "bridge"]
    ca = ca_bundle()
    if ca:
        command += ["-v", f"{ca}:/ca.pem:ro", "-e", "PIP_CERT=/ca.pem"]
        command += ["-e", "SSL_CERT_FILE=/ca.pem", "-e", "REQUESTS_CA_BUNDLE=/ca.pem"]
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        if os.environ.get(name):
            command += ["-e", f"{name}={os.environ[name]}"]
    command += [IMAGE, "python3", "-m", "pip", "install", "--quiet", "--no-cache-dir"]
    command += ["--disable-pip-version-check", "--target", "/tmp/deps", requirement]
    started = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=REQUEST_TIMEOUT, check=False
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"plain pip failed: {result.stderr[-600:]}")
    return elapsed


def forget_set(requirement: str) -> None:
    """Remove any cached volume holding exactly ``[requirement]`` (so its next run installs)."""
    names = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", "label=streamsvc.deps"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in names:
        found = subprocess.run(
            ["docker", "volume", "inspect", name], capture_output=True, text=True, check=False
        )
        if found.returncode != 0:
            continue
        marks = json.loads(found.stdout)[0].get("Labels") or {}
        if json.loads(marks.get("streamsvc.deps", "[]")) == [requirement]:
            subprocess.run(["docker", "volume", "rm", name], capture_output=True, check=False)


def concurrent(target: Server, count: int, body: Any) -> dict[str, float]:
    """``count`` runs at once, each on its own connection: runs per second and latencies."""
    latencies: list[float] = []
    errors: list[str] = []
    gate = threading.Barrier(count + 1)

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=REQUEST_TIMEOUT)
        try:
            gate.wait()
            latencies.append(target.execute(body, conn))
        except Exception as exc:
            errors.append(str(exc)[:200])
        finally:
            conn.close()

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT)
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} concurrent runs failed: {errors[0]}")
    return {
        "runs": count,
        "wall_s": wall,
        "runs_per_s": count / wall,
        "median_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
    }


def leftovers(port_owner_pids: list[int]) -> list[str]:
    """Containers still labelled with one of the benchmark servers' pids."""
    host = socket.gethostname()
    found = []
    for pid in port_owner_pids:
        found += subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=streamsvc.owner={host}:{pid}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
    return found


# ==== the run ==============================================================================


def new_sets(target: Server, count: int) -> dict[str, Any]:
    """(e): the first run of ``count`` sets never seen before, each against plain pip."""
    print(f"(e) first run of a new set vs plain pip x{count} ...", flush=True)
    ours: list[float] = []
    pips: list[float] = []
    for index, version in enumerate(NEW_SET_VERSIONS[:count]):
        check_time()
        requirement = f"requests=={version}"
        forget_set(requirement)
        body = seed_body([{"name": "requests", "version": version}], REQUESTS_PROGRAM)
        steps: list[tuple[str, Callable[[], float]]] = [
            ("ours", functools.partial(target.execute, body)),
            ("pip", functools.partial(plain_pip_once, requirement)),
        ]
        for name, step in steps if index % 2 == 0 else reversed(steps):
            (ours if name == "ours" else pips).append(step())
        print(f"    {requirement}: ours {ours[-1]:.2f} s, plain pip {pips[-1]:.2f} s")
    return {"e": stats(ours), "e_pip": stats(pips)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_facts(), "runs": args.runs}
    pids: list[int] = []
    seed = seed_body()
    with_requests = seed_body([{"name": "requests", "version": "2.32.3"}], REQUESTS_PROGRAM)

    print(f"(a) docker run x{args.runs} ...", flush=True)
    results["a"] = stats(sample(args.runs, docker_run_once))

    with server(STREAMSVC_WARM_POOL_SIZE="0") as cold:
        pids.append(cold.process.pid)
        print(f"(b) POST /execute-connector, pool off x{args.runs} ...", flush=True)
        results["b"] = stats(sample(args.runs, lambda: cold.execute(seed)))
        print(f"(f) {args.concurrency} concurrent runs, pool off ...", flush=True)
        results["f_off"] = concurrent(cold, args.concurrency, seed)

    with server(STREAMSVC_WARM_POOL_SIZE="2") as warm:
        pids.append(warm.process.pid)
        marks: list[dict[str, Any]] = []

        def mark() -> None:
            marks.append(warm.pool())

        def hits() -> int:
            found: int = warm.pool()["hits"] - marks[-1]["hits"]
            return found

        print(f"(c) POST /execute-connector, pool on x{args.runs} ...", flush=True)
        runs = sample(args.runs, lambda: warm.execute(seed), warm.wait_pool_full, mark)
        results["c"] = {**stats(runs), "warm_hits": hits()}
        print(f"(c2) the same, back to back x{args.runs} ...", flush=True)
        warm.wait_pool_full()
        runs = sample(args.runs, lambda: warm.execute(seed), timed=mark)
        results["c2"] = {**stats(runs), "warm_hits": hits()}

        print(f"(d) requests==2.32.3, cache warm, pool on x{args.runs} ...", flush=True)
        warm.execute(with_requests)  # installs the set if this engine has never seen it
        runs = sample(args.runs, lambda: warm.execute(with_requests), warm.wait_pool_full, mark)
        results["d"] = {**stats(runs), "warm_hits": hits()}

        results |= new_sets(warm, args.new_sets)

        print(f"(f) {args.concurrency} concurrent runs, pool on ...", flush=True)
        warm.wait_pool_full()
        results["f_on"] = concurrent(warm, args.concurrency, seed)

    time.sleep(1)
    results["leftover_containers"] = leftovers(pids)
    results["machine"]["load_end"] = load_average()
    return results


def table(results: dict[str, Any], command: str) -> str:
    a = results["a"]["median_ms"]
    rows = [
        ("a", "`docker run --rm --network none` seed program (CLI)", results["a"], None),
        ("b", "POST /execute-connector seed example, warm pool off", results["b"], None),
        ("c", "the same, warm pool on (pool full before each request)", results["c"], None),
        ("c2", "the same, warm pool on, back to back", results["c2"], None),
        ("d", "`requests==2.32.3` imported, cache warm, pool on", results["d"], None),
        ("e", "first run of a new set (`requests==X`, install + run)", results["e"], None),
        ("e_pip", "plain `pip install requests==X` in a fresh container", results["e_pip"], None),
    ]
    c, d = results["c"]["median_ms"], results["d"]["median_ms"]
    e, pip = results["e"]["median_ms"], results["e_pip"]["median_ms"]
    targets = {
        "c": (f"<= 0.15 x a = {0.15 * a:.0f} ms", c <= 0.15 * a),
        "d": (f"<= 1.3 x c = {1.3 * c:.0f} ms", d <= 1.3 * c),
        "e": (f"<= 0.5 x plain pip = {0.5 * pip:.0f} ms", e <= 0.5 * pip),
    }
    cases = []
    for key, what, row, _ in rows:
        target, met = targets.get(key, ("", None))
        verdict = "" if met is None else ("**yes**" if met else "**no**")
        median, p95, ratio = row["median_ms"], row["p95_ms"], row["median_ms"] / a
        figures = [f"{median:.1f}", f"{p95:.1f}", f"{ratio:.3f}"]
        cases.append([key, what, str(row["n"]), *figures, target, verdict])
    headers = ["case", "what", "runs", "median ms", "p95 ms", "ratio to (a)", "target", "met"]
    lines = markdown_table(headers, "llrrrrll", cases)
    concurrent_rows = []
    for key, what in (("f_off", "warm pool off"), ("f_on", "warm pool on (2 ready at start)")):
        row = results[key]
        median, p95, ratio = row["median_ms"], row["p95_ms"], row["median_ms"] / a
        figures = [f"{row['wall_s']:.2f}", f"{row['runs_per_s']:.1f}"]
        figures += [f"{median:.0f}", f"{p95:.0f}", f"{ratio:.2f}"]
        concurrent_rows.append(["f", what, str(row["runs"]), *figures])
    headers = ["case", "what", "runs at once", "wall s", "runs/s", "median ms", "p95 ms"]
    lines += ["", *markdown_table([*headers, "ratio to (a)"], "llrrrrrr", concurrent_rows)]
    m = results["machine"]
    facts = (
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Docker {m['docker']}, Linux {m['kernel']}, "
        f"Python {m['python']}; streamsvc at {m['commit']}; load average {m['load']} at the "
        f"start and {m['load_end']} at the end (other work shares the machine). "
        f"Served by a warm sandbox: (c) {results['c']['warm_hits']} of {results['c']['n']} runs, "
        f"(c2) {results['c2']['warm_hits']} of {results['c2']['n']}, "
        f"(d) {results['d']['warm_hits']} of {results['d']['n']}. "
        f"Containers left by the benchmark's servers: {len(results['leftover_containers'])}."
    )
    return f"Command: `{command}`\n\n{facts}\n\n" + "\n".join(lines) + "\n"


INTRO = """\
`python -m benchmarks.execution` (or `scripts/bench-exec`): `docker run` of the seed program
against POST /execute-connector, cold and warm, with a cached and a new dependency set, side
by side in one run (`--help` gives the method). A server runs with the warm pool off for (b)
and on (size 2) for the rest; the benchmark's servers leave no container behind.
"""

NOTES = """
Where the time goes (profiled in-process against the same engine): a warm run is one write of
the files and env over the attach stream, a fork of the runner that was waiting in the
started container, the program, and the runner's end lines (exit code and the cgroup's OOM
counter), about 8-12 ms; the rest of (c) is HTTP and JSON. (a) and (b) pay a container start
(110-200 ms for `start` alone here), and (b) also `put_archive` (~50 ms) and Docker noticing the
container stopped (~50 ms). (d) matches (c) because warm sandboxes of a set import it before
the request (a cold `import requests` costs 90-140 ms here). (c2) sends requests faster than
the pool refills (a fill is a container start), so some runs make their sandbox on the spot.
(e) is the install container (create and start on the bridge network, 0.2-0.3 s; `uv` 0.3-0.4 s
of index requests and downloads) with the run's sandbox started meanwhile, then the run itself
(~0.1 s: importing a set nothing has read yet). The set's bytecode (0.1-0.2 s of compiling for
`requests`) is compiled by the install container after it reports the set installed, while the
run goes on; `uv --compile-bytecode` used to do it before. Plain pip pays the same container
start and pip's own 1.3-2 s. Index and network times vary from run to run, and
the machine is shared. (f) is bound by how fast the engine creates, starts and removes
containers: every run uses a new one, warm or not.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.execution",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=METHOD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=20, help="timed runs per case (>= 20)")
    parser.add_argument("--new-sets", type=int, default=5, help="iterations of (e), at most 7")
    parser.add_argument("--concurrency", type=int, default=20, help="runs at once in (f)")
    parser.add_argument("--write-docs", action="store_true", help="record docs/benchmarks.md")
    parser.add_argument(
        "--only", choices=["e"], help="run only this case (pool on), print it, record nothing"
    )
    args = parser.parse_args(argv)
    if args.only and args.write_docs:
        parser.error("--only records nothing; drop --write-docs")
    args.runs = max(1, min(args.runs, 200))
    args.new_sets = max(1, min(args.new_sets, len(NEW_SET_VERSIONS)))
    args.concurrency = max(1, min(args.concurrency, 20))  # the server's queue holds 4 + 16
    if not shutil.which("docker"):
        raise SystemExit("bench-exec: needs the docker CLI and a running engine")
    command = " ".join(["python -m benchmarks.execution", *sys.argv[1:]])
    if args.only == "e":
        with server(STREAMSVC_WARM_POOL_SIZE="2") as warm:
            found = new_sets(warm, args.new_sets)
        e, pip = found["e"], found["e_pip"]
        print(f"\n(e) new set: median {e['median_ms']:.1f} ms, p95 {e['p95_ms']:.1f}")
        print(f"plain pip: median {pip['median_ms']:.1f} ms, p95 {pip['p95_ms']:.1f}")
        print(f"ratio e / plain pip: {e['median_ms'] / pip['median_ms']:.3f} (target <= 0.5)")
        return
    results = run(args)
    BENCH.mkdir(exist_ok=True)
    (BENCH / "exec-last-run.json").write_text(json.dumps(results, indent=2))
    text = table(results, command.strip())
    print()
    print(text)
    if args.write_docs:
        path = write_docs_section("Execution", INTRO + "\n" + text + NOTES)
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
