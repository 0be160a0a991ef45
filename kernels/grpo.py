"""Fused GRPO loss from logits (SPEC §2): Triton kernels, launchers, custom ops, public function.

With ``z = logits / tau``, ``logp = log_softmax(z)[y]``, ``r = exp(logp - old)`` (token level) or
``r_i = exp(sum_t m (logp - old) / max(n_i, 1))`` (sequence level, one ratio per sequence),

    L_it = -min(r̂ A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * c_it * kl_it,
    r̂ = min(r, delta) when delta is set,   kl_it = exp(ref - logp) - (ref - logp) - 1,
    c_it = r_it with kl_bias_correction (TRL's use_bias_correction_kl), else 1,

and the loss is ``inv_denom * sum_it w_i m_it L_it`` where ``w_i = 1 / max(n_i, 1)`` for ``grpo``
(else 1) and ``inv_denom`` is ``1/B`` (grpo), ``1/max(sum m, 1)`` (bnpo), ``1/max(num_items, 1)``
(dapo), ``1/(B * max_len)`` (dr_grpo).

Launches, forward: the vocabulary pass ``_row_stats_kernel`` (one read of each live row: logp,
entropy, lse), then two tiny kernels over the N-sized per-token values: ``_token_loss_kernel`` (one
program per sequence: per-token loss, kl, clip flag and ``dL/dlogp``, sequence means) and
``_loss_reduce_kernel`` (one program: the normaliser and the deterministic sum). Backward: the
vocabulary pass ``_row_grad_kernel`` (one read and one write per row) with
``g_row = grad_out * inv_denom * dL/dlogp_row``. No host sync after the argument checks; the
target-id check's one sync is taken after the first pass is queued.

Gradient conventions are those of autograd on the reference: ``torch.minimum`` splits the
gradient at ties (inside the clip range the two terms tie and the full gradient flows),
``clamp`` passes it at its bounds, ``min(r, delta)`` stops it above delta, the sequence-level
ratio passes it through the per-sequence mean, and the KL term contributes
``beta * (1 - exp(ref - logp))``; with ``kl_bias_correction`` it is ``beta * r * kl``, whose
derivative with respect to the token's own log-prob is ``beta * r * (kl + 1 - exp(d)) = -beta * r * d``
(``d = ref - logp``; no cancellation), plus, at sequence level, ``beta * r * kl`` through the mean.
"""

from __future__ import annotations

import torch

from . import reference
from ._api import GRPOLossOutput
from ._common import next_pow2, on_device, tl, triton, use_triton
from ._inputs import grpo_inputs, start_target_check
from .logprobs import _live_rows, _row_ids, addressable, launch_row_grad, launch_row_stats

LOSS_TYPE_CODE = {"grpo": 0, "bnpo": 1, "dapo": 2, "dr_grpo": 3}

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _k3(d):
    """``exp(d) - d - 1`` (the k3 KL estimate) accurate near ``d = 0``.

    The direct form cancels to ~1e-7 absolute in fp32; for |d| < 0.5 the Taylor series
    ``sum_{k=2..10} d^k / k!`` is used instead (truncation < 1e-10 relative).
    """
    p = d * (1.0 / 3628800.0) + 1.0 / 362880.0
    p = p * d + 1.0 / 40320.0
    p = p * d + 1.0 / 5040.0
    p = p * d + 1.0 / 720.0
    p = p * d + 1.0 / 120.0
    p = p * d + 1.0 / 24.0
    p = p * d + 1.0 / 6.0
    p = p * d + 0.5
    series = p * d * d
    direct = tl.exp(d) - d - 1.0
    return tl.where(tl.abs(d) < 0.5, series, direct)


