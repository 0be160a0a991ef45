"""GRPO loss from hidden states + lm_head, forward + backward: ours vs eager, liger, cut-cross-entropy.

CUDA: N = 8 x 1024 tokens, H = 3584, V = 152064 (Qwen2.5-VL-7B's lm_head), bf16, the anchors'
settings (beta 0.04, eps 0.2/0.28, dapo, ~90% of tokens live). The floor is the three matmuls of
that shape (logits, grad_hidden, grad_weight), timed in the same run. Peak extra memory includes the
weight and hidden gradients.

Behaviour policy: ``old_logp = logp + N(0, 0.05^2)`` (ref likewise), ratios in the clip range as in
training. Rows are written to the JSON as they are measured, so a timeout keeps what was done.

Without CUDA (or with --smoke): tiny sizes through the Triton interpreter, a few seconds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgrpo.kernels import linear_grpo_loss  # noqa: E402
from lgrpo.kernels.linear_grpo import default_chunk_rows  # noqa: E402
from lgrpo.kernels.logprobs import launch_row_grad, launch_row_stats  # noqa: E402

# The anchors' settings and their eager TRL-style loss, the same as the loss from logits is timed with.
from bench.bench_grpo_loss import BETA, EPS_HI, EPS_LO, TEMP, grpo_from_logp  # noqa: E402
from bench.common import (  # noqa: E402
    GiB,
    Impl,
    Row,
    arg_parser,
    backward_step,
    bench_ms,
    environment,
    matmul_ms,
    peak_extra_bytes,
    print_table,
    rel_err,
    run_guarded,
    write_json,
)

SHAPE, SMOKE_SHAPE = (8, 1024, 3584, 152064), (2, 8, 32, 96)  # B, T, H, V
CCE_CUDA_ONLY = "cut-cross-entropy's Triton kernels fail in the Triton interpreter: CUDA only"
CHUNK_ROWS = (384, 768, 896, 1024)  # sequential rows: the speed / memory trade-off around the default chunk
# overlap rows: (logits buffers, rows per chunk; None: the default, 384 at SHAPE with 2 buffers, 768 with 1)
OVERLAP_ROWS = ((2, None), (2, 512), (2, 768), (1, None), (1, 1024))


@dataclass
class Inputs:
    """One benchmark case: bf16 hidden states ``[B, T, H]`` and lm_head weight ``[V, H]`` (plain tensors:
    callers make leaves of them), targets, one advantage per sequence, ~90% of tokens live, behaviour
    and reference log-probs."""

    hidden: torch.Tensor
    weight: torch.Tensor
    ids: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor


def make_inputs(B: int, T: int, H: int, V: int, device: str, seed: int = 0) -> Inputs:
    """The benchmark's inputs. ``old``/``ref`` = the policy's log-probs + N(0, 0.05^2): ratios in the
    clip range, as in training."""
    torch.manual_seed(seed)
    hidden = torch.randn(B, T, H, device=device, dtype=torch.bfloat16)
    weight = torch.randn(V, H, device=device, dtype=torch.bfloat16) / H**0.5
    ids = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, device=device)
    mask = (torch.rand(B, T, device=device) > 0.1).float()
    with torch.no_grad():
        lp = linear_grpo_loss(hidden, weight, ids, adv, mask).logp
    return Inputs(hidden, weight, ids, adv, mask, lp + 0.05 * torch.randn_like(lp),
                  lp + 0.05 * torch.randn_like(lp))


def matmul_floor(N: int, H: int, V: int) -> tuple[float, str]:
    """(ms, note): the three lm_head-sized matmuls (logits, grad_hidden, grad_weight), timed here."""
    shapes = {"logits  [N,H]x[H,V]": (N, V, H), "grad_h  [N,V]x[V,H]": (N, H, V),
              "grad_W  [V,N]x[N,H]": (V, H, N)}
    times = {k: matmul_ms(*mnk) for k, mnk in shapes.items()}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    floor_ms = sum(times.values())
    tflops = 3 * 2 * N * H * V / (floor_ms * 1e-3) / 1e12
    parts = ", ".join(f"{k.split()[0]} {v:.2f} ms" for k, v in times.items())
    return floor_ms, f"{parts}; {tflops:.0f} TFLOP/s"


def ours_loss(hidden: torch.Tensor, weight: torch.Tensor, x: Inputs, **opts) -> torch.Tensor:
    """lgrpo's linear_grpo_loss with the anchors' settings (``opts``: chunk_size, importance_level...)."""
    return linear_grpo_loss(hidden, weight, x.ids, x.adv, x.mask, x.old, x.ref, temperature=TEMP, eps_low=EPS_LO,
                            eps_high=EPS_HI, beta=BETA, loss_type="dapo", **opts).loss


def eager_loss(hidden: torch.Tensor, weight: torch.Tensor, x: Inputs) -> torch.Tensor:
    """The full logits in bf16, then the TRL-style loss in fp32: what a trainer writes without a fused head."""
    logits = hidden @ weight.T
    lp = torch.log_softmax(logits.float() / TEMP, dim=-1).gather(-1, x.ids[..., None]).squeeze(-1)
    return grpo_from_logp(lp, x.old, x.ref, x.adv, x.mask)


def cce_loss(hidden: torch.Tensor, weight: torch.Tensor, x: Inputs, filter_eps) -> torch.Tensor:
    """cut-cross-entropy's per-token NLL (never the full logits), then the TRL-style loss."""
    from cut_cross_entropy import linear_cross_entropy

    nll = linear_cross_entropy(hidden, weight, x.ids, reduction="none", filter_eps=filter_eps)
    return grpo_from_logp(-nll.float(), x.old, x.ref, x.adv, x.mask)


