"""listener_confidence: lgrpo._C against torch eager and torch.compile (issue 4, SPEC §4 anchors).

Two cases, K = 2 candidates, bf16 logits, V = 152064 (Qwen2.5-VL):
  [B, V]        B = 256 rows, every logit read once (77.9 MB): a bandwidth test.
  [B, T, V]@pos B = 16, T = 1536 (7.5 GB of logits), one row per sequence at `positions`
                (4.9 MB read): a latency test; the op is one launch.

Three timings per implementation, in µs per call:
  time   triton do_bench median (CUDA events around each call, L2 flushed before it): the GPU
         time of one call from cold caches, the method of the SPEC §4 anchors.
  graph  100 calls captured in one CUDA graph, each on different data (4 rotating [B, V] buffers,
         100 different position sets), replayed and timed with events: back-to-back GPU time
         per call, no CPU launch cost, hardly any L2 reuse.
  loop   the same 100 calls from a Python loop, timed with events: what an eager caller sees,
         CPU launch overhead included when it exceeds the GPU time.
GB/s = bytes the op must read / time; "x floor" = time / (bytes / copy bandwidth of this run).
``ours`` is timed with check_indices=False (one asynchronous launch); ``ours, checked`` is the
default call, whose index check adds a device-to-host copy and a sync (loop timing only: a graph
cannot sync). The note of ``ours`` gives the launcher's row split (lgrpo.ops.listener_launch_plan);
``ours, <= N block(s)/row`` rows time the splits it did not choose (LGRPO_LISTENER_MAX_CHUNKS=N).

    python bench/bench_listener.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.common` from any working directory

import lgrpo.ops as ops  # noqa: E402
from bench.common import (  # noqa: E402
    SLOW_COMPILE,
    Impl,
    Row,
    arg_parser,
    bench_ms,
    copy_bandwidth_gbs,
    environment,
    print_table,
    run_guarded,
    write_json,
)

QWEN_V = 152064
CANDIDATES = (16, 17)  # the ids of "1" and "2" in Qwen2.5's vocabulary
N_CALLS = 100


def torch_eager(logits, positions, candidate_ids, temperature: float = 1.0):
    """What a trainer writes without the op: index the rows, log_softmax, gather, softmax."""
    if positions is None:
        rows = logits
    else:
        rows = logits[torch.arange(logits.shape[0], device=logits.device), positions]
    z = rows.float() / temperature
    ids = candidate_ids.expand(z.shape[0], -1) if candidate_ids.dim() == 1 else candidate_ids
    cand = z.gather(-1, ids)
    return cand.softmax(-1), z.log_softmax(-1).gather(-1, ids)


def ours(logits, positions, candidate_ids, temperature: float = 1.0):
    return ops.listener_confidence(logits, positions, candidate_ids, temperature, check_indices=False)


def ours_checked(logits, positions, candidate_ids, temperature: float = 1.0):
    return ops.listener_confidence(logits, positions, candidate_ids, temperature)


# The implementations both harnesses time (main() below and test_kernels_benchmark.py), by pytest id; the
# script also times the launcher's other row splits ("ours, <= N block(s)/row") where it has a plan.
IMPLS = {
    "ours": Impl("ours", "lgrpo._C listener_confidence, check_indices=False (one asynchronous launch)"),
    "ours_checked": Impl("ours, checked",
                         "lgrpo._C listener_confidence, the default call (+ a D2H copy and sync for the index check)",
                         opts=dict(graph=False), note="check_indices=True: + D2H copy and sync"),  # a graph cannot sync
    "eager": Impl("torch eager", "torch eager: index the rows, log_softmax, gather, softmax"),
    "compile": Impl("torch.compile", "torch.compile(fullgraph=True) of the eager code", smoke_skip=SLOW_COMPILE),
}


def implementation(key: str) -> Callable:
    """IMPLS[key] as a function of (logits, positions, candidate_ids)."""
    if key == "compile":
        return torch.compile(torch_eager, fullgraph=True, dynamic=False)
    return {"ours": ours, "ours_checked": ours_checked, "eager": torch_eager}[key]


def _event_us(run: Callable[[], None], n_calls: int, reps: int = 5) -> float:
    """Median over reps of (event time of run()) / n_calls, in µs."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_calls)
    return statistics.median(times)


def loop_us(calls: list[Callable[[], object]]) -> float:
    for c in calls:  # warm-up (and first-call costs)
        c()
    torch.cuda.synchronize()
    return _event_us(lambda: [c() for c in calls], len(calls))


def graph_us(calls: list[Callable[[], object]]) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph asks
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    us = _event_us(graph.replay, len(calls))
    del graph
    return us


def measure(name: str, fn, inputs: list[tuple], n_bytes: int, copy_gbs: float, *, graph: bool = True,
            note: str = "") -> Row:
    """Row for fn over a list of argument tuples (the first one is the do_bench input)."""
    first = inputs[0]
    ms = bench_ms(lambda: fn(*first))
    extra: dict = {"bytes": n_bytes}
    if torch.cuda.is_available():
        calls = [(lambda a=a: fn(*a)) for a in inputs]
        extra["loop_us"] = loop_us(calls)
        extra["graph_us"] = graph_us(calls) if graph else None
    floor_ms = n_bytes / (copy_gbs * 1e9) * 1e3 if copy_gbs == copy_gbs else None
    timings = ", ".join(f"{k.split('_')[0]} {v:.1f}us" for k, v in extra.items() if k.endswith("_us") and v)
    return Row(name, ms, gbs=n_bytes / (ms * 1e-3) / 1e9, ratio=ms / floor_ms if floor_ms else None,
               note="; ".join(s for s in (timings, note) if s), extra=extra)


