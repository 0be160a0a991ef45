"""Shared benchmark plumbing: timing, peak memory, the machine's ceilings, JSON and the table.

Every benchmark in bench/ measures the ceilings it compares against (copy bandwidth, matmul rate)
in the same process, so a ratio compares like with like on whatever card runs it.

Two harnesses time the kernels: each bench_*.py script (precise timings, peak memory, JSON rows) and
test_kernels_benchmark.py (pytest-benchmark). Both iterate the same table of ``Impl`` per kernel, kept
in that kernel's script with its shapes, so an implementation is added, renamed or skipped in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

GiB = 1024**3
# Why torch.compile rows are not timed at smoke sizes (--smoke, or pytest bench without CUDA).
SLOW_COMPILE = "inductor compile takes minutes on CPU"


@dataclass(frozen=True)
class Impl:
    """One implementation of a kernel in its script's table, which both harnesses iterate.

    ``row``: the script's row name (None: only test_kernels_benchmark.py times it). ``about``: the pytest
    harness's description of it, in its extra_info (None: only the script times it). ``opts``: the
    kernel's own settings for the call (the script's builder reads them)."""

    row: str | None
    about: str | None = None
    opts: dict = field(default_factory=dict)
    note: str = ""  # added to the script's row note
    needs: str | None = None  # optional package: pytest skips without it; a script's row says it failed
    smoke_skip: str | None = None  # why it is not timed at smoke sizes (in both harnesses)
    cuda_only: str | None = None  # why pytest skips it without CUDA (a script tries; its row says how it failed)


def environment() -> dict:
    """What every result row is labelled with: device, torch, triton, python."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        triton_version = "absent"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3) -> float:
    """Median time of ``fn`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). CPU: wall clock
    around a few calls, for smoke runs only.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(min_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_ms_after_setup(fn: Callable[[], object], setup: Callable[[], object], *, reps: int = 20) -> float:
    """Median time of ``fn`` in ms, ``setup`` run before each call and left out of the timing.

    For calls that destroy their input (in-place kernels): ``setup`` restores it. CUDA: events around
    ``fn`` alone, after ``setup`` and an L2 flush (as do_bench flushes before each call). CPU: wall
    clock, for smoke runs only.
    """
    setup()
    fn()  # warm-up: compilation, autotuning, allocator
    times = []
    if torch.cuda.is_available():
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            setup()
            flush.zero_()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(max(3, reps // 5)):
        setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync()
    del out
    return max(torch.cuda.max_memory_allocated() - base, 0)


def cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU memory allocated by torch while ``fn`` runs, above what was allocated before.

    From the profiler's allocation events (``profile_memory=True``), summed in time order: torch's CPU
    allocator keeps no peak statistic. The profiler slows ``fn`` down: never time the same call.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def backward_step(loss_fn: Callable[[], torch.Tensor], *leaves: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One timed call: the leaves' gradients cleared (accumulating into the last ones, an extra pass, is
    nobody's kernel: do_bench's grad_to_none), then ``loss_fn()`` and its backward; returns the loss."""

    def step() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return step


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), in fp64, ~2^26 elements at a time: no full-size fp64 temporaries
    of a multi-GB gradient."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    rows = max(1, 2**26 // max(a.shape[-1], 1))
    num = den = 0.0
    for i in range(0, a.shape[0], rows):
        x, y = a[i:i + rows].double(), b[i:i + rows].double()
        num += (x - y).pow(2).sum().item()
        den += y.pow(2).sum().item()
    return (num / max(den, 1e-30)) ** 0.5


def copy_bandwidth_gbs(n_bytes: int = 2 * GiB) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))  # the buffers are freed when this returns
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def matmul_ms(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Median time of one [m, k] @ [k, n] product on random data (never zeros)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    return bench_ms(lambda: a @ b)


@dataclass
class Row:
    """One measured implementation. Times in ms, memory in GiB; ratio is to the floor (>= 1 is slower)."""

    name: str
    ms: float
    extra_gib: float | None = None
    gbs: float | None = None
    ratio: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def print_table(title: str, rows: list[Row], env: dict) -> None:
    print(f"\n{title}  [{env['device']}, torch {env['torch']}, triton {env['triton']}]")
    header = f"{'implementation':<44} {'time':>11} {'x floor':>8} {'GB/s':>8} {'extra mem':>10}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = f"{r.ms:9.3f}ms" if r.ms == r.ms else "    failed"
        ratio = f"{r.ratio:7.2f}x" if r.ratio is not None else ""
        gbs = f"{r.gbs:8.0f}" if r.gbs is not None else ""
        mem = f"{r.extra_gib:7.2f}GiB" if r.extra_gib is not None else ""
        print(f"{r.name:<44} {ms:>11} {ratio:>8} {gbs:>8} {mem:>10}  {r.note}")


def write_json(out_dir: str | os.PathLike | None, name: str, payload: dict) -> Path | None:
    if not out_dir:
        return None
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: ([asdict(r) for r in v] if k == "rows" else v) for k, v in payload.items()}
    path.write_text(json.dumps(payload, indent=2))
    return path


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="folder for the JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the default without CUDA)")
    return p


def run_guarded(name: str, fn: Callable[[], Row]) -> Row:
    """Run one peer; a peer that fails (missing package, OOM) becomes a row that says why."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark row must report, not crash the table
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Row(name, float("nan"), note=f"failed: {type(exc).__name__}: {str(exc)[:80]}")
