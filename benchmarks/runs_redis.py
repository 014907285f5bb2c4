"""Redis run-store benchmark: memory:// against two servers sharing one Redis, in one run.

Run as ``python -m benchmarks.runs_redis`` (needs the tests' Redis: scripts/_lib.sh
ensure_redis); ``--help`` gives the method. Rewrites the section "Runs on Redis" of
docs/benchmarks.md (raw figures in .bench/runs-redis-last-run.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
import uuid

import redis

from benchmarks.common import BENCH, machine_facts, markdown_table, percentile, write_docs_section
from benchmarks.runs import BIG, TRIVIAL, first_replayed, post, streamed
from tests.harness import REDIS_URL, ServerProcess, body

METHOD = """\
Three servers from this tree side by side (warm pool of 2, no .env): `memory://`, and
nodes A and B on `STREAMSVC_RUN_STORE=redis://...` (the tests' Redis on loopback, AOF,
one key prefix for both). Requests alternate between `memory`, A with Redis's
`appendfsync always` and A with `everysec` (set by CONFIG SET before each request), over
one keep-alive connection each (http.client):

1. a warm trivial connector run (`print('{"ok": true}')`), unstreamed, one every 0.3 s:
   p50 and p95 of --runs requests per variant (Redis: every event written before the answer);
2. a run printing 20,000 lines, streamed to its `done`: median of --big-runs per variant;
3. resume: `GET /runs/{id}/events` with `Last-Event-ID` half its last event id (output
   comes in chunks of many lines) on a finished 20,000-line run, new connection, time to
   the first replayed event: p50 of --resumes, on memory://, on node A (which ran it) and
   on node B (another node: everything from Redis).
"""


#: variant -> (server, Redis's appendfsync for it)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "memory": ("memory", None),
    "redis, fsync always": ("redis", "always"),
    "redis, fsync everysec": ("redis", "everysec"),
}


def last_event_id(port: int, run_id: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/runs/{run_id}")
    record = json.loads(conn.getresponse().read())
    conn.close()
    assert record["status"] == "completed", record
    return int(record["last_event_id"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runs_redis",
        description=METHOD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--big-runs", type=int, default=3)
    parser.add_argument("--resumes", type=int, default=30)
    parser.add_argument("--no-docs", action="store_true", help="print, do not write the docs")
    args = parser.parse_args(argv)
    prefix = f"streamsvc-bench:{uuid.uuid4().hex[:8]}:"
    shared = {
        "STREAMSVC_WARM_POOL_SIZE": "2",
        "STREAMSVC_RUN_STORE": f"{REDIS_URL}?prefix={prefix}",
    }
    servers = {
        "memory": ServerProcess(
            {"STREAMSVC_WARM_POOL_SIZE": "2", "STREAMSVC_RUN_STORE": "memory://"}
        ),
        "redis": ServerProcess(shared),
    }
    node_b = ServerProcess(shared)
    try:
        conns = {
            n: http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
            for n, s in servers.items()
        }
        for name in servers:  # warm-up: pools filled, first imports done
            for _ in range(3):
                assert post(conns[name], body(TRIVIAL) | {"stream": False})[0] == 200

        def trivial(name: str) -> float:
            time.sleep(0.3)
            started = time.perf_counter()
            status, answer, _ = post(conns[name], body(TRIVIAL) | {"stream": False})
            took = time.perf_counter() - started
            assert status == 200 and json.loads(answer)["ok"] is True, answer[:300]
            return took

        admin = redis.Redis.from_url(REDIS_URL)

        def on(variant: str) -> str:
            """The server of ``variant``, Redis's fsync set for it."""
            name, fsync = VARIANTS[variant]
            if fsync is not None:
                admin.config_set("appendfsync", fsync)
            return name

        warm: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.runs):
            for variant in VARIANTS:
                warm[variant].append(trivial(on(variant)))
        big_ids: dict[str, str] = {}
        bigs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.big_runs):
            for variant in VARIANTS:
                name = on(variant)
                fresh = http.client.HTTPConnection("127.0.0.1", servers[name].port, timeout=120)
                took, big_ids[name] = streamed(fresh, body(BIG, timeout_ms=120_000))
                fresh.close()
                bigs[variant].append(took)
        admin.config_set("appendfsync", "always")  # as ensure_redis configures it
        ports = {
            "memory": (servers["memory"].port, big_ids["memory"]),
            "redis, node A (ran it)": (servers["redis"].port, big_ids["redis"]),
            "redis, node B (another)": (node_b.port, big_ids["redis"]),
        }
        half = {name: last_event_id(port, run_id) // 2 for name, (port, run_id) in ports.items()}
        resumes: dict[str, list[float]] = {name: [] for name in ports}
        for _ in range(args.resumes):
            for name, (port, run_id) in ports.items():
                resumes[name].append(first_replayed(port, run_id, half[name]))
    finally:
        with redis.Redis.from_url(REDIS_URL) as r:
            r.config_set("appendfsync", "always")
        for server in [*servers.values(), node_b]:
            server.close()
        with redis.Redis.from_url(REDIS_URL) as r:
            keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                r.delete(*keys)
    ms = 1000.0
    rows = [
        [
            name,
            f"{percentile(warm[name], 0.5) * ms:.1f}",
            f"{percentile(warm[name], 0.95) * ms:.1f}",
            f"{statistics.median(bigs[name]) * ms:.0f}",
        ]
        for name in VARIANTS
    ]
    resume_rows = [[name, f"{percentile(v, 0.5) * ms:.2f}"] for name, v in resumes.items()]
    added = {v: (percentile(warm[v], 0.5) - percentile(warm["memory"], 0.5)) * ms for v in VARIANTS}
    ratio = {v: statistics.median(bigs[v]) / statistics.median(bigs["memory"]) for v in VARIANTS}
    facts = machine_facts()
    lines = [
        "`python -m benchmarks.runs_redis` (issue 16). " + METHOD.replace("\n", " ").strip(),
        "",
        *markdown_table(
            ["store", "warm trivial p50 ms", "p95 ms", "20,000 lines median ms"], "lrrr", rows
        ),
        "",
        *markdown_table(
            ["resume on", "reconnect to first replayed event p50 ms"], "lr", resume_rows
        ),
        "",
        "Against memory://, on the warm trivial run's p50 and the 20,000-line run: "
        + "; ".join(f"{v}: {added[v]:+.1f} ms, {ratio[v]:.2f}x" for v in VARIANTS if v != "memory")
        + ". No queue hop yet: the run executes on node A itself.",
        "",
        "Where the Redis time goes: a run executed here is followed in memory by readers on "
        "this node; its events are written behind the run by one task (one pipeline per "
        "pass), but its end waits for a transaction that writes the terminal event and the "
        "status together (a round trip, plus a disk fsync under `appendfsync always`). A "
        "reader on another node reads Redis (hiredis parses). The machine is shared: at the "
        "load shown, memory:// itself moves by 10 ms or more between runs minutes apart, so "
        "only differences beyond that mean anything.",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, Python"
        f" {facts['python']}, Docker {facts['docker']}, commit {facts['commit']}, load"
        f" {facts['load']} when it ended.",
    ]
    text = "\n".join(lines)
    BENCH.mkdir(exist_ok=True)
    raw = {"warm": warm, "big": bigs, "resume": resumes, "facts": facts}
    (BENCH / "runs-redis-last-run.json").write_text(json.dumps(raw, indent=1))
    if args.no_docs:
        print(text)
    else:
        print(write_docs_section("Runs on Redis", text), file=sys.stderr)
        print(text)


if __name__ == "__main__":
    main()
