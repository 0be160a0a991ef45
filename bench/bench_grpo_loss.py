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
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgrpo.kernels import grpo_loss, token_logprobs  # noqa: E402

from bench.common import (  # noqa: E402
    GiB,
    Row,
    arg_parser,
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


def main(argv: list[str] | None = None) -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    B, T, V = SMOKE_SHAPE if smoke else SHAPE
    device = "cuda" if cuda else "cpu"
    env = environment()
    x = make_inputs(B, T, V, device)
    ids, adv, mask, old, ref, pristine = x.ids, x.adv, x.mask, x.old, x.ref, x.logits
    logits = pristine.clone().requires_grad_()
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

    def restore() -> None:
        with torch.no_grad():
            logits.copy_(pristine)

    restore_ms = bench_ms(restore) if cuda else 0.0

    # eager result: the yardstick every row reports its agreement with
    loss_ref = eager_from_logits(logits, ids, old, ref, adv, mask)
    loss_ref.backward()
    grad_ref, loss_ref = logits.grad.detach().clone(), loss_ref.item()
    logits.grad = None

    def measure(name: str, step, *, inplace: bool, floor=floor_ms, nbytes=3 * logits_bytes,
                note: str = "") -> Row:
        """step() runs forward + backward on the logits and returns the loss."""

        def once():
            # A fresh .grad each call, as do_bench(grad_to_none=...) in the anchors: otherwise autograd
            # adds each new gradient into the old one, a 3-pass extra that is nobody's kernel.
            logits.grad = None
            if inplace:
                restore()
            return step()

        logits.grad = None
        loss = once()
        if logits.grad is not None:
            err = rel_err(logits.grad, grad_ref)
            agreement = f"loss diff {abs(float(loss) - loss_ref):.1e}, grad relerr {err:.1e}"
        else:
            agreement = f"loss diff {abs(float(loss) - loss_ref):.1e}"
        logits.grad = None
        if inplace:
            restore()
        extra = peak_extra_bytes(step) / GiB if cuda else None
        logits.grad = None
        if inplace:
            def setup():
                logits.grad = None
                restore()

            ms = bench_ms_after_setup(step, setup)
            restore()  # leave pristine logits for the next row
            note = f"{note}; timed after a restore copy ({restore_ms:.2f} ms, not counted)".lstrip("; ")
        else:
            ms = bench_ms(once)
        logits.grad = None
        gbs = nbytes / (ms * 1e-3) / 1e9 if cuda else None
        ratio = ms / floor if cuda else None
        return Row(name, ms, extra, gbs, ratio, note=f"{agreement}; {note}".rstrip("; "))

    def ours(inplace: bool):
        def step():
            loss = ours_loss(logits, x, inplace)
            loss.backward()
            return loss.detach()
        return step

    record(run_guarded("ours (lgrpo grpo_loss)", lambda: measure("ours (lgrpo grpo_loss)", ours(False),
                                                                      inplace=False)))
    record(run_guarded("ours, inplace_grad=True", lambda: measure("ours, inplace_grad=True", ours(True),
                                                                       inplace=True)))

    def ours_forward():
        with torch.no_grad():
            return ours_loss(logits, x)

    record(run_guarded("ours, forward only", lambda: measure(
        "ours, forward only", ours_forward, inplace=False, floor=fwd_floor_ms, nbytes=logits_bytes,
        note="ratio to the 1-pass floor")))

    def eager_step(fn):
        def step():
            loss = fn(logits, ids, old, ref, adv, mask)
            loss.backward()
            return loss.detach()
        return step

    record(run_guarded("torch eager (TRL-style)", lambda: measure(
        "torch eager (TRL-style)", eager_step(eager_from_logits), inplace=False)))

    def compiled():
        if smoke:
            raise RuntimeError("skipped in smoke mode (inductor compile takes minutes on CPU)")
        return measure("torch.compile", eager_step(torch.compile(eager_from_logits)), inplace=False)

    record(run_guarded("torch.compile", compiled))

    def liger():
        longer = liger_logits(pristine).requires_grad_()
        longer_pristine = longer.detach().clone()

        def step():
            loss = liger_loss(longer, x)
            loss.backward()
            return loss.detach()

        def restore_longer():
            longer.grad = None
            with torch.no_grad():
                longer.copy_(longer_pristine)

        def step_restored():
            restore_longer()
            return step()

        longer.grad = None
        loss = step_restored()
        err = rel_err(longer.grad[:, :-1], grad_ref)
        restore_longer()
        extra = peak_extra_bytes(step) / GiB if cuda else None
        longer.grad = None
        ms = bench_ms_after_setup(step, restore_longer)
        return Row("liger triton_grpo_loss (inplace)", ms, extra,
                   3 * logits_bytes / (ms * 1e-3) / 1e9 if cuda else None, ms / floor_ms if cuda else None,
                   note=f"loss diff {abs(float(loss) - loss_ref):.1e}, grad relerr {err:.1e}; "
                        f"timed after a restore copy ({restore_ms:.2f} ms, not counted)")

    record(run_guarded("liger triton_grpo_loss (inplace)", liger))

    print_table(title, rows, env)


if __name__ == "__main__":
    main()
