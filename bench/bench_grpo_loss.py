"""GRPO loss from logits, forward + backward: ours vs torch eager, torch.compile and liger-kernel.

CUDA: N = 8 x 1024 tokens, V = 152064, bf16 logits, the anchors' settings (beta 0.04, eps 0.2/0.28,
dapo, ~90% of tokens live, one advantage per sequence). The floor is three passes over the logits
(forward read, backward read + write) at the copy bandwidth measured in the same run.

Behaviour policy: ``old_logp = logp + N(0, 0.05^2)`` (ref likewise), so ratios sit inside the clip
range as in real training. (With the anchors' ``old = -3 U(0,1)`` every A < 0 token is clipped, and
our backward skips reading those rows: a flattering, unrealistic case.)

In-place rows destroy the logits, so each timed call first restores them from a pristine copy; CUDA
events time the call alone, after the restore and an L2 flush (bench.common.bench_ms_after_setup).

Without CUDA (or with --smoke): tiny sizes through the Triton interpreter, a few seconds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgrpo.kernels import grpo_loss, token_logprobs  # noqa: E402

from bench.common import (  # noqa: E402
    SLOW_COMPILE,
    GiB,
    Impl,
    Row,
    arg_parser,
    backward_step,
    bench_ms,
    bench_ms_after_setup,
    copy_bandwidth_gbs,
    environment,
    peak_extra_bytes,
    print_table,
    rel_err,
    run_guarded,
    write_json,
)

TEMP, BETA, EPS_LO, EPS_HI = 1.0, 0.04, 0.2, 0.28
SHAPE, SMOKE_SHAPE = (8, 1024, 152064), (2, 8, 96)  # B, T, V


def grpo_from_logp(logp, old, ref, adv, mask):
    """TRL-style loss from per-token log-probs (the anchors' eager formula), dapo aggregation."""
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * adv[:, None], torch.clamp(ratio, 1 - EPS_LO, 1 + EPS_HI) * adv[:, None])
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    return ((pg + BETA * kl) * mask).sum() / mask.sum()


def eager_from_logits(logits, ids, old, ref, adv, mask):
    lp = torch.log_softmax(logits.float() / TEMP, dim=-1)
    return grpo_from_logp(lp.gather(-1, ids[..., None]).squeeze(-1), old, ref, adv, mask)


@dataclass
class Inputs:
    """One benchmark case: bf16 logits ``[B, T, V]`` (never modified: in-place rows restore from it),
    targets, one advantage per sequence, ~90% of tokens live, behaviour and reference log-probs."""

    logits: torch.Tensor
    ids: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.logits.numel() * self.logits.element_size()


def make_inputs(B: int, T: int, V: int, device: str, seed: int = 0) -> Inputs:
    """The benchmark's inputs. ``old``/``ref`` = the policy's log-probs + N(0, 0.05^2), so ratios sit
    inside the clip range as in training (see the module docstring)."""
    torch.manual_seed(seed)
    ids = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, device=device)
    mask = (torch.rand(B, T, device=device) > 0.1).float()
    logits = (torch.randn(B, T, V, device=device) * 2).to(torch.bfloat16)
    with torch.no_grad():
        lp = token_logprobs(logits, ids, TEMP)
    return Inputs(logits, ids, adv, mask, lp + 0.05 * torch.randn_like(lp), lp + 0.05 * torch.randn_like(lp))


def ours_loss(logits: torch.Tensor, x: Inputs, inplace: bool = False) -> torch.Tensor:
    """lgrpo's grpo_loss with the anchors' settings (the forward; ``.backward()`` on it is the rest)."""
    return grpo_loss(logits, x.ids, x.adv, x.mask, x.old, x.ref, temperature=TEMP, eps_low=EPS_LO,
                     eps_high=EPS_HI, beta=BETA, loss_type="dapo", inplace_grad=inplace).loss


def liger_logits(logits: torch.Tensor) -> torch.Tensor:
    """liger shifts internally: it wants logits for T + 1 positions and drops the last."""
    return torch.cat([logits, logits[:, -1:]], dim=1)


