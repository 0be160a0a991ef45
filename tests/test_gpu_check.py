"""bench/gpu_check.sh's own logic, on CPU: what it builds with, which exit status it gives when the GPU tests
fail, collect nothing or are all skipped, and that its PART subsets together run every benchmark.

The script runs for real (bash, its own control flow) with ``PYTHON`` pointing at a stand-in that records
each call and answers like the real commands (``pytest -m gpu`` with the exit status and summary line a
test chooses); nothing is built and no benchmark runs. Also here: ``pytest -m gpu`` collects
tests/test_data.py without pyarrow (a module-level import used to stop the whole session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
# stand-in for python: record the call, answer like the real command
echo "CALL $* | LGRPO_BUILD_CUDA=${LGRPO_BUILD_CUDA-unset}" >> "$FAKE_CALLS"
if [ "$1" = -m ] && [ "$2" = pytest ] && [[ " $* " == *" -m gpu "* ]]; then
  echo "$FAKE_PYTEST_LINE"
  exit "$FAKE_PYTEST_RC"
fi
if [ "$1" = -c ] && [[ "$2" == *cuda.is_available* ]]; then exit "${FAKE_NO_CUDA:-0}"; fi
if [ "$1" = -c ] && [[ "$2" == *pytest_benchmark* ]]; then exit 0; fi
exit 0
"""


def _run(tmp_path, pytest_rc=0, pytest_line="7 passed in 1.0s", **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PART", "ONLY", "TESTS", "TESTS_K", "BUDGET", "LGRPO_BUILD_CUDA")}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
        env={**clean, "PYTHON": str(fake), "FAKE_CALLS": str(calls), "FAKE_PYTEST_RC": str(pytest_rc),
             "FAKE_PYTEST_LINE": pytest_line, **env})
    return proc, calls.read_text().splitlines()


def _benches_run(calls) -> set[str]:
    def name(call):  # a script, or the train step of another model family (--family F)
        words = call.split()
        stem = Path(words[1]).stem.removeprefix("bench_")
        return f"{stem}_{words[words.index('--family') + 1]}" if "--family" in words else stem

    ran = {name(c) for c in calls if c.split()[1].startswith("bench/bench_")}
    return ran | ({"pytest"} if any("--benchmark-only" in c for c in calls) else set())


def test_builds_with_the_cuda_extension_required_and_passes_when_the_gpu_tests_pass(tmp_path):
    proc, calls = _run(tmp_path, ONLY="sampler", LGRPO_BUILD_CUDA="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    builds = [c for c in calls if " pip install " in f" {c} " and "-e ." in c]
    # LGRPO_BUILD_CUDA=1 even where the caller's environment says otherwise: no silent CPU-only build
    assert len(builds) == 1 and builds[0].endswith("LGRPO_BUILD_CUDA=1"), calls
    assert proc.stdout.strip().splitlines()[-1] == "OK"
    assert _benches_run(calls) == {"sampler"}


@pytest.mark.parametrize("rc, line, says", [
    (1, "1 failed, 6 passed in 2.0s", "GPU tests FAILED (pytest exit status 1"),
    (2, "Interrupted: 1 error during collection", "GPU tests FAILED (pytest exit status 2"),
    (5, "no tests ran in 0.5s", "pytest collected no test"),
    (0, "7 skipped in 0.3s", "every selected test was skipped"),
    (124, "", "timed out"),
])
def test_gpu_tests_that_fail_or_check_nothing_fail_the_script(tmp_path, rc, line, says):
    """Before, pytest's exit status was ignored: a collection error (pyarrow missing) ran no GPU test and
    the script still ended 0 with a table of numbers."""
    proc, calls = _run(tmp_path, pytest_rc=rc, pytest_line=line, ONLY="sampler")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    tail = proc.stdout.strip().splitlines()
    assert tail[-2].startswith("FAILED (1)") and says in tail[-1], tail[-6:]
    assert _benches_run(calls) == {"sampler"}  # the benchmarks still run: the device time is paid for
    assert "FAILED" in (tmp_path / "out" / "summary.txt").read_text()


def test_no_cuda_device_fails_before_anything_runs(tmp_path):
    proc, calls = _run(tmp_path, FAKE_NO_CUDA="1")
    assert proc.returncode == 1 and "torch sees no CUDA device" in proc.stdout
    assert not any("pytest" in c or "pip" in c for c in calls)


def test_the_parts_together_run_every_benchmark_and_every_gpu_test(tmp_path):
    """Each PART fits one device call; together they leave nothing out: every bench/bench_*.py, pytest
    bench, and the GPU tests split by one -k expression and its negation."""
    every = {p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py")} | {"pytest"}
    every |= {"train_step_qwen2_vl", "train_step_qwen3_vl"}  # the other families' full step
    seen, test_selections = [], []
    for part in ("1", "2", "3"):
        proc, calls = _run(tmp_path, PART=part)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == f"OK (part {part})"
        seen.append(_benches_run(calls))
        test_selections += [c.split(" -k ", 1)[1].split(" |")[0] for c in calls if " -m gpu " in c]
    assert set().union(*seen) == every and sum(map(len, seen)) == len(every), seen  # each once
    assert sorted(test_selections) == ["flex", "not flex"]


def test_a_budget_that_leaves_no_time_fails_before_the_build(tmp_path):
    """A step is never started with ``timeout 0`` (which means no limit at all)."""
    proc, calls = _run(tmp_path, PART="1", BUDGET="10")
    assert proc.returncode == 1 and "leaves no time for the build" in proc.stdout
    assert not any("pip install" in c or "pytest" in c for c in calls)


def test_bad_part_is_refused(tmp_path):
    proc, _ = _run(tmp_path, PART="4")
    assert proc.returncode == 2 and "PART must be 1, 2 or 3" in proc.stdout


def test_gpu_collection_does_not_need_pyarrow(tmp_path):
    """``pytest -m gpu tests`` collects every test module; tests/test_data.py imported pyarrow at module
    level, so on a machine without it the collection stopped and no GPU test ran. Now its Parquet tests
    skip and the rest collect."""
    blocked = tmp_path / "blocked" / "pyarrow"
    blocked.mkdir(parents=True)
    # what a missing module raises (importorskip skips on ModuleNotFoundError only)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pyarrow'\", name='pyarrow')\n")
    path = os.pathsep.join(filter(None, [str(blocked.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/test_data.py", "-k", "rapidata"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 skipped" in proc.stdout and "pyarrow" in proc.stdout, proc.stdout[-3000:]
