"""Shared-prefix scoring vs the prompt repeated G times: forward and forward+backward, time and memory.

One group: P = 1 prompt (two images + text) and G = 8 completions of C tokens, as one micro-batch (the
trainer's default: micro-batch 8 = one group). Prompt:completion ratios R = 1, 4 and 10.
  forward           the reference / old-log-prob pass: per-token log-probs, no gradients
  forward+backward  the update: linear_grpo_loss on the final hidden states, backward, grads zeroed
  shared <backend>  lgrpo.scoring, each prompt (and its images) once per group, with each attention
                    backend that runs here (--loss.prefix_attention): sdpa, flex (forward only on
                    CPU: torch has no CPU backward for it), varlen (CUDA, after its check)
  repeated          plain transformers on the prompt repeated G times (--loss.shared_prefix false)

Sizes: on CUDA the Qwen2.5-VL-3B-sized model (random weights, bf16, SDPA), C = 256, two images per
prompt, the largest two 1024² images (1036² after Qwen's resize to multiples of 28: 1369 tokens each,
R ≈ 10.8). Without CUDA the tiny built-in model (fp32), C = 64 (R = 10: two 448² images); ``--smoke``:
C = 8, one repetition. Time: do_bench median on CUDA, the median of interleaved wall-clock runs on CPU
(shared and repeated alternate, so load on a shared machine hits both alike). Memory: peak extra
allocation (CUDA allocator statistics; on CPU torch's allocation events from the profiler, in a
separate untimed call), and the bytes saved for backward (activation memory, storages counted once).

Prediction, written before the first measurement. Tokens computed per group: repeated G·(R+1)·C,
shared (R+G)·C, so linear layers and MLPs gain G(R+1)/(R+G) = 1.8×, 3.3×, 4.9× at R = 1, 4, 10,
the vision tower G = 8× at every R, activation memory about the token ratio (the K/V copies a
completion's attention reads are ~1% of a layer's saved activations). The lm_head and the loss run on
the same completion tokens either way and dilute the gain; attention FLOPs shrink by less than the
token ratio (each completion still attends over the whole prompt). Expected on the 3B-sized model:
forward+backward 1.6×, 3×, 4.3×; forward alike; memory 1.7×, 3×, 4.5×. On the tiny CPU model, fixed
per-call costs (get_rope_index's Python loop, the window-attention bookkeeping of the vision tower,
the layout) weigh more: about 1.3×, 2×, 2.5×.

    python bench/bench_shared_prefix.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.*` from any working directory

from bench.bench_train_step import BenchTask, build_model, qwen25vl_3b_config  # noqa: E402
from bench.common import (  # noqa: E402
    GiB,
    Row,
    arg_parser,
    bench_ms,
    cpu_peak_extra_bytes,
    environment,
    peak_extra_bytes,
    print_table,
    run_guarded,
    write_json,
)
from lgrpo.group import GroupBatch  # noqa: E402
from lgrpo.scoring import CompletionScorer  # noqa: E402

G = 8
RATIOS = (1, 4, 10)


def case_sizes(ratio: int, completion: int, patch: int, merge: int, full: bool) -> tuple[int, int]:
    """(image side in pixels, text tokens) for a prompt of about ``ratio × completion`` tokens."""
    unit = patch * merge  # pixels per visual token along a side
    if full and ratio == 10:
        return 1036, 18  # two 1024² images as Qwen resizes them; the prompt is then ~10.8 C
    target = ratio * completion
    side = max(int((target * 0.9 / 2) ** 0.5), 1) * unit  # ~90% of the prompt in the two images
    images = 2 * (side // unit) ** 2 + 4  # + vision start/end tokens
    return side, max(target - images, 2)


def saved_bytes(fn, model) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn``: each storage once, the model's
    weights (saved by every matmul, the same either way) left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def attempt(fn, failed=float("nan")):
    """``fn()``, or ``failed`` when the device runs out of memory (the repeated path may, at R = 10)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return failed


