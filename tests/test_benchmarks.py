"""The benchmarks start as modules and as the old scripts, and their pure helpers compute right.

Each benchmark runs with ``--help`` in a subprocess (the full runs take minutes and are not
tests); percentiles, markdown tables and the docs section writer are checked on known values.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.chat import _pct
from benchmarks.common import markdown_table, percentile, replace_section, write_docs_section
from benchmarks.load import percentiles

ROOT = Path(__file__).resolve().parent.parent

#: module, an option only that benchmark has, a phrase of its method (the --help epilog)
BENCHMARKS = [
    ("chat", "--no-litellm", "sustained"),
    ("execution", "--new-sets", "Targets (issue 5)"),
    ("load", "--executions", "watchdog"),
]
SHIMS = {"chat": "bench-chat", "execution": "bench-exec", "load": "load-test"}


@pytest.mark.parametrize(("module", "option", "method"), BENCHMARKS)
def test_each_benchmark_runs_as_a_module_with_help(module: str, option: str, method: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m benchmarks.{module} ")
    assert option in done.stdout
    assert method in done.stdout
    assert done.stderr == ""


def test_the_run_store_benchmark_runs_as_a_module_with_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.runs", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m benchmarks.runs ")
    assert "--resumes" in done.stdout and "memory://" in done.stdout


@pytest.mark.parametrize(("module", "option", "method"), BENCHMARKS)
def test_the_old_script_runs_the_module_from_any_directory(
    module: str, option: str, method: str, tmp_path: Path
) -> None:
    if not (ROOT / ".venv/bin/python").exists():
        pytest.skip("the scripts run the project's .venv, which this checkout lacks")
    done = subprocess.run(
        [str(ROOT / "scripts" / SHIMS[module]), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m benchmarks.{module} ")
    assert option in done.stdout


def test_an_unknown_option_is_refused_with_usage() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.execution", "--no-such-option"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "usage: python -m benchmarks.execution" in done.stderr
    assert "unrecognized arguments: --no-such-option" in done.stderr


# ---- percentiles ------------------------------------------------------------------------------


def test_percentile_takes_the_value_at_rank_floor_of_fraction_times_count() -> None:
    values = [float(n) for n in range(1, 21)]  # 1..20, shuffled below
    shuffled = values[::2] + values[1::2]
    assert percentile(shuffled, 0.5) == 11.0  # upper middle of an even count
    assert percentile(shuffled, 0.95) == 20.0  # rank 19 of 20: the largest
    assert percentile(shuffled, 0.9) == 19.0
    assert percentile(shuffled, 0.0) == 1.0
    assert percentile(shuffled, 1.0) == 20.0
    assert shuffled == values[::2] + values[1::2]  # the input is not sorted in place


def test_percentile_of_odd_counts_and_of_one_value() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([3.0, 1.0, 2.0], 0.99) == 3.0
    assert percentile([7.5], 0.0) == percentile([7.5], 0.99) == 7.5
    hundred = [float(n) for n in range(100)]
    assert percentile(hundred, 0.99) == 99.0
    assert percentile(hundred, 0.5) == 50.0


@pytest.mark.parametrize("fraction", [-0.01, 1.01])
def test_percentile_refuses_a_fraction_outside_zero_to_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="not within"):
        percentile([1.0, 2.0], fraction)


def test_percentile_of_nothing_is_an_error_and_the_benchmarks_say_none_or_n_a() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
    assert _pct([], 0.99) is None
    assert _pct([0.2, 0.1], 0.5) == 0.2
    assert percentiles([]) == "n/a"


def test_the_load_tests_percentile_line_in_milliseconds() -> None:
    seconds = [n / 1000 for n in range(1, 101)]  # 1..100 ms
    assert percentiles(seconds) == "p50=51 p90=91 p99=100 max=100 ms"


# ---- markdown ---------------------------------------------------------------------------------


def test_markdown_table_aligns_columns_as_asked() -> None:
    lines = markdown_table(["case", "what", "ms"], "llr", [["a", "docker run", "1.5"]])
    assert lines == [
        "| case | what | ms |",
        "| --- | --- | ---: |",
        "| a | docker run | 1.5 |",
    ]
    assert markdown_table(["x"], "r", []) == ["| x |", "| ---: |"]


def test_markdown_table_refuses_rows_and_alignments_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], "l", [])
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], "lc", [])
    with pytest.raises(ValueError, match="row of 1 cells under 2 headers"):
        markdown_table(["a", "b"], "lr", [["only one"]])


DOC = """\
# Benchmarks