def run_case(label: str, inputs: list[tuple], n_bytes: int, copy_gbs: float, smoke: bool) -> list[Row]:
    # Same answer from every implementation before any of them is timed.
    want = torch_eager(*inputs[0])
    for got in (ours(*inputs[0]), ours_checked(*inputs[0])):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

    def row(name: str, fn, **kw) -> Row:
        full = f"{label} {name}"
        return run_guarded(full, lambda: measure(full, fn, inputs, n_bytes, copy_gbs, **kw))

    def compiled_row() -> Row:  # compiled (and checked) inside its row: a failing compile is that row's note
        compiled = implementation("compile")
        for g, w in zip(compiled(*inputs[0]), want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        return measure(f"{label} {IMPLS['compile'].row}", compiled, inputs, n_bytes, copy_gbs)

    plan = ops.listener_launch_plan(*inputs[0])
    plan_note = (f"{plan['blocks_per_row']} block(s)/row{' (cluster)' if plan['blocks_per_row'] > 1 else ''}, "
                 f"{plan['resident_blocks_per_sm']} blocks/SM" if plan else "")
    rows = []
    for key, impl in IMPLS.items():
        if smoke and impl.smoke_skip:  # not even a row: a CPU inductor compile alone outlasts the smoke run
            continue
        if key == "compile":
            rows.append(run_guarded(f"{label} {impl.row}", compiled_row))
            continue
        rows.append(row(impl.row, implementation(key), note=impl.note or (plan_note if key == "ours" else ""),
                        **impl.opts))
        if key == "eager" and plan:  # the row splits the launcher did not choose (LGRPO_LISTENER_MAX_CHUNKS)
            for cap in sorted({1, 4} - {plan["blocks_per_row"]}):
                os.environ["LGRPO_LISTENER_MAX_CHUNKS"] = str(cap)
                try:
                    rows.append(row(f"ours, <= {cap} block(s)/row", ours))
                finally:
                    del os.environ["LGRPO_LISTENER_MAX_CHUNKS"]
    return rows


def rows_case(smoke: bool, device: str, gen: torch.Generator) -> tuple[str, list[tuple], int]:
    """(label, N_CALLS argument tuples, bytes one call must read) of the ``[B, V]`` case: bf16 rows in
    rotating buffers, so that back-to-back calls stream from DRAM, not from L2."""
    B, V = (4, 1000) if smoke else (256, QWEN_V)
    n_buffers = 1 if smoke else 4
    cand = torch.tensor(CANDIDATES, device=device)
    buffers = [torch.randn(B, V, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
               for _ in range(n_buffers)]
    inputs = [(buffers[i % n_buffers], None, cand) for i in range(N_CALLS)]
    return f"[{B},V]", inputs, B * V * buffers[0].element_size()


def positions_case(smoke: bool, device: str, gen: torch.Generator) -> tuple[str, list[tuple], int]:
    """The same for ``[B, T, V]`` read at positions: N_CALLS different position sets, so the calls
    read N_CALLS x B different rows."""
    B, T, V = (2, 8, 1000) if smoke else (16, 1536, QWEN_V)
    cand = torch.tensor(CANDIDATES, device=device)
    logits = torch.empty(B, T, V, device=device, dtype=torch.bfloat16)
    for b in range(B):  # one sequence at a time: each fill stays under 2^31 elements
        logits[b].normal_(generator=gen)
    pos_sets = [torch.randint(0, T, (B,), generator=gen, device=device) for _ in range(N_CALLS)]
    return f"[{B},{T},V]@pos", [(logits, p, cand) for p in pos_sets], B * V * logits.element_size()


CASES = {"[B,V]": rows_case, "[B,T,V]@pos": positions_case}  # the shapes both harnesses time


def main(argv: list[str] | None = None) -> dict:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    gen = torch.Generator(device=device).manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    if not ops.HAS_EXTENSION:
        print("WARNING: lgrpo._C is not loaded: 'ours' is the PyTorch reference", file=sys.stderr)

    rows = []
    for make in CASES.values():
        label, inputs, n_bytes = make(smoke, device, gen)
        V = inputs[0][0].shape[-1]
        rows += run_case(label, inputs, n_bytes, copy_gbs, smoke)
        del inputs

    title = f"listener_confidence, K={len(CANDIDATES)}, V={V}, bf16"
    print_table(title, rows, env)
    print(f"copy bandwidth (read+write) {copy_gbs:.0f} GB/s; time = do_bench median, "
          "graph/loop = per call over 100 calls on rotating data")
    payload = {"title": title, "env": env, "rows": rows, "copy_gbs": copy_gbs,
               "notes": "time: do_bench median (L2 flushed); extra.graph_us: per call in a CUDA graph of 100 "
                        "calls; extra.loop_us: per call in a Python loop of 100 calls"}
    write_json(args.out, "bench_listener", payload)
    return payload


if __name__ == "__main__":
    main()