@triton.jit
def _surrogate(log_ratio, adv, lo, hi, delta, HAS_DELTA: tl.constexpr):
    """``S = -min(r̂ A, clip(r, lo, hi) A)`` with ``r = exp(log_ratio)``.

    Returns ``(S, dS/dlog_ratio, clipped)``; the derivative follows autograd on the reference:
    ties of the min split the gradient in halves, clamps pass it at their bounds.
    """
    r = tl.exp(log_ratio)
    if HAS_DELTA:
        r_hat = tl.minimum(r, delta)
        d_hat = tl.where(r <= delta, 1.0, 0.0)
    else:
        r_hat = r
        d_hat = 1.0
    r_clip = tl.minimum(tl.maximum(r, lo), hi)
    d_clip = tl.where((r >= lo) & (r <= hi), 1.0, 0.0)
    unclipped = r_hat * adv
    clipped = r_clip * adv
    w_un = tl.where(unclipped < clipped, 1.0, tl.where(unclipped == clipped, 0.5, 0.0))
    d_min = (w_un * d_hat + (1.0 - w_un) * d_clip) * adv  # d min(...) / d r
    return -tl.minimum(unclipped, clipped), -d_min * r, clipped < unclipped


@triton.jit
def _token_loss_kernel(
    seg_ptr, seg_seq_ptr, seg_len,
    row_idx_ptr, mask_ptr, logp_ptr, old_ptr, ref_ptr, adv_ptr, counts_ptr,
    wloss_ptr, dlogp_ptr, kl_ptr, clip_ptr,
    lo, hi, delta, beta,
    SEG_TABLE: tl.constexpr, SEG_SEQ: tl.constexpr, ROW_MAP: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, USE_KL: tl.constexpr, KL_IS: tl.constexpr,
    HAS_DELTA: tl.constexpr, SEQ_LEVEL: tl.constexpr, SEQ_MEAN: tl.constexpr, COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per segment: rows ``[seg[s], seg[s+1])`` (or ``[s*seg_len, (s+1)*seg_len)``)
    of sequence ``seg_seq[s]`` (or ``s``). Writes per row: ``wloss = w_i m L`` (the loss before
    ``inv_denom``), ``dlogp = d(sum w m L)/dlogp``, ``kl``, ``clipped``.

    ``COUNT``: the segment is a whole sequence; count its live rows into ``counts[seq]``.
    Otherwise ``counts`` holds every sequence's live-row count. ``SEQ_LEVEL`` needs whole
    sequences: the ratio is the exponential of the sequence's mean log-ratio. ``KL_IS``: the KL
    term is weighted by that (unclipped) ratio, gradient through it (``kl_bias_correction``).
    """
    pid = tl.program_id(0)
    if SEG_TABLE:
        start = tl.load(seg_ptr + pid).to(tl.int64)
        end = tl.load(seg_ptr + pid + 1).to(tl.int64)
    else:
        start = pid.to(tl.int64) * seg_len
        end = start + seg_len
    if SEG_SEQ:
        seq = tl.load(seg_seq_ptr + pid).to(tl.int64)
    else:
        seq = pid.to(tl.int64)
    offs = tl.arange(0, BLOCK)

    if COUNT:
        n_vec = tl.zeros([BLOCK], tl.float32)
        for k in range(start, end, BLOCK):
            rows = k + offs
            inb = rows < end
            if HAS_MASK:
                inb = inb & (tl.load(mask_ptr + rows, mask=inb, other=0) != 0)
            n_vec += inb.to(tl.float32)
        n = tl.sum(n_vec, axis=0)
        tl.store(counts_ptr + seq, n)
    else:
        n = tl.load(counts_ptr + seq)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    if SEQ_MEAN:
        w = inv_n
    else:
        w = 1.0

    seq_log_ratio = 0.0
    if SEQ_LEVEL:
        if HAS_OLD:
            acc = tl.zeros([BLOCK], tl.float32)
            for k in range(start, end, BLOCK):
                rows = k + offs
                inb = rows < end
                idx = _row_ids(row_idx_ptr, rows, inb, ROW_MAP)
                live = _live_rows(mask_ptr, idx, inb, HAS_MASK)
                logp = tl.load(logp_ptr + idx, mask=live, other=0.0)
                old = tl.load(old_ptr + idx, mask=live, other=0.0).to(tl.float32)
                acc += tl.where(live, logp - old, 0.0)
            seq_log_ratio = tl.sum(acc, axis=0) * inv_n

    q_vec = tl.zeros([BLOCK], tl.float32)  # sequence level: sum_t w m dS_t / d(mean log-ratio)
    for k in range(start, end, BLOCK):
        rows = k + offs
        inb = rows < end
        idx = _row_ids(row_idx_ptr, rows, inb, ROW_MAP)
        live = _live_rows(mask_ptr, idx, inb, HAS_MASK)
        logp = tl.load(logp_ptr + idx, mask=live, other=0.0)
        adv = tl.load(adv_ptr + idx, mask=live, other=0.0).to(tl.float32)
        if SEQ_LEVEL:
            log_ratio = tl.zeros([BLOCK], tl.float32) + seq_log_ratio
        elif HAS_OLD:
            log_ratio = logp - tl.load(old_ptr + idx, mask=live, other=0.0).to(tl.float32)
        else:
            log_ratio = tl.zeros([BLOCK], tl.float32)  # old = logp.detach(): ratio 1
        surr, d_surr, clip = _surrogate(log_ratio, adv, lo, hi, delta, HAS_DELTA)
        loss = surr
        d_kl = tl.zeros([BLOCK], tl.float32)
        kl = tl.zeros([BLOCK], tl.float32)
        d_kl_ratio = tl.zeros([BLOCK], tl.float32)  # d(KL term)/d(log-ratio), through the ratio
        if HAS_REF:
            diff = tl.load(ref_ptr + idx, mask=live, other=0.0).to(tl.float32) - logp
            kl = _k3(diff)
            if USE_KL:
                if KL_IS:
                    r_kl = beta * tl.exp(log_ratio)
                    loss = loss + r_kl * kl
                    d_kl_ratio = r_kl * kl  # sequence level: through the mean (q below)
                    d_kl = -r_kl * diff  # token level, in total: beta r (kl + 1 - exp(diff))
                else:
                    loss = loss + beta * kl
                    d_kl = -beta * (diff + kl)  # beta * (1 - exp(diff)) = -beta * expm1(diff)
        tl.store(wloss_ptr + idx, tl.where(live, w * loss, 0.0), mask=inb)
        tl.store(kl_ptr + idx, tl.where(live, kl, 0.0), mask=inb)
        tl.store(clip_ptr + idx, (live & clip).to(tl.uint8), mask=inb)
        if SEQ_LEVEL:
            q_vec += tl.where(live, w * (d_surr + d_kl_ratio), 0.0)
        else:
            tl.store(dlogp_ptr + idx, tl.where(live, w * (d_surr + d_kl), 0.0), mask=inb)

    if SEQ_LEVEL:
        # d(mean log-ratio)/d logp_t = m_t / max(n, 1): every live token gets q / max(n, 1).
        q = tl.sum(q_vec, axis=0) * inv_n
        for k in range(start, end, BLOCK):
            rows = k + offs
            inb = rows < end
            idx = _row_ids(row_idx_ptr, rows, inb, ROW_MAP)
            live = _live_rows(mask_ptr, idx, inb, HAS_MASK)
            g = tl.zeros([BLOCK], tl.float32) + q
            if USE_KL:
                logp = tl.load(logp_ptr + idx, mask=live, other=0.0)
                diff = tl.load(ref_ptr + idx, mask=live, other=0.0).to(tl.float32) - logp
                if KL_IS:  # the direct part, beta r (1 - exp(diff)); the ratio's part is in q
                    g += -w * beta * tl.exp(seq_log_ratio) * (diff + _k3(diff))
                else:
                    g += -w * beta * (diff + _k3(diff))
            tl.store(dlogp_ptr + idx, tl.where(live, g, 0.0), mask=inb)


@triton.jit
def _loss_reduce_kernel(
    wloss_ptr, counts_ptr, num_items_ptr, loss_ptr, inv_ptr,
    n_rows, n_seqs, host_inv,
    LOSS_TYPE: tl.constexpr, HAS_LOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: ``inv_denom`` for the loss type, and ``loss = inv_denom * sum(wloss)`` summed
    in a fixed order (deterministic, unlike atomics). ``host_inv`` is the normaliser when the host
    knows it (grpo: 1/B, dr_grpo: 1/(B max_len))."""
    offs = tl.arange(0, BLOCK)
    if LOSS_TYPE == 1:  # bnpo: all live tokens of the batch
        acc = tl.zeros([BLOCK], tl.float32)
        for k in range(0, n_seqs, BLOCK):
            acc += tl.load(counts_ptr + k + offs, mask=k + offs < n_seqs, other=0.0)
        inv = 1.0 / tl.maximum(tl.sum(acc, axis=0), 1.0)
    elif LOSS_TYPE == 2:  # dapo: caller's global token count (default: this batch's)
        inv = 1.0 / tl.maximum(tl.load(num_items_ptr).to(tl.float32), 1.0)
    else:  # grpo, dr_grpo: known on the host
        inv = host_inv
    tl.store(inv_ptr, inv)
    if HAS_LOSS:
        acc = tl.zeros([BLOCK], tl.float32)
        for k in range(0, n_rows, BLOCK):
            acc += tl.load(wloss_ptr + k + offs, mask=k + offs < n_rows, other=0.0)
        tl.store(loss_ptr, tl.sum(acc, axis=0) * inv)


# ----------------------------------------------------------------------------------------------
# Launchers (shared with linear_grpo)
# ----------------------------------------------------------------------------------------------


def launch_token_loss(
    logp: torch.Tensor, advantages: torch.Tensor, old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None, counts: torch.Tensor, out: dict[str, torch.Tensor], *,
    n_segments: int, seg_len: int = 0, seg_bounds: torch.Tensor | None = None,
    seg_seq: torch.Tensor | None = None, row_idx: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, count: bool, eps_low: float, eps_high: float,
    delta: float | None, beta: float, sequence_level: bool, per_seq_mean: bool, max_seg_len: int,
    kl_bias_correction: bool = False,
) -> None:
    """Per-token loss terms over ``n_segments`` segments (see ``_token_loss_kernel``).

    ``out`` holds the flat fp32 outputs ``wloss``, ``dlogp``, ``kl`` and the bool ``clipped``.
    """
    if n_segments == 0:
        return
    block = min(512, max(16, next_pow2(max_seg_len)))
    any_t = logp
    with on_device(logp):
        _token_loss_kernel[(n_segments,)](
            seg_bounds if seg_bounds is not None else any_t, seg_seq if seg_seq is not None else any_t,
            seg_len,
            row_idx if row_idx is not None else any_t, mask.view(torch.uint8) if mask is not None else any_t,
            logp, old_logp if old_logp is not None else any_t, ref_logp if ref_logp is not None else any_t,
            advantages, counts,
            out["wloss"], out["dlogp"], out["kl"], out["clipped"].view(torch.uint8),
            1.0 - eps_low, 1.0 + eps_high, 0.0 if delta is None else delta, beta,
            SEG_TABLE=seg_bounds is not None, SEG_SEQ=seg_seq is not None, ROW_MAP=row_idx is not None,
            HAS_MASK=mask is not None, HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None,
            USE_KL=beta > 0, KL_IS=kl_bias_correction, HAS_DELTA=delta is not None,
            SEQ_LEVEL=sequence_level, SEQ_MEAN=per_seq_mean,
            COUNT=count, BLOCK=block, num_warps=4,
        )


def launch_loss_reduce(
    wloss: torch.Tensor | None, counts: torch.Tensor, num_items: torch.Tensor, loss: torch.Tensor,
    inv_denom: torch.Tensor, *, n_seqs: int, max_len: int, loss_type: str,
) -> None:
    """``inv_denom`` (0-d) for ``loss_type``, and ``loss = inv_denom * sum(wloss)`` when given."""
    n_rows = wloss.numel() if wloss is not None else 0
    host_inv = 1.0 / n_seqs if loss_type == "grpo" else 1.0 / (n_seqs * max_len)
    with on_device(counts):
        _loss_reduce_kernel[(1,)](
            wloss if wloss is not None else counts, counts, num_items, loss, inv_denom,
            n_rows, n_seqs, host_inv,
            LOSS_TYPE=LOSS_TYPE_CODE[loss_type], HAS_LOSS=wloss is not None, BLOCK=1024, num_warps=4,
        )


def token_outputs(n_rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Flat per-token buffers written by ``launch_token_loss`` (every row gets written)."""
    f32 = dict(dtype=torch.float32, device=device)
    return dict(wloss=torch.empty(n_rows, **f32), dlogp=torch.empty(n_rows, **f32),
                kl=torch.empty(n_rows, **f32), clipped=torch.empty(n_rows, dtype=torch.bool, device=device))


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd
# ----------------------------------------------------------------------------------------------

_FWD_OUT = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                 torch.Tensor, torch.Tensor]


@torch.library.custom_op("lgrpo::grpo_loss_fwd", mutates_args=())
def _grpo_fwd(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
    old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    num_items: torch.Tensor, temperature: float, eps_low: float, eps_high: float, delta: float | None,
    beta: float, loss_type: str, sequence_level: bool, max_len: int, n_seqs: int, inplace_grad: bool,
    kl_bias_correction: bool,
) -> _FWD_OUT:
    """Flat inputs from ``grpo_inputs``. Returns (loss, logp, entropy, kl, clipped, lse, dlogp,
    inv_denom); the last three are kept for the backward."""
    del inplace_grad  # read by the autograd set-up
    n_rows, vocab = targets.numel(), logits.shape[-1]
    device = logits.device
    finish_check = start_target_check(targets, vocab, mask)
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
    launch_row_stats(logits, targets, temperature, logp, lse, entropy=entropy, mask=mask)
    finish_check()  # the vocabulary pass is queued: this sync leaves the device busy

    out = token_outputs(n_rows, device)
    counts = torch.empty(n_seqs, dtype=torch.float32, device=device)
    seg_len = 0 if cu_seqlens is not None else (n_rows // n_seqs)
    launch_token_loss(
        logp, advantages, old_logp, ref_logp, counts, out, n_segments=n_seqs, seg_len=seg_len,
        seg_bounds=cu_seqlens, mask=mask, count=True, eps_low=eps_low, eps_high=eps_high, delta=delta,
        beta=beta, sequence_level=sequence_level, per_seq_mean=loss_type == "grpo",
        max_seg_len=seg_len if cu_seqlens is None else max(n_rows // n_seqs, 1),
        kl_bias_correction=kl_bias_correction,
    )
    loss = torch.empty((), dtype=torch.float32, device=device)
    inv_denom = torch.empty_like(loss)
    launch_loss_reduce(out["wloss"], counts, num_items, loss, inv_denom, n_seqs=n_seqs, max_len=max_len,
                       loss_type=loss_type)
    return loss, logp, entropy, out["kl"], out["clipped"], lse, out["dlogp"], inv_denom


@_grpo_fwd.register_fake
def _(logits, targets, mask, advantages, old_logp, ref_logp, cu_seqlens, num_items, temperature, eps_low,
      eps_high, delta, beta, loss_type, sequence_level, max_len, n_seqs, inplace_grad, kl_bias_correction):
    n = targets.numel()
    f = logits.new_empty(n, dtype=torch.float32)
    scalar = logits.new_empty((), dtype=torch.float32)
    return (scalar, f, torch.empty_like(f), torch.empty_like(f), logits.new_empty(n, dtype=torch.bool),
            torch.empty_like(f), torch.empty_like(f), torch.empty_like(scalar))


@torch.library.custom_op("lgrpo::grpo_loss_bwd", mutates_args=())
def _grpo_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
              dlogp: torch.Tensor, inv_denom: torch.Tensor, temperature: float) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    scale = grad_loss.to(torch.float32) * inv_denom
    launch_row_grad(logits, out, targets, lse, dlogp, temperature, scale=scale)
    return out


@_grpo_bwd.register_fake
def _(grad_loss, logits, targets, lse, dlogp, inv_denom, temperature):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("lgrpo::grpo_loss_bwd_inplace", mutates_args=("logits",))
def _grpo_bwd_inplace(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                      lse: torch.Tensor, dlogp: torch.Tensor, inv_denom: torch.Tensor,
                      temperature: float) -> None:
    scale = grad_loss.to(torch.float32) * inv_denom
    launch_row_grad(logits, logits, targets, lse, dlogp, temperature, scale=scale)


@_grpo_bwd_inplace.register_fake
def _(grad_loss, logits, targets, lse, dlogp, inv_denom, temperature):
    return None


def _grpo_setup(ctx, inputs, output):
    logits, targets = inputs[0], inputs[1]
    lse, dlogp, inv_denom = output[5], output[6], output[7]
    ctx.save_for_backward(logits, targets, lse, dlogp, inv_denom)
    ctx.temperature = inputs[8]
    ctx.inplace = inputs[17]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _grpo_backward(ctx, grad_loss, *_unused):
    nones = (None,) * 18
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None, *nones)
    logits, targets, lse, dlogp, inv_denom = ctx.saved_tensors
    if ctx.inplace:
        _grpo_bwd_inplace(grad_loss, logits, targets, lse, dlogp, inv_denom, ctx.temperature)
        # A fresh alias (not the saved tensor itself) so that autograd's AccumulateGrad can adopt it
        # as a leaf's .grad without a copy: in-place mode then allocates nothing, even for leaves.
        return (logits.detach(), *nones)
    return (_grpo_bwd(grad_loss, logits, targets, lse, dlogp, inv_denom, ctx.temperature), *nones)


_grpo_fwd.register_autograd(_grpo_backward, setup_context=_grpo_setup)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    loss_type: str = "dapo",
    importance_level: str = "token",
    max_len: int | None = None,
    num_items: int | float | torch.Tensor | None = None,
    kl_bias_correction: bool = False,
    inplace_grad: bool = False,
) -> GRPOLossOutput:
    """GRPO clipped-surrogate loss (SPEC §2) from logits ``[B, T, V]`` (mask ``[B, T]``) or packed
    ``[N, V]`` with ``cu_seqlens [B+1]``; formula in the module docstring.

    Returns ``GRPOLossOutput``: ``.loss`` (fp32 scalar, differentiable w.r.t. ``logits``) and the
    detached per-token ``.logp``, ``.entropy``, ``.kl``, ``.clipped`` (0/False where mask is 0).

    ``kl_bias_correction=True`` weights the KL term by the importance ratio, ``beta * r * kl`` (TRL
    1.16's default ``use_bias_correction_kl``; ``r`` unclipped, at ``importance_level``, gradient
    through it: even on-policy, where ``r = 1``, the KL gradient changes). ``.kl`` stays the plain k3.

    ``inplace_grad=True`` writes the gradient into the logits' own buffer during backward and
    hands that buffer to autograd as ``d loss / d logits``: no gradient buffer is allocated, and
    **the logits are destroyed** (their values are replaced by the gradient). Use it only when
    nothing else reads the logits after the loss (their producer's backward, e.g. the lm_head
    matmul, does not). Padded logits may be any ``[B, T, V]`` view with a unit vocabulary stride
    (e.g. ``logits[:, P-1:-1]``, the rows that predict a completion after P prompt tokens); no copy is made.

    Falls back to ``reference.grpo_loss`` where the Triton kernels do not run (no CUDA and no
    interpreter, or fp64 logits).
    """
    if not use_triton(logits):
        return reference.grpo_loss(
            logits, targets, advantages, mask, old_logp, ref_logp, cu_seqlens=cu_seqlens,
            temperature=temperature, eps_low=eps_low, eps_high=eps_high, delta=delta, beta=beta,
            loss_type=loss_type, importance_level=importance_level, max_len=max_len, num_items=num_items,
            kl_bias_correction=kl_bias_correction,
        )
    inp = grpo_inputs(
        logits.shape[:-1], logits.shape[-1], logits.device, targets, advantages, mask, old_logp, ref_logp,
        cu_seqlens=cu_seqlens, temperature=temperature, eps_low=eps_low, eps_high=eps_high, delta=delta,
        beta=beta, loss_type=loss_type, importance_level=importance_level, max_len=max_len,
        num_items=num_items, kl_bias_correction=kl_bias_correction,
        check_target_ids=False,  # checked inside the op, without idling the GPU
    )
    loss, logp, entropy, kl, clipped, *_ = _grpo_fwd(
        addressable(logits), inp.targets, inp.mask, inp.advantages, inp.old_logp, inp.ref_logp,
        cu_seqlens, inp.num_items, float(temperature), float(eps_low), float(eps_high),
        None if delta is None else float(delta), float(beta), loss_type, importance_level == "sequence",
        inp.max_len, inp.n_seqs, bool(inplace_grad), bool(kl_bias_correction),
    )
    shape = inp.token_shape
    return GRPOLossOutput(loss=loss, logp=logp.view(shape), entropy=entropy.view(shape), kl=kl.view(shape),
                          clipped=clipped.view(shape))