def liger_module(compiled: bool):
    """liger-kernel's fused linear GRPO loss (chunk 4, as the anchors ran it)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=BETA, epsilon_low=EPS_LO, epsilon_high=EPS_HI, loss_type="dapo",
                                    temperature=TEMP, chunk_size=4, use_ref_model=True, compiled=compiled)


def liger_loss(fused, hidden: torch.Tensor, weight: torch.Tensor, x: Inputs) -> torch.Tensor:
    out = fused(hidden, weight, x.ids, x.mask, x.adv, ref_per_token_logps=x.ref, old_per_token_logps=x.old)
    return out[0] if isinstance(out, tuple) else out


def ours_impls(V: int, smoke: bool) -> dict[str, Impl]:
    """The rows of ours at vocabulary V (``opts``: linear_grpo_loss's), in the script's order; those with an
    ``about`` are test_kernels_benchmark.py's too, under their key.

    overlap=True (bench/NOTES.md, "overlap"): each chunk's grad_W GEMM on a side stream, beside grad_h's GEMM
    (1 buffer: no extra memory) or also the next chunk's logits GEMM (2 buffers; default 2 x 384 rows = the
    memory of one 768-row buffer). Compare with the sequential rows (same chunk); smoke: 4-row chunks, so that
    the overlap's schedule runs at all (one row per buffer count)."""
    impls = {
        "ours": Impl(f"ours (chunk {default_chunk_rows(V, 2)} rows)",
                     "lgrpo linear_grpo_loss (chunked, never the full logits), forward + backward"),
        "ours seq": Impl("ours, importance_level=sequence", opts=dict(importance_level="sequence"),
                         note="a different loss (GSPO ratio): agreement not expected"),
        "ours fp32": Impl("ours, fp32_weight_grad=True", opts=dict(fp32_weight_grad=True)),
    }
    for c in CHUNK_ROWS:
        impls[f"ours {c}"] = Impl(f"ours (chunk {c} rows)", opts=dict(chunk_size=c))
    at_default = {
        2: ("ours_overlap", "ours, overlap=True: grad_W's GEMM on a side stream (2 logits buffers of half the "
                            "default chunk)"),
        1: ("ours_overlap1", "ours, overlap=True, overlap_buffers=1: grad_W's GEMM beside grad_h's (default chunk)"),
    }
    seen = set()
    for n, chunk in OVERLAP_ROWS:
        rows = 4 if smoke else chunk or default_chunk_rows(V, 2, buffers=n)
        if (n, rows) not in seen:
            seen.add((n, rows))
            key, about = at_default[n] if chunk is None else (f"overlap {n}x{rows}", None)
            impls[key] = Impl(f"ours overlap ({n} x {rows} rows)", about,
                              opts=dict(overlap=True, overlap_buffers=n, chunk_size=rows))
    return impls