def interleaved_ms(fns: dict, reps: int, warmup: bool = True) -> dict:
    """CPU: wall-clock medians, the candidates alternating (after one warm-up call each)."""
    for fn in fns.values() if warmup else ():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run_case(model, cfg, ratio: int, completion: int, device, full: bool, reps: int,
             smoke: bool = False) -> list[Row]:
    vc = cfg.vision_config
    side, text = case_sizes(ratio, completion, vc.patch_size, vc.spatial_merge_size, full)
    task = BenchTask(cfg, None, n_prompts=1, image_side=side, text_tokens=text)
    prompts = task.prompts("train", [0]).to(device)
    vocab = cfg.text_config.vocab_size
    gen = torch.Generator().manual_seed(ratio)
    ids = torch.randint(100, min(vocab, 150000) - 100, (G, completion), generator=gen)
    lengths = torch.randint(completion // 2, completion + 1, (G,), generator=gen)
    lengths[0] = completion
    mask = torch.arange(completion)[None] < lengths[:, None]
    batch = GroupBatch.grouped(prompts, ids.to(device), mask.to(device), G)
    adv = torch.randn(G, generator=gen).to(device)
    prompt_len = int(prompts.lengths()[0])
    label = f"R={prompt_len / completion:.1f} ({prompt_len}+{G}x{completion})"
    variants = available_variants(device)
    scorers = {v: CompletionScorer(model, shared_prefix=v != "repeated", prefix_attention=v if v != "repeated"
                                   else "auto") for v in variants}

    def forward(v):
        with torch.no_grad():
            return scorers[v](batch)

    def update(v):
        loss = scorers[v](batch, loss={"advantages": adv, "loss_type": "dapo"})[0]
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    def runs(kind, v):
        return kind == "fwd" or v in variants_with_grad(device)

    with torch.no_grad():
        truth = attempt(lambda: forward("repeated"), None)
        diffs = {v: attempt(lambda v=v: (forward(v) - truth)[mask.to(device)].abs().max().item())
                 if truth is not None else float("nan") for v in variants}
    worst = max(d for d in diffs.values() if d == d) if any(d == d for d in diffs.values()) else 0.0
    if device.type == "cpu" and worst > 1e-3:
        raise AssertionError(f"{label}: shared and repeated log-probs differ by {diffs}")
    cuda = device.type == "cuda"
    cases = [(k, v) for k in ("fwd", "fwd+bwd") for v in variants if runs(k, v)]
    if cuda:
        times = {(k, v): attempt(lambda k=k, v=v: bench_ms(lambda: (forward if k == "fwd" else update)(v)))
                 for k, v in cases}
    else:
        fns = {(k, v): (lambda k=k, v=v: (forward if k == "fwd" else update)(v)) for k, v in cases}
        times = interleaved_ms(fns, reps, warmup=not smoke)
    # On CPU the profiler's events take seconds to read: smoke runs leave peak memory out.
    peak = peak_extra_bytes if cuda else (lambda fn: 0) if smoke else cpu_peak_extra_bytes
    rows = []
    for kind in ("fwd", "fwd+bwd"):
        fn = forward if kind == "fwd" else update
        here = [v for v in variants if runs(kind, v)]
        mem = {v: attempt(lambda v=v, fn=fn: peak(lambda: fn(v)), 0) for v in here}
        act = {v: attempt(lambda v=v: saved_bytes(
            lambda: scorers[v](batch, loss={"advantages": adv, "loss_type": "dapo"})[0], model), 0)
               for v in here} if kind == "fwd+bwd" else dict.fromkeys(here, 0)
        model.zero_grad(set_to_none=True)
        for v in here:
            shared = v != "repeated"
            name = f"{label} {kind} {'shared ' + v if shared else 'repeated'}"
            ms = times[(kind, v)]
            speedup = times[(kind, "repeated")] / ms
            tokens = batch.prompt_tokens(shared) + int(mask.sum())
            note = f"{tokens} tokens"
            if shared:
                note = f"x{speedup:.2f} vs repeated"
                if mem[v]:
                    note += f", peak mem {mem['repeated'] / mem[v]:.2f}x less"
                if act[v]:
                    note += f", activations {act['repeated'] / act[v]:.2f}x less"
            rows.append(Row(
                name, ms, extra_gib=mem[v] / GiB if mem[v] else None, note=note,
                extra={"ratio": prompt_len / completion, "prompt_tokens": prompt_len, "completion": completion,
                       "group_size": G, "image_side": side, "kind": kind, "shared": shared,
                       "prefix_attention": v if shared else None,
                       "tokens_computed": tokens, "speedup_vs_repeated": speedup,
                       "peak_bytes": mem[v], "memory_ratio_vs_repeated": mem["repeated"] / max(mem[v], 1),
                       "saved_for_backward_bytes": act[v],
                       "activation_ratio_vs_repeated": act["repeated"] / max(act[v], 1) if act[v] else None,
                       "max_abs_logp_diff_vs_repeated": diffs[v]}))
    return rows


def available_variants(device) -> list[str]:
    """The repeated baseline and every shared-prefix backend that runs on ``device``: varlen only where its
    FlashAttention kernel passes lgrpo.attention.check_backend (CUDA, bf16)."""
    from lgrpo.attention import check_backend

    variants = ["repeated", "sdpa", "flex"]
    if device.type == "cuda":
        try:
            check_backend("varlen", device, torch.bfloat16)
            variants.append("varlen")
        except (ValueError, RuntimeError, ImportError) as e:
            print(f"varlen left out: {e}", flush=True)
    return variants


def variants_with_grad(device) -> set[str]:
    """FlexAttention has no backward on CPU (torch refuses it): flex times only the forward there."""
    return {"repeated", "sdpa", "varlen"} | ({"flex"} if device.type == "cuda" else set())


def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None, help="CPU: interleaved repetitions per timing")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads (1: on a shared machine, intra-op threads spin against the load)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, cuda)
    finally:
        torch.set_num_threads(threads)


def _run(args, cuda: bool) -> dict:
    device = torch.device("cuda" if cuda else "cpu")
    full = cuda and not args.smoke
    env = environment()
    if full:
        cfg = qwen25vl_3b_config(smoke=False)
        model = build_model(cfg, device, torch.bfloat16).train()
        completion = 256
    else:
        from lgrpo.model import load_model

        model = load_model("tiny", seed=0, device=device, dtype=torch.float32, attn_implementation="sdpa")
        cfg = model.config
        completion = 8 if args.smoke else 64
    reps = args.reps or (1 if args.smoke else 5)
    rows: list[Row] = []
    title = f"shared prefix vs repeated prompts, G={G}, C={completion}, {'3B-sized' if full else 'tiny'} model"
    for ratio in RATIOS:
        out = run_guarded(f"R={ratio}",
                          lambda r=ratio: run_case(model, cfg, r, completion, device, full, reps, args.smoke))
        rows += out if isinstance(out, list) else [out]
        write_json(args.out, "shared_prefix", {"title": title, "env": env, "rows": rows})
    print_table(title, rows, env)
    payload = {"title": title, "env": env, "rows": rows,
               "notes": "extra_gib: peak extra allocation; extra.saved_for_backward_bytes: activations"}
    write_json(args.out, "shared_prefix", payload)
    return payload


if __name__ == "__main__":
    main()