## Chat

old chat table

## Execution

old execution table
with two lines

## Later

kept as it is
"""


def test_replace_section_changes_that_section_only() -> None:
    new = replace_section(DOC, "Execution", "new table\n")
    assert new == DOC.replace("old execution table\nwith two lines", "new table")
    assert replace_section(new, "Execution", "new table") == new  # idempotent


def test_replace_section_at_the_end_and_a_missing_one() -> None:
    assert replace_section(DOC, "Later", "\n\nlast\n\n\n").endswith("## Later\n\nlast\n")
    added = replace_section(DOC, "Load (p99)", "figures")
    assert added == DOC + "\n## Load (p99)\n\nfigures\n"
    # the title is text, not a pattern: "Load (p99)" is found again and replaced
    assert replace_section(added, "Load (p99)", "other") == DOC + "\n## Load (p99)\n\nother\n"


def test_write_docs_section_creates_the_file_then_keeps_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "benchmarks.md"
    assert write_docs_section("Chat", "first", path) == path
    assert path.read_text() == "# Benchmarks\n\n## Chat\n\nfirst\n"
    write_docs_section("Execution", "runs", path)
    write_docs_section("Chat", "second", path)
    assert path.read_text() == "# Benchmarks\n\n## Chat\n\nsecond\n\n## Execution\n\nruns\n"


def test_the_execution_table_keeps_the_recorded_layout() -> None:
    from benchmarks.execution import table

    def case(median: float) -> dict[str, float]:
        return {"n": 2, "median_ms": median, "p95_ms": median * 1.5, "warm_hits": 2}

    concurrent = {"runs": 4, "wall_s": 2.0, "runs_per_s": 2.0, "median_ms": 400, "p95_ms": 500}
    results: dict[str, Any] = {
        key: case(ms) for key, ms in [("a", 400), ("b", 300), ("c", 40), ("c2", 80)]
    }
    results |= {"d": case(60), "e": case(1000), "e_pip": case(3000)}
    results |= {"f_off": concurrent, "f_on": concurrent, "leftover_containers": []}
    results["machine"] = {key: key.upper() for key in ("nproc", "cpu", "docker", "kernel")}
    results["machine"] |= {"python": "3", "commit": "abc", "load": "1.0", "load_end": "2.0"}
    lines = table(results, "python -m benchmarks.execution --runs 2").splitlines()
    assert lines[0] == "Command: `python -m benchmarks.execution --runs 2`"
    assert "(c2) 2 of 2, (d) 2 of 2. Containers left by the benchmark's servers: 0." in lines[2]
    assert lines[4:7] == [
        "| case | what | runs | median ms | p95 ms | ratio to (a) | target | met |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
        "| a | `docker run --rm --network none` seed program (CLI) "
        "| 2 | 400.0 | 600.0 | 1.000 |  |  |",
    ]
    assert (
        "| c | the same, warm pool on (pool full before each request) "
        "| 2 | 40.0 | 60.0 | 0.100 | <= 0.15 x a = 60 ms | **yes** |" in lines
    )
    assert (
        "| d | `requests==2.32.3` imported, cache warm, pool on "
        "| 2 | 60.0 | 90.0 | 0.150 | <= 1.3 x c = 52 ms | **no** |" in lines
    )
    assert (
        lines[-1] == "| f | warm pool on (2 ready at start) | 4 | 2.00 | 2.0 | 400 | 500 | 1.00 |"
    )


def test_the_executor_benchmark_runs_as_a_module_with_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.executors", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m benchmarks.executors ")
    assert "--throughput" in done.stdout and "streamsvc executor" in done.stdout