# The peers, after ours in the script's rows; those with an ``about`` are test_kernels_benchmark.py's too.
PEERS = {
    "eager": Impl("eager matmul + loss", "eager: full bf16 logits, then the TRL-style loss in fp32"),
    "cce": Impl("cut-cross-entropy + torch GRPO (filter_eps=high)",
                "cut-cross-entropy (filter_eps='high', its default) + torch GRPO", opts=dict(filter_eps="high"),
                needs="cut_cross_entropy", cuda_only=CCE_CUDA_ONLY),
    "cce_exact": Impl("cut-cross-entropy + torch GRPO (filter_eps=None)",
                      "cut-cross-entropy (filter_eps=None: exact gradients) + torch GRPO", opts=dict(filter_eps=None),
                      needs="cut_cross_entropy", cuda_only=CCE_CUDA_ONLY),
    "liger": Impl("liger FusedLinearGRPO (chunk 4)", "liger-kernel LigerFusedLinearGRPOLoss (chunk 4)",
                  needs="liger_kernel"),
}


def loss_fn(key: str, impl: Impl, hidden: torch.Tensor, weight: torch.Tensor, x: Inputs) -> Callable[[], torch.Tensor]:
    """The forward of ``impl`` (a row of ours_impls, or PEERS[key]) on these leaves."""
    if key in PEERS:
        if key == "eager":
            return lambda: eager_loss(hidden, weight, x)
        if key == "liger":
            fused = liger_module(compiled=torch.cuda.is_available())  # its torch.compile of a chunk is for CUDA
            return lambda: liger_loss(fused, hidden, weight, x)
        return lambda: cce_loss(hidden, weight, x, impl.opts["filter_eps"])
    return lambda: ours_loss(hidden, weight, x, **impl.opts)


