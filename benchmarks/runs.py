"""Run-store benchmark: the SQLite store against ``memory://``, side by side in one run.

Run as ``python -m benchmarks.runs``; ``--help`` gives the method (``METHOD``). Two servers
from this tree, one per store, answer alternately; the section "Runs" of docs/benchmarks.md
is rewritten with the figures (raw ones in .bench/runs-last-run.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import machine_facts, markdown_table, percentile, publish
from tests.harness import ServerProcess, body

METHOD = """\
Two servers from this tree side by side (`STREAMSVC_RUN_STORE=sqlite:////tmp/.../runs.db`
and `memory://`, warm pool of 2, no .env), every request alternating between them, over
one keep-alive connection each (http.client), on loopback:

1. a warm trivial connector run (`print('{"ok": true}')`), unstreamed, one request every
   0.3 s so the pool is full again: p50 and p95 of --runs requests per store;
2. a run printing 20,000 lines, streamed and read to its `done`: median end-to-end time
   of --big-runs runs per store;
3. resume: `GET /runs/{id}/events` with `Last-Event-ID` half-way through the events of a
   finished 20,000-line run, on a new connection: time from connecting to the first replayed event,
   p50 of --resumes reconnects per store.
"""

TRIVIAL = "print('{\"ok\": true}')"
BIG = """
    import sys
    write = sys.stdout.write
    for i in range(20000):
        write(f"line {i}\\n")
    print('{"ok": true}')
"""


def post(conn: http.client.HTTPConnection, payload: Any) -> tuple[int, bytes, str]:
    conn.request(
        "POST", "/execute-connector", json.dumps(payload), {"content-type": "application/json"}
    )
    response = conn.getresponse()
    return response.status, response.read(), response.getheader("x-run-id") or ""


def timed_trivial(conn: http.client.HTTPConnection, pause: float = 0.3) -> float:
    """Seconds for one warm trivial run, unstreamed, after ``pause`` (the pool refills)."""
    time.sleep(pause)
    started = time.perf_counter()
    status, answer, _ = post(conn, body(TRIVIAL) | {"stream": False})
    took = time.perf_counter() - started
    assert status == 200 and json.loads(answer)["ok"] is True, answer[:300]
    return took


def streamed(conn: http.client.HTTPConnection, payload: Any) -> tuple[float, str]:
    started = time.perf_counter()
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    conn.request("POST", "/execute-connector", json.dumps(payload | {"stream": True}), headers)
    response = conn.getresponse()
    run_id = response.getheader("x-run-id") or ""
    last = b""
    while line := response.readline():
        if line.startswith(b"event: "):
            last = line
    assert last == b"event: done\n", last
    return time.perf_counter() - started, run_id


def last_event_id(port: int, run_id: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/runs/{run_id}")
    found = int(json.loads(conn.getresponse().read())["last_event_id"])
    conn.close()
    return found


def first_replayed(port: int, run_id: str, after: int) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/runs/{run_id}/events", headers={"last-event-id": str(after)})
    response = conn.getresponse()
    while line := response.readline():
        if line.startswith(b"id: "):
            took = time.perf_counter() - started
            assert int(line[4:]) == after + 1, line
            conn.close()
            return took
    raise AssertionError("no event replayed")


def alternate(
    servers: dict[str, ServerProcess], count: int, one: Callable[[str], float]
) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(count):
        for name in servers:
            figures[name].append(one(name))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runs",
        description=METHOD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--big-runs", type=int, default=5)
    parser.add_argument("--resumes", type=int, default=50)
    parser.add_argument("--no-docs", action="store_true", help="print, do not write the docs")
    args = parser.parse_args(argv)
    state = tempfile.TemporaryDirectory(prefix="streamsvc-bench-runs-")
    common = {"STREAMSVC_WARM_POOL_SIZE": "2"}
    servers = {
        "sqlite": ServerProcess(
            common | {"STREAMSVC_RUN_STORE": f"sqlite:///{state.name}/runs.db"}
        ),
        "memory": ServerProcess(common | {"STREAMSVC_RUN_STORE": "memory://"}),
    }
    try:
        conns = {
            n: http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
            for n, s in servers.items()
        }
        for name in servers:  # warm-up: pools filled, first imports done
            for _ in range(3):
                assert post(conns[name], body(TRIVIAL) | {"stream": False})[0] == 200

        warm = alternate(servers, args.runs, lambda name: timed_trivial(conns[name]))
        big_ids: dict[str, str] = {}

        def big(name: str) -> float:
            took, big_ids[name] = streamed(conns[name], body(BIG, timeout_ms=120_000))
            return took

        bigs = alternate(servers, args.big_runs, big)
        halves = {name: last_event_id(servers[name].port, big_ids[name]) // 2 for name in servers}
        resumes = alternate(
            servers,
            args.resumes,
            lambda name: first_replayed(servers[name].port, big_ids[name], halves[name]),
        )
    finally:
        for server in servers.values():
            server.close()
        state.cleanup()
    ms = 1000.0
    rows = [
        [
            name,
            f"{percentile(warm[name], 0.5) * ms:.1f}",
            f"{percentile(warm[name], 0.95) * ms:.1f}",
            f"{statistics.median(bigs[name]) * ms:.0f}",
            f"{percentile(resumes[name], 0.5) * ms:.2f}",
        ]
        for name in servers
    ]
    added = (percentile(warm["sqlite"], 0.5) - percentile(warm["memory"], 0.5)) * ms
    ratio = statistics.median(bigs["sqlite"]) / statistics.median(bigs["memory"])
    facts = machine_facts()
    lines = [
        "`python -m benchmarks.runs` (issue 13).",
        "",
        METHOD.strip(),
        "",
        *markdown_table(
            ["store", "warm trivial p50 ms", "p95 ms", "20,000 lines median ms", "resume p50 ms"],
            "lrrrr",
            rows,
        ),
        "",
        f"SQLite against memory://: {added:+.1f} ms on the warm trivial run's p50 (goal: at most"
        f" +2 ms), {ratio:.2f}x on the 20,000-line run (goal: within 10%).",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, Python"
        f" {facts['python']}, Docker {facts['docker']}, commit {facts['commit']}, load"
        f" {facts['load']} when it ended.",
    ]
    text = "\n".join(lines)
    raw = {"warm": warm, "big": bigs, "resume": resumes, "facts": facts}
    publish("Runs", text, raw, docs=not args.no_docs)


if __name__ == "__main__":
    main()
