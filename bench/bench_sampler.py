"""The rollout sampler's cost per decoding step, beside what plain HF sampling does.

One decoding step of a rollout turns the fp32 logits of the last position, ``[B, V]``, into one
token per row. Rows, B = 16 and 64 (rollout batches), V = 152064 (Qwen2.5-VL):
  ours                 lgrpo.rollout.top_p.sample_from_logits: fixed-point CDF, blocked scan, T = 1
  ours, top_p=0.95     the same with a nucleus (adds a sort and a second scan)
  ours, per step       the whole CounterSampler call of a step (sample + the -inf/0 scores HF takes)
  flat fp64 cumsum     the sampler before it (<= commit be58fd6): one ``cumsum`` over each fp64 row,
                       which torch runs on a single thread block for few long rows (pytorch#122170)
  torch.multinomial    what HF's ``do_sample=True`` does after its warpers: softmax + multinomial
  floor                one read of the logits at this run's copy bandwidth

time = do_bench median (GPU time of a call); ``step`` in the note = wall time of a call followed by a
synchronize, median of 50: what a decoding loop that syncs every token (HF generate does) pays.

    python bench/bench_sampler.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.common` from any working directory

from bench.common import (  # noqa: E402
    Impl,
    Row,
    arg_parser,
    bench_ms,
    copy_bandwidth_gbs,
    environment,
    print_table,
    run_guarded,
    sync,
    write_json,
)
from lgrpo.rollout.hf import CounterSampler  # noqa: E402
from lgrpo.rollout.top_p import counter_uniform, sample_from_logits  # noqa: E402

QWEN_V = 152064
SMOKE_VOCAB = 5000
ROWS = (16, 64)  # B: rollout batch sizes

# The implementations both harnesses time (main() below and test_kernels_benchmark.py), by pytest id. The
# engine's Triton kernel is timed by test_kernels_benchmark.py only, beside the check against its PyTorch twin.
IMPLS = {
    "ours": Impl(None, "the rollout engine's Triton kernel (lgrpo.kernels.sampler.sample_tokens): Gumbel-max, Philox"),
    "fixed_point": Impl("ours", "lgrpo.rollout.top_p.sample_from_logits: fixed-point CDF, blocked scan (the generate "
                                "path)"),
    "top_p": Impl("ours, top_p=0.95"),
    "per_step": Impl("ours, per step (CounterSampler)"),
    "cumsum_fp64": Impl("flat fp64 cumsum (before)", "the sampler before it: one flat fp64 cumsum per row + "
                                                     "searchsorted"),
    "multinomial": Impl("torch.multinomial (HF do_sample)", "torch.multinomial(softmax(logits)) (HF do_sample)"),
}


def flat_fp64_cumsum(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The previous sampler (T = 1, no top-p), kept here as the 'before' of this benchmark."""
    cdf = torch.softmax(logits.float(), dim=-1).double().cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def step_ms(fn, reps: int = 50) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(name: str, fn, n_bytes: int, copy_gbs: float, smoke: bool) -> Row:
    ms = bench_ms(fn)
    floor_ms = n_bytes / (copy_gbs * 1e9) * 1e3 if copy_gbs == copy_gbs else None
    step = step_ms(fn, reps=5 if smoke else 50)
    return Row(name, ms, gbs=n_bytes / (ms * 1e-3) / 1e9, ratio=ms / floor_ms if floor_ms else None,
               note=f"step {step:.3f} ms", extra={"step_ms": step})


def make_logits(rows_b: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits ``[rows_b, vocab]`` of a decoding step, one uniform number per row)."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows_b, vocab, generator=gen, device=device) * 3
    return logits, counter_uniform(1, 2, torch.arange(rows_b), 3).to(device)


def check_old_new_agree(logits: torch.Tensor, u: torch.Tensor, label: str) -> float:
    """The old and the new sampler draw the same tokens from the same uniforms (but for a token at a
    CDF boundary, where their roundings differ): the fraction of equal rows, >= 0.99 or AssertionError."""
    ids, _ = sample_from_logits(logits, u, 1.0)
    agree = (ids == flat_fp64_cumsum(logits, u)).float().mean().item()
    if agree < 0.99:
        raise AssertionError(f"{label}: old and new samplers agree on only {agree:.0%} of rows")
    return agree


def samplers(rows_b: int, u: torch.Tensor, device: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """IMPLS key -> logits ``[rows_b, V]`` -> what that sampler draws from them (temperature 1; the engine's
    kernel is built by test_kernels_benchmark.py). The token ids, ``[rows_b]``, but for ``per_step``: the
    scores HF takes (the sampled id at 0, the rest -inf)."""
    sampler = CounterSampler(1, 2, torch.arange(rows_b), 1.0, 1.0, prompt_len=0, max_new_tokens=8)
    input_ids = torch.zeros(rows_b, 3, dtype=torch.long, device=device)
    return {
        "fixed_point": lambda z: sample_from_logits(z, u, 1.0)[0],
        "top_p": lambda z: sample_from_logits(z, u, 1.0, 0.95)[0],
        "per_step": lambda z: sampler(input_ids, z),
        "cumsum_fp64": lambda z: flat_fp64_cumsum(z, u),
        "multinomial": lambda z: torch.multinomial(torch.softmax(z, -1), 1).squeeze(-1),
    }


def run_case(rows_b: int, vocab: int, device: str, copy_gbs: float, smoke: bool) -> list[Row]:
    logits, u = make_logits(rows_b, vocab, device)
    n_bytes = logits.numel() * logits.element_size()
    label = f"[{rows_b},V]"
    check_old_new_agree(logits, u, label)
    fns = samplers(rows_b, u, device)
    return [
        run_guarded(f"{label} {impl.row}",
                    lambda n=impl.row, f=fns[key]: measure(f"{label} {n}", lambda: f(logits), n_bytes, copy_gbs, smoke))
        for key, impl in IMPLS.items() if impl.row
    ]


def main(argv: list[str] | None = None) -> dict:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    copy_gbs = copy_bandwidth_gbs()
    vocab = SMOKE_VOCAB if smoke else QWEN_V
    rows = []
    for rows_b in ROWS:
        rows += run_case(rows_b, vocab, device, copy_gbs, smoke)
    title = f"rollout sampler, one decoding step, V={vocab}, fp32 logits"
    print_table(title, rows, env)
    print(f"copy bandwidth (read+write) {copy_gbs:.0f} GB/s; x floor = time / (one read of the logits)")
    payload = {"title": title, "env": env, "rows": rows, "copy_gbs": copy_gbs,
               "notes": "time: do_bench median; extra.step_ms: wall time of a call + synchronize"}
    write_json(args.out, "bench_sampler", payload)
    return payload


if __name__ == "__main__":
    main()