def chunk_breakdown(chunk: int, live_rows: int, H: int, V: int, device: str) -> Row:
    """What one chunk of ``ours`` costs, piece by piece, times the number of chunks: the model of the
    gap to the floor. Pieces: the logits GEMM ``[c,H]x[H,V]``, the two Triton vocabulary passes
    (stats; gradient in place), the grad_hidden GEMM ``[c,V]x[V,H]`` (few output tiles: K = V is long,
    M x N is small), and the weight-gradient GEMM ``[V,c]x[c,H]`` added into the bf16 gradient
    (beta = 1: reads and writes all of grad_W) or written (beta = 0, the first chunk)."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    h = torch.randn(chunk, H, **bf16)
    w = torch.randn(V, H, **bf16) / H**0.5
    z = torch.empty(chunk, V, **bf16)
    acc = torch.zeros(V, H, **bf16)
    targets = torch.randint(0, V, (chunk,), device=device)
    f32 = dict(device=device, dtype=torch.float32)
    logp, lse, ent, coef = (torch.zeros(chunk, **f32) for _ in range(4))
    coef.normal_()
    torch.mm(h, w.t(), out=z)
    pieces = {
        "logits": lambda: torch.mm(h, w.t(), out=z),
        "stats": lambda: launch_row_stats(z, targets, 1.0, logp, lse, entropy=ent),
        "grad pass": lambda: launch_row_grad(z, z, targets, lse, coef, 1.0),
        "grad_h": lambda: torch.mm(z, w),
        "grad_W b=1": lambda: acc.addmm_(z.t(), h),
        "grad_W b=0": lambda: acc.addmm_(z.t(), h, beta=0.0),
    }
    ms = {}
    for name, fn in pieces.items():
        if name == "grad pass":  # keep z finite: the in-place pass turns logits into gradients
            torch.mm(h, w.t(), out=z)
        ms[name] = bench_ms(fn, warmup_ms=10, rep_ms=50)
    n_chunks = -(-live_rows // chunk)
    per_chunk = sum(v for k, v in ms.items() if k != "grad_W b=0")
    total = n_chunks * per_chunk - ms["grad_W b=1"] + ms["grad_W b=0"]  # the first chunk writes
    flops = 2 * chunk * H * V
    note = ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
    note += "; TFLOP/s " + ", ".join(f"{k} {flops / (ms[k] * 1e-3) / 1e12:.0f}"
                                      for k in ("logits", "grad_h", "grad_W b=1", "grad_W b=0"))
    return Row(f"model: {n_chunks} chunks of {chunk} rows, summed", total, note=f"ms per chunk: {note}",
               extra={"per_chunk_ms": ms, "n_chunks": n_chunks})


def main(argv: list[str] | None = None) -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    B, T, H, V = SMOKE_SHAPE if smoke else SHAPE
    N = B * T
    device = "cuda" if cuda else "cpu"
    env = environment()
    title = f"GRPO loss from hidden states, fwd+bwd, N={B}x{T} H={H} V={V} bf16, dapo beta={BETA}"
    rows: list[Row] = []

    def record(row: Row) -> None:
        rows.append(row)
        print(f"  {row.name}: {row.ms:.3f} ms  {row.note}", flush=True)
        write_json(args.out, "linear_grpo", dict(title=title, env=env, shape=dict(B=B, T=T, H=H, V=V),
                                                 smoke=smoke, floor_ms=floor_ms, rows=rows))

    floor_ms = None
    if cuda:
        floor_ms, floor_note = matmul_floor(N, H, V)
        record(Row("floor: the three matmuls", floor_ms, None, None, 1.0, note=floor_note))

    x = make_inputs(B, T, H, V, device)
    hidden, weight, mask = x.hidden.requires_grad_(), x.weight.requires_grad_(), x.mask
    # eager's result: the yardstick every row reports its agreement with
    loss_ref = float(backward_step(loss_fn("eager", PEERS["eager"], hidden, weight, x), hidden, weight)())
    gh_ref, gw_ref = hidden.grad.detach().clone(), weight.grad.detach().clone()

    def measure(key: str, impl: Impl) -> Row:
        step = backward_step(loss_fn(key, impl, hidden, weight, x), hidden, weight)
        loss = float(step())
        agreement = (f"loss diff {abs(loss - loss_ref):.1e}, "
                     f"grad_h relerr {rel_err(hidden.grad, gh_ref):.1e}, "
                     f"grad_W relerr {rel_err(weight.grad, gw_ref):.1e}")
        hidden.grad = weight.grad = None  # the peak below counts the step's own gradients
        extra = peak_extra_bytes(step) / GiB if cuda else None
        ms = bench_ms(step, warmup_ms=10, rep_ms=100)
        hidden.grad = weight.grad = None
        return Row(impl.row, ms, extra, None, ms / floor_ms if floor_ms else None,
                   note=f"{agreement}; {impl.note}".rstrip("; "))

    for key, impl in ours_impls(V, smoke).items():
        record(run_guarded(impl.row, lambda k=key, i=impl: measure(k, i)))
    chunk = default_chunk_rows(V, 2)
    live = int(mask.sum())
    for chunk_rows in sorted({min(chunk, live), min(1024, live)}):  # where a chunk's time goes (vs the floor)
        def model(c=chunk_rows) -> Row:
            row = chunk_breakdown(c, live, H, V, device)
            row.ratio = row.ms / floor_ms if floor_ms else None
            return row
        record(run_guarded(f"model {chunk_rows}", model))
    if cuda:
        torch.cuda.empty_cache()
    for key, impl in PEERS.items():
        record(run_guarded(impl.row, lambda k=key, i=impl: measure(k, i)))
    print_table(title, rows, env)


if __name__ == "__main__":
    main()
