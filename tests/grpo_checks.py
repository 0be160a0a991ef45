"""Helpers shared by the kernel tests: random GRPO inputs and comparison with the fp64 reference.

The truth is always the reference run in fp64 on the *same* (upcast) inputs, so a bf16 kernel is
judged against what exact arithmetic would make of its bf16 inputs.
"""

from __future__ import annotations

import pytest
import torch
from lgrpo.kernels import _common
from lgrpo.kernels import reference as ref

# Per-token values (logp, entropy, kl, loss) come from fp32 arithmetic on exactly upcast inputs
# whatever the logits dtype; the gradient is rounded once to the logits' dtype.
VALUE_RTOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def small_tiles(monkeypatch):
    """Vocabulary tiles of 16/32 so a small V walks several tiles with a ragged last one."""
    monkeypatch.setattr(_common, "MAX_BLOCK_V_FWD", 16)
    monkeypatch.setattr(_common, "MAX_BLOCK_V_BWD", 32)


@pytest.fixture
def one_row_programs(small_tiles, monkeypatch):
    """One row per program, as on a GPU with V = 152k (small_tiles + no row packing)."""
    monkeypatch.setattr(_common, "ROW_TILE", 1)


def grpo_case(gen, B=3, T=5, V=37, *, dtype=torch.float32, scale=2.0, per_token_adv=False, old=True,
              ref_logp=True, all_masked_seq=True, mask_p=0.7):
    """Padded random inputs: logits [B,T,V], an all-masked last sequence, -100 at masked targets."""
    logits = (torch.randn(B, T, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < mask_p
    mask[0, 0] = True
    if all_masked_seq and B > 1:
        mask[-1] = False
    targets[~mask] = -100  # never read
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=gen)
    # old/ref near the current log-probs so ratios straddle the clip range
    with torch.no_grad():
        lp = ref.token_logprobs(logits.double(), targets.clamp(min=0)).float()
    old_lp = (lp + 0.3 * torch.randn(B, T, generator=gen)) if old else None
    ref_lp = (lp + 0.3 * torch.randn(B, T, generator=gen)) if ref_logp else None
    return dict(logits=logits, targets=targets, advantages=adv, mask=mask, old_logp=old_lp, ref_logp=ref_lp)


def fp64(t):
    return t.double() if t is not None and t.is_floating_point() else t


def run_loss(fn, case, grad_scale=1.0, **options):
    """Loss output and d(grad_scale * loss)/d logits of ``fn`` (kernel or reference)."""
    logits = case["logits"].detach().clone().requires_grad_()
    args = {k: v for k, v in case.items() if k != "logits"}
    out = fn(logits, **args, **options)
    (out.loss * grad_scale).backward()
    return out, logits.grad


def run_reference64(case, grad_scale=1.0, **options):
    case64 = {k: fp64(v) for k, v in case.items()}
    options = {k: fp64(v) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    return run_loss(ref.grpo_loss, case64, grad_scale, **options)


def assert_close_rel(got, want, rtol, atol_scale=None, what=""):
    """|got - want| <= rtol * |want| + rtol * max|want| (or rtol * atol_scale)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if atol_scale is None else atol_scale
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-12),
                               msg=lambda m: f"{what}: {m}")


def assert_matches_reference(out, grad, want, want_grad, dtype, *, value_rtol=VALUE_RTOL, grad_tol=None):
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close_rel(out.loss, want.loss, value_rtol, atol_scale=1.0, what="loss")
    for name in ("logp", "entropy", "kl"):
        got_t, want_t = getattr(out, name), getattr(want, name)
        assert got_t.shape == want_t.shape and got_t.dtype == torch.float32, name
        assert_close_rel(got_t, want_t, value_rtol, atol_scale=max(1.0, want_t.abs().max().item()), what=name)
    assert torch.equal(out.clipped, want.clipped), "clipped flags differ"
    assert grad.dtype == dtype and grad.shape == want_grad.shape
    assert_close_rel(grad, want_grad, grad_tol or GRAD_TOL[dtype], what="d loss / d logits")
