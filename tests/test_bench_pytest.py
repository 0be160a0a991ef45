"""`pytest bench --benchmark-only` (bench/test_kernels_benchmark.py): the harness runs, lists every kernel
beside the peers that can run here, times each, and refuses to time a wrong kernel.

The run itself is a subprocess on the CPU (tiny shapes through the Triton interpreter), as a user types it;
`make test` never collects bench/ directly (testpaths = ["tests"]).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lgrpo.ops as ops

ROOT = Path(__file__).resolve().parents[1]

# What runs on any CPU (the torch.compile rows need CUDA; liger-kernel and cut-cross-entropy are optional).
SAMPLERS = {"ours", "fixed_point", "cumsum_fp64", "multinomial"}
LISTENER = {"eager"} | ({"ours", "ours_checked"} if ops.HAS_EXTENSION else set())
ON_ANY_CPU = {
    "grpo_loss": {"ours", "ours_inplace", "ours_fwd", "eager"},
    "linear_grpo_loss": {"ours", "ours_overlap", "ours_overlap1", "eager"},
    "group_advantages": {"ours", "eager"},
    "listener_confidence [B,V]": LISTENER,
    "listener_confidence [B,T,V]@pos": LISTENER,
    "sampler [16,V]": SAMPLERS,
    "sampler [64,V]": SAMPLERS,
}


def expected_here() -> set[tuple[str, str]]:
    expected = {(group, impl) for group, impls in ON_ANY_CPU.items() for impl in impls}
    if importlib.util.find_spec("liger_kernel") is not None:  # its kernels run in the interpreter too
        expected |= {("grpo_loss", "liger"), ("linear_grpo_loss", "liger")}
    return expected


def load_bench(name: str):
    """bench/NAME.py as a module of this process, whatever the working directory (Triton interpreted, as
    this folder's conftest set)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TimingReached(Exception):
    pass


class StopAtTiming:
    """A stand-in for pytest-benchmark's fixture: the test stops where the timing would begin."""

    group = None
    stats = None

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, *args, **kwargs):
        raise TimingReached


@pytest.mark.slow
def test_pytest_bench_times_every_kernel_beside_its_peers(tmp_path):
    out = tmp_path / "pytest_benchmark.json"
    # CPU shapes whatever this machine has: the GPU-sized run belongs to bench/gpu_check.sh.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider", "-rs",
         f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    expected = expected_here()
    assert re.search(rf"\b{len(expected)} passed\b", proc.stdout) and " failed" not in proc.stdout, log
    # Whatever did not run says why (a missing package, no CUDA), in pytest's skip summary.
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(re.search(r"\.py:\d+: \S.{10,}", line) for line in skips), skips

    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert {(b["group"], b["params"]["impl"]) for b in benchmarks} == expected
    for b in benchmarks:
        stats, info = b["stats"], b["extra_info"]
        assert stats["rounds"] >= 3 and stats["min"] > 0 and stats["median"] >= stats["min"], b["name"]
        assert info["agreement"] and info["impl"] and info["shape"] and info["device"].startswith("CPU"), b["name"]
        assert info["x_floor"] is None  # no bandwidth floor is measured without CUDA

    # gpu_check.sh prints this table last: one line per benchmark, grouped, from the same JSON.
    table = load_bench("summary").pytest_benchmark_table(out)
    for group, impl in expected:
        assert re.search(rf"^  {re.escape(group)} +{re.escape(impl)} +\d", table, re.M), (group, impl, table)


def test_summary_without_a_pytest_benchmark_json(tmp_path):
    assert "no pytest-benchmark results" in load_bench("summary").pytest_benchmark_table(tmp_path / "missing.json")


def test_a_wrong_grpo_gradient_fails_before_it_is_timed(monkeypatch):
    """A gradient 2% too large (the loss itself right): the agreement check fails the test, nothing is timed."""
    bench = load_bench("test_kernels_benchmark")
    x = bench.grpo_bench.make_inputs(*bench.GRPO_SHAPE, "cpu")
    case = (x, *bench.grpo_truth(x))
    right = bench.grpo_bench.grpo_loss

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return 1.02 * g

    monkeypatch.setattr(bench.grpo_bench, "grpo_loss", lambda logits, *a, **k: right(ScaleGrad.apply(logits), *a, **k))
    with pytest.raises(AssertionError, match="grad differs from the fp64 reference"):
        bench.test_grpo_loss(StopAtTiming(), case, float("nan"), "ours")
    with pytest.raises(TimingReached):  # its forward is still right: that one passes its check and is timed
        bench.test_grpo_loss(StopAtTiming(), case, float("nan"), "ours_fwd")


def test_a_wrong_sampler_fails_before_it_is_timed(monkeypatch):
    """The engine kernel drawing the next id over: its twin check fails the test, nothing is timed."""
    bench = load_bench("test_kernels_benchmark")
    right = bench.sample_tokens

    def next_id(logits, *args):
        ids, empty = right(logits, *args)
        return (ids + 1) % logits.shape[-1], empty

    monkeypatch.setattr(bench, "sample_tokens", next_id)
    with pytest.raises(AssertionError, match="differ from its PyTorch twin"):
        bench.test_sampler(StopAtTiming(), float("nan"), 16, "ours")