def liger_loss(longer: torch.Tensor, x: Inputs) -> torch.Tensor:
    """liger-kernel's in-place triton_grpo_loss on ``liger_logits(...)`` (its gradient overwrites them)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    loss, _ = triton_grpo_loss(longer, x.old, x.ref, x.ids, x.adv, x.mask, temperature=TEMP, beta=BETA,
                               eps_low=EPS_LO, eps_high=EPS_HI, inplace=True, loss_type="dapo", reduce=True)
    return loss


# The implementations both harnesses time (main() below and test_kernels_benchmark.py), by pytest id.
IMPLS = {
    "ours": Impl("ours (lgrpo grpo_loss)", "lgrpo grpo_loss, forward + backward"),
    "ours_inplace": Impl("ours, inplace_grad=True",
                         "lgrpo grpo_loss(inplace_grad=True): the gradient overwrites the logits (restored untimed)",
                         opts=dict(inplace=True)),
    "ours_fwd": Impl("ours, forward only", "lgrpo grpo_loss, forward only (floor: one pass)",
                     opts=dict(forward_only=True), note="ratio to the 1-pass floor"),
    "eager": Impl("torch eager (TRL-style)", "torch eager, TRL-style: fp32 log_softmax over the full logits"),
    "compile": Impl("torch.compile", "torch.compile of the eager loss", smoke_skip=SLOW_COMPILE),
    "liger": Impl("liger triton_grpo_loss (inplace)", "liger-kernel triton_grpo_loss, in place (restored untimed)",
                  opts=dict(inplace=True), needs="liger_kernel"),
}


class Peer(NamedTuple):  # not a dataclass: tests/conftest.py runs this file as a module outside sys.modules
    """One implementation ready to time. ``step()``: one call (forward, and backward unless forward-only) on a
    fresh gradient, returning the loss; ``grad()``: its d loss / d logits ``[B, T, V]`` after a step;
    ``restore()``: puts back the logits an in-place implementation overwrote (None: not in place)."""

    leaf: torch.Tensor
    step: Callable[[], torch.Tensor]
    grad: Callable[[], torch.Tensor | None]
    restore: Callable[[], None] | None


def peer(key: str, x: Inputs) -> Peer:
    """IMPLS[key] on its own leaf (a copy of ``x.logits``; liger's one position longer)."""
    impl = IMPLS[key]
    if key == "liger":
        leaf = liger_logits(x.logits).requires_grad_()
        loss_fn, grad = (lambda: liger_loss(leaf, x)), (lambda: None if leaf.grad is None else leaf.grad[:, :-1])
    else:
        leaf = x.logits.clone().requires_grad_()
        grad = lambda: leaf.grad  # noqa: E731
        if key in ("eager", "compile"):
            fn = torch.compile(eager_from_logits) if key == "compile" else eager_from_logits
            loss_fn = lambda: fn(leaf, x.ids, x.old, x.ref, x.adv, x.mask)  # noqa: E731
        else:
            loss_fn = lambda: ours_loss(leaf, x, inplace=impl.opts.get("inplace", False))  # noqa: E731
    if impl.opts.get("forward_only"):
        def step() -> torch.Tensor:
            with torch.no_grad():
                return loss_fn()
    else:
        step = backward_step(loss_fn, leaf)
    restore = None
    if impl.opts.get("inplace"):
        pristine = x.logits if leaf.shape == x.logits.shape else leaf.detach().clone()  # x.logits stays as made

        def restore() -> None:
            leaf.grad = None
            with torch.no_grad():
                leaf.copy_(pristine)

    return Peer(leaf, step, grad, restore)


def main(argv: list[str] | None = None) -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    B, T, V = SMOKE_SHAPE if smoke else SHAPE
    device = "cuda" if cuda else "cpu"
    env = environment()
    x = make_inputs(B, T, V, device)
    logits_bytes = x.nbytes

    bw = copy_bandwidth_gbs() if cuda else None
    floor_ms = 3 * logits_bytes / (bw * 1e9) * 1e3 if cuda else None
    fwd_floor_ms = floor_ms / 3 if cuda else None
    rows: list[Row] = []
    title = (f"GRPO loss from logits, fwd+bwd, B={B} T={T} V={V} bf16, dapo beta={BETA} "
             f"eps=({EPS_LO},{EPS_HI})")

    def record(row: Row) -> None:
        """Keep the row and rewrite the JSON, so that a timeout keeps what was measured."""
        rows.append(row)
        print(f"  {row.name}: {row.ms:.3f} ms  {row.note}", flush=True)
        write_json(args.out, "grpo_loss", dict(title=title, env=env, floor_ms=floor_ms, copy_gbs=bw,
                                               shape=dict(B=B, T=T, V=V), smoke=smoke, rows=rows))

    if cuda:
        record(Row("floor: 3 passes over the logits at copy bw", floor_ms, 0.0, bw, 1.0,
                   note=f"d2d copy {bw:.0f} GB/s (read+write), logits {logits_bytes / 1e9:.2f} GB"))

    if cuda:  # what an in-place row's untimed restore costs: one copy of the logits
        scratch = x.logits.clone()
        restore_ms = bench_ms(lambda: scratch.copy_(x.logits))
        del scratch
    else:
        restore_ms = 0.0

    # eager result: the yardstick every row reports its agreement with
    eager = peer("eager", x)
    loss_ref = eager.step().item()
    grad_ref = eager.grad().clone()
    del eager

    def measure(key: str) -> Row:
        impl = IMPLS[key]
        if smoke and impl.smoke_skip:
            raise RuntimeError(f"skipped in smoke mode ({impl.smoke_skip})")
        p = peer(key, x)
        floor, nbytes = (fwd_floor_ms, logits_bytes) if impl.opts.get("forward_only") else (floor_ms, 3 * logits_bytes)
        if p.restore:
            p.restore()
        loss, grad = p.step(), p.grad()
        if grad is not None:
            agreement = f"loss diff {abs(float(loss) - loss_ref):.1e}, grad relerr {rel_err(grad, grad_ref):.1e}"
        else:
            agreement = f"loss diff {abs(float(loss) - loss_ref):.1e}"
        p.leaf.grad = None  # the peak below counts the step's own gradient
        if p.restore:
            p.restore()
        extra = peak_extra_bytes(p.step) / GiB if cuda else None
        note = impl.note
        if p.restore:
            ms = bench_ms_after_setup(p.step, p.restore)
            note = f"{note}; timed after a restore copy ({restore_ms:.2f} ms, not counted)".lstrip("; ")
        else:
            ms = bench_ms(p.step)
        gbs = nbytes / (ms * 1e-3) / 1e9 if cuda else None
        ratio = ms / floor if cuda else None
        return Row(impl.row, ms, extra, gbs, ratio, note=f"{agreement}; {note}".rstrip("; "))

    for key, impl in IMPLS.items():
        record(run_guarded(impl.row, lambda k=key: measure(k)))

    print_table(title, rows, env)


if __name__ == "__main__":
    main()
