"""Executor benchmark (issue 16): the queue hop, Redis's fsync, resume and runs/s, in one run.

Run as ``python -m benchmarks.executors`` (needs the tests' Redis and second engine:
scripts/_lib.sh ensure_redis, ensure_second_engine); ``--help`` gives the method. Rewrites
the section "Executors" of docs/benchmarks.md (raw figures in .bench/executors-last-run.json).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psutil
import redis

from benchmarks.common import (
    busy_cpu_seconds,
    machine_facts,
    markdown_table,
    percentile,
    pids_named,
    process_cpu_seconds,
    publish,
)
from benchmarks.runs import BIG, first_replayed, last_event_id, streamed, timed_trivial
from tests.harness import ENGINE2, REDIS_URL, ExecutorProcess, ServerProcess, body

METHOD = """\
From this tree, side by side in one run (warm pool of 2 everywhere, no .env): a server on
`memory://` that runs its connectors itself ("one process"), and API nodes A and B on
`STREAMSVC_RUN_STORE=redis://...` (the tests' Redis on loopback, AOF) whose connector runs
go through the queue to `streamsvc executor` processes, one per Docker engine.

1. a warm trivial connector run (`print('{"ok": true}')`), unstreamed, one every 0.3 s,
   alternating between one process and node A with Redis's `appendfsync always`, then
   `everysec` (CONFIG SET before each request), one executor: p50 and p95 of --runs each;
2. a run printing 20,000 lines, streamed to its `done` on a new connection: median of
   --big-runs per variant;
3. resume: `GET /runs/{id}/events` with `Last-Event-ID` at half of a finished 20,000-line
   run, on a new connection, time to the first replayed event: p50 of --resumes on one
   process, on node A (which streamed it) and on node B (everything from Redis);
4. throughput: --throughput trivial runs posted by --clients concurrent clients to node A
   with one executor (engine 1), then two (engines 1 and 2): runs per second, the machine's
   busy share, and CPU seconds per run of each part (from /proc: API node, executors,
   Redis, the Docker engines with containerd, this client, and the rest: the sandboxes'
   own processes and the kernel).
"""

#: variant -> (server, Redis's appendfsync for it)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "one process (memory://)": ("embedded", None),
    "node + executor, fsync always": ("queued", "always"),
    "node + executor, fsync everysec": ("queued", "everysec"),
}
#: Hosts the model's table predicts for.
HOSTS = (1, 2, 4, 8, 16)


class Meter:
    """CPU seconds per part over one phase (``with meter.phase(): ...``)."""

    def __init__(self, parts: dict[str, Callable[[], list[int]]]) -> None:
        self.parts = parts
        self.seconds: dict[str, float] = {}
        self.busy = 0.0
        self.wall = 0.0

    def _snapshot(self) -> dict[str, float]:
        found = {name: process_cpu_seconds(pids()) for name, pids in self.parts.items()}
        own = psutil.Process().cpu_times()
        found["benchmark client"] = own.user + own.system
        return found

    @contextmanager
    def phase(self) -> Iterator[None]:
        before, busy, started = self._snapshot(), busy_cpu_seconds(), time.perf_counter()
        yield
        after = self._snapshot()
        self.busy = busy_cpu_seconds() - busy
        self.wall = time.perf_counter() - started
        self.seconds = {name: after[name] - before[name] for name in after}
        self.seconds["the rest (sandboxes, kernel)"] = self.busy - sum(self.seconds.values())


def throughput(port: int, runs: int, clients: int) -> float:
    """Runs per second for ``runs`` trivial runs from ``clients`` concurrent clients."""

    def client(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for _ in range(count):
            timed_trivial(conn, pause=0)
        conn.close()

    share = [runs // clients + (i < runs % clients) for i in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, share))
    return runs / (time.perf_counter() - started)


def drop_keys(prefix: str) -> None:
    with redis.Redis.from_url(REDIS_URL) as r:
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
        r.config_set("appendfsync", "always")  # as ensure_redis configures it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.executors",
        description=METHOD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--big-runs", type=int, default=3)
    parser.add_argument("--resumes", type=int, default=30)
    parser.add_argument("--throughput", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-docs", action="store_true", help="print, do not write the docs")
    args = parser.parse_args(argv)
    prefix = f"streamsvc-bench:{uuid.uuid4().hex[:8]}:"
    store = {"STREAMSVC_RUN_STORE": f"{REDIS_URL}?prefix={prefix}"}
    warm = {"STREAMSVC_WARM_POOL_SIZE": "2"}
    servers = {
        "embedded": ServerProcess(warm | {"STREAMSVC_RUN_STORE": "memory://"}),
        "queued": ServerProcess(store),
    }
    node_b = ServerProcess(store)
    executors = [ExecutorProcess(store | warm)]
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        conns = {
            name: http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            for name, server in servers.items()
        }
        for name in conns:  # warm-up: pools filled, first imports done
            for _ in range(3):
                timed_trivial(conns[name], pause=0.1)

        def on(variant: str) -> str:
            """The server of ``variant``, Redis's fsync set for it."""
            name, fsync = VARIANTS[variant]
            if fsync is not None:
                admin.config_set("appendfsync", fsync)
            return name

        latency: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.runs):
            for variant in VARIANTS:
                latency[variant].append(timed_trivial(conns[on(variant)]))
        big_ids: dict[str, str] = {}
        bigs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.big_runs):
            for variant in VARIANTS:
                name = on(variant)
                fresh = http.client.HTTPConnection("127.0.0.1", servers[name].port, timeout=120)
                took, big_ids[name] = streamed(fresh, body(BIG, timeout_ms=120_000))
                fresh.close()
                bigs[variant].append(took)
        admin.config_set("appendfsync", "always")
        resume_on = {
            "one process (memory://)": (servers["embedded"].port, big_ids["embedded"]),
            "node A (streamed it)": (servers["queued"].port, big_ids["queued"]),
            "node B (another node)": (node_b.port, big_ids["queued"]),
        }
        half = {n: last_event_id(port, run) // 2 for n, (port, run) in resume_on.items()}
        resumes: dict[str, list[float]] = {name: [] for name in resume_on}
        for _ in range(args.resumes):
            for name, (port, run_id) in resume_on.items():
                resumes[name].append(first_replayed(port, run_id, half[name]))

        meter = Meter(
            {
                "API node": lambda: [servers["queued"].process.pid],
                "executors": lambda: [e.process.pid for e in executors],
                "Redis": lambda: pids_named("redis-server"),
                "Docker engines": lambda: pids_named("dockerd", "containerd"),
            }
        )
        rates: dict[str, float] = {}
        cpu: dict[str, dict[str, float]] = {}
        busy: dict[str, float] = {}
        port = servers["queued"].port
        for phase in ("1 executor", "2 executors"):
            if phase == "2 executors":
                executors.append(ExecutorProcess(store | warm | {"DOCKER_HOST": ENGINE2}))
                for _ in range(4):
                    timed_trivial(http.client.HTTPConnection("127.0.0.1", port), pause=0.1)
            with meter.phase():
                rates[phase] = throughput(port, args.throughput, args.clients)
            cpu[phase] = {k: v / args.throughput for k, v in meter.seconds.items()}
            busy[phase] = meter.busy / (meter.wall * (os.cpu_count() or 1))
    finally:
        for executor in executors:
            executor.close()
        for server in [*servers.values(), node_b]:
            server.close()
        admin.close()
        drop_keys(prefix)
    text = report(latency, bigs, resumes, rates, cpu, busy)
    raw: dict[str, Any] = {
        "latency": latency, "big": bigs, "resume": resumes, "rates": rates, "cpu": cpu,
        "busy": busy,
    }  # fmt: skip
    publish("Executors", text, raw, docs=not args.no_docs)


def report(
    latency: dict[str, list[float]],
    bigs: dict[str, list[float]],
    resumes: dict[str, list[float]],
    rates: dict[str, float],
    cpu: dict[str, dict[str, float]],
    busy: dict[str, float],
) -> str:
    """The section's markdown: the tables, the model's prediction and the machine."""
    ms = 1000.0
    base = "one process (memory://)"
    rows = [
        [
            v,
            f"{percentile(latency[v], 0.5) * ms:.1f}",
            f"{percentile(latency[v], 0.95) * ms:.1f}",
            f"{statistics.median(bigs[v]) * ms:.0f}",
        ]
        for v in VARIANTS
    ]
    added = {
        v: (percentile(latency[v], 0.5) - percentile(latency[base], 0.5)) * ms for v in VARIANTS
    }
    resume_rows = [[n, f"{percentile(v, 0.5) * ms:.2f}"] for n, v in resumes.items()]
    phases = list(rates)
    parts = list(cpu[phases[-1]])
    cpu_rows = [[p, *(f"{cpu[ph][p] * ms:.1f}" for ph in phases)] for p in parts]
    cpu_rows.append(["all (machine busy)", *(f"{sum(cpu[ph].values()) * ms:.1f}" for ph in phases)])
    rate_rows = [[ph, f"{rates[ph]:.1f}", f"{busy[ph]:.0%}"] for ph in phases]
    # The model: an execution host (one executor, one engine: the first phase) pays the
    # executor, its engine and the sandboxes; API nodes and Redis scale apart (Redis: a core).
    last = cpu[phases[0]]
    host = last["executors"] + last["Docker engines"] + last["the rest (sandboxes, kernel)"]
    cores = os.cpu_count() or 1
    per_host = cores / host
    api_cap = cores / last["API node"] if last["API node"] else float("inf")
    redis_cap = 1 / last["Redis"] if last["Redis"] > 0 else float("inf")
    model_rows = [[str(n), f"{n * per_host:.0f}"] for n in HOSTS]
    first, second = phases[0], phases[-1]
    sandbox = last["the rest (sandboxes, kernel)"] / sum(last.values())
    limit = (
        f"With {first} the machine was {busy[first]:.0%} busy, so what limits runs/s here is"
        f" CPU, not the engine, Redis or the slots: {sandbox:.0%} of a run's CPU goes to the"
        " sandboxes' own processes and the kernel (a new warm container per run: runc, the"
        " runner's start and preload) and most of the rest to the Docker engines. A second"
        " executor on the same CPUs brings a second engine but no CPU"
        f" ({sum(cpu[first].values()) * ms:.0f} against {sum(cpu[second].values()) * ms:.0f}"
        f" CPU ms per run, {rates[first]:.1f} against {rates[second]:.1f} runs/s): on one"
        " machine, one executor is enough; executors pay off with hosts."
        if busy[first] >= 0.9
        else f"With {first} the machine was only {busy[first]:.0%} busy: the limit here is"
        " the executor's slots or its engine, not CPU; a second executor adds both."
    )
    facts = machine_facts()
    lines = [
        "`python -m benchmarks.executors` (issue 16).",
        "",
        METHOD.strip(),
        "",
        *markdown_table(
            ["path", "warm trivial p50 ms", "p95 ms", "20,000 lines median ms"], "lrrr", rows
        ),
        "",
        "The queue hop against one process, on the warm trivial run's p50: "
        + "; ".join(f"{v}: {added[v]:+.1f} ms" for v in VARIANTS if v != base)
        + " (goal: at most +5 ms).",
        "",
        *markdown_table(
            ["resume on", "reconnect to first replayed event p50 ms"], "lr", resume_rows
        ),
        "",
        *markdown_table(["executors", "runs/s", "machine busy"], "lrr", rate_rows),
        "",
        *markdown_table(["CPU ms per run", *phases], "l" + "r" * len(phases), cpu_rows),
        "",
        limit,
        "",
        f"Model for N execution hosts like this one ({cores} CPUs each, API nodes and Redis"
        f" elsewhere): a host's runs cost {host * ms:.0f} CPU ms each (executor, engine,"
        f" sandbox), so a CPU-bound host does about {per_host:.0f} runs/s and N hosts N times"
        f" that, until an API node ({last['API node'] * ms:.1f} CPU ms per run: about"
        f" {api_cap:.0f} runs/s per {cores}-CPU node, add nodes) or Redis"
        f" ({last['Redis'] * ms:.2f} CPU ms per run on its one core: about {redis_cap:.0f}"
        " runs/s) saturates.",
        "",
        *markdown_table(["hosts", "predicted runs/s (hosts' CPUs)"], "lr", model_rows),
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, Python"
        f" {facts['python']}, Docker {facts['docker']}, commit {facts['commit']}, load"
        f" {facts['load']} when it ended.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
