"""Row kernels over the vocabulary, and ``token_logprobs`` built on them.

Two streaming kernels, shared by ``token_logprobs``, ``grpo_loss`` and ``linear_grpo_loss``:

- ``_row_stats_kernel`` (forward, one read of each live row): with ``z = x / tau``,
  ``lse = log sum_v exp(z_v)``, ``logp = z_y - lse`` and the entropy
  ``H = -sum_v p_v log p_v = lse - sum_v p_v z_v`` of ``p = softmax(z)``, all in fp32 with an
  online (running-max) softmax. Rows whose mask is 0 read nothing and report 0.
- ``_row_grad_kernel`` (backward, one read and one write of each row):
  ``dx = g * (onehot(y) - softmax(z)) / tau`` with ``g`` the row's gradient coefficient
  ``dL/dlogp``, written in the gradient's dtype. Rows with ``g == 0`` (masked or clipped tokens)
  read nothing and write zeros. The kernel may write into the buffer it reads (in-place mode).

Work is done in base 2 (``exp2``/``log2``): ``y = x * log2(e) / tau`` is one multiply per element
and ``exp2`` is the hardware instruction ``exp`` would be lowered to anyway.

Rows are addressed as ``(r // rows_per_batch) * stride_b + (r % rows_per_batch) * stride_t`` so that
padded ``[B, T, V]`` logits with any batch/time strides (e.g. ``logits[:, :-1]``) are read without
a copy; only the vocabulary stride must be 1. Per-row arrays (targets, mask, outputs) are indexed by
``r``, or by ``row_idx[r]`` when a row map is given (the linear loss projects only live rows).
"""

from __future__ import annotations

import torch

from . import _common, reference
from ._common import LN2, LOG2E, on_device, row_launch, tl, triton, use_triton
from ._inputs import check_logprob_args, start_target_check

# Globals a @triton.jit function reads must be constexpr objects.
_LN2 = tl.constexpr(LN2)
_LOG2E = tl.constexpr(LOG2E)

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_ids(row_idx_ptr, rows, in_range, ROW_MAP: tl.constexpr):
    """Storage index of each logical row: through the live-row map when there is one."""
    if ROW_MAP:
        idx = tl.load(row_idx_ptr + rows, mask=in_range, other=0).to(tl.int64)
    else:
        idx = rows
    return idx


@triton.jit
def _live_rows(mask_ptr, idx, in_range, HAS_MASK: tl.constexpr):
    """Rows in range whose mask (when there is one) is set."""
    live = in_range
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + idx, mask=in_range, other=0) != 0)
    return live


@triton.jit
def _row_stats_kernel(
    x_ptr, rows_per_batch, stride_b, stride_t,
    row_idx_ptr, tgt_ptr, mask_ptr,
    logp_ptr, ent_ptr, lse_ptr,
    n_rows, V, scale,  # scale = log2(e) / tau
    ROW_MAP: tl.constexpr, HAS_MASK: tl.constexpr, ENTROPY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < n_rows
    idx = _row_ids(row_idx_ptr, rows, in_range, ROW_MAP)
    live = _live_rows(mask_ptr, idx, in_range, HAS_MASK)
    base = (rows // rows_per_batch) * stride_b + (rows % rows_per_batch) * stride_t

    # Running statistics per row, relative to the running max mx of the raw logits x (y = x * scale):
    #   s = sum 2^(y - m),   t = sum 2^(y - m) * (y - m),   m = mx * scale   (t: for the entropy,
    #   kept shifted so logits of magnitude 1e4 do not cancel catastrophically).
    # The shift is taken on the raw logits, (x - mx) * scale, not as x * scale - m: x - mx is exact for
    # the entries near the max (Sterbenz), the ones that carry the probability, while x * scale alone is
    # rounded to an ulp of |y| (~2.4e-4 at |x| = 1e4, tau = 3), an error the entropy (and logp) would
    # inherit whole (seen: entropy off by 5.1e-5 against fp64, LGRPO_TEST_SEED=3816350121).
    mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    # Masked rows skip the vocabulary: the loop runs only if one row of the tile is live.
    n_live = tl.sum(live.to(tl.int32), axis=0)
    v_stop = tl.where(n_live > 0, V, 0)
    for v0 in range(0, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ld = live[:, None] & (cols[None, :] < V)
        x = tl.load(x_ptr + base[:, None] + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32)
        mx_new = tl.maximum(mx, tl.max(x, axis=1))  # the max of y = x * scale too: scale > 0
        # A row (or tile) seen so far only as -inf keeps reference point 0: no inf - inf.
        ref = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        step = (mx - ref) * scale  # <= 0 (-inf while nothing was seen)
        alpha = tl.exp2(step)
        # Clamping at -200 changes nothing (2^-200 is 0 in fp32, as is 2^(anything below -149)) but
        # turns -inf into a finite value, so e * shifted is 0, not NaN.
        shifted = tl.maximum((x - ref[:, None]) * scale, -200.0)
        e = tl.exp2(shifted)
        if ENTROPY:
            # t relative to the new reference: alpha * (t + (m - m_new) * s) + sum e * (y - m_new);
            # the where() drops the 0 * inf term of rows with s = 0 (nothing seen yet).
            carry = tl.where(s > 0, step, 0.0) * s
            t = alpha * (t + carry) + tl.sum(e * shifted, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        mx = mx_new

    tgt = tl.load(tgt_ptr + idx, mask=live, other=0).to(tl.int64)
    valid = live & (tgt >= 0) & (tgt < V)  # out-of-range ids never read; the caller raises on them
    x_t = tl.load(x_ptr + base + tgt, mask=valid, other=0.0).to(tl.float32)
    log2_s = tl.log2(tl.where(s > 0, s, 1.0))  # s = 0 only on rows that are not reported
    lse2 = mx * scale + log2_s
    # y_t - lse2 from the shifted target logit, as the entropy's terms (exact near the max)
    logp = tl.where(valid, ((x_t - mx) * scale - log2_s) * _LN2, float("nan"))
    tl.store(logp_ptr + idx, tl.where(live, logp, 0.0), mask=in_range)
    tl.store(lse_ptr + idx, tl.where(live, lse2 * _LN2, 0.0), mask=in_range)
    if ENTROPY:
        ent = (log2_s - t / tl.where(s > 0, s, 1.0)) * _LN2
        tl.store(ent_ptr + idx, tl.where(live, ent, 0.0), mask=in_range)


@triton.jit
def _row_grad_kernel(
    x_ptr, d_ptr, rows_per_batch, x_sb, x_st, d_sb, d_st,
    row_idx_ptr, tgt_ptr, lse_ptr, coef_ptr, scale_ptr,
    n_rows, V, scale, inv_temp,  # scale = log2(e) / tau
    ROW_MAP: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < n_rows
    idx = _row_ids(row_idx_ptr, rows, in_range, ROW_MAP)
    g = tl.load(coef_ptr + idx, mask=in_range, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr).to(tl.float32)
    need = in_range & (g != 0.0)  # zero coefficient: the row's gradient is 0, nothing to read
    tgt = tl.load(tgt_ptr + idx, mask=need, other=-1).to(tl.int64)
    lse2 = tl.load(lse_ptr + idx, mask=need, other=0.0) * _LOG2E
    gt = g * inv_temp
    x_base = (rows // rows_per_batch) * x_sb + (rows % rows_per_batch) * x_st
    d_base = (rows // rows_per_batch) * d_sb + (rows % rows_per_batch) * d_st
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_v = cols[None, :] < V
        x = tl.load(x_ptr + x_base[:, None] + cols[None, :], mask=need[:, None] & in_v, other=0.0)
        p = tl.exp2(x.to(tl.float32) * scale - lse2[:, None])
        d = (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p) * gt[:, None]
        d = tl.where(need[:, None], d, 0.0)
        tl.store(d_ptr + d_base[:, None] + cols[None, :], d.to(d_ptr.dtype.element_ty),
                 mask=in_range[:, None] & in_v)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def row_addressing(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(rows_per_batch, stride_b, stride_t)`` locating row ``r`` of ``x`` [..., V], or None
    when the rows are not addressable that way (vocabulary stride != 1, or > 3 strided dims)."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return None
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    if x.dim() == 3:
        return max(x.shape[1], 1), x.stride(0), x.stride(1)
    if x.is_contiguous():
        return max(x.numel() // max(x.shape[-1], 1), 1), 0, x.shape[-1]
    return None


def addressable(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its rows are addressable by the row kernels, else a contiguous copy."""
    return x if row_addressing(x) is not None else x.contiguous()


def launch_row_stats(
    x: torch.Tensor, targets: torch.Tensor, temperature: float, logp: torch.Tensor, lse: torch.Tensor,
    *, entropy: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    row_idx: torch.Tensor | None = None,
) -> None:
    """Fill ``logp``, ``lse`` (and ``entropy``) for every row of ``x`` (see ``_row_stats_kernel``).

    ``x``: addressable logits whose rows are enumerated r = 0..n-1; per-row arrays are flat and
    indexed by ``r`` or ``row_idx[r]``; ``mask`` (bool/uint8) marks live rows.
    """
    n_rows, vocab = x.numel() // x.shape[-1], x.shape[-1]
    if row_idx is not None:
        n_rows = row_idx.numel()
    if n_rows == 0:
        return
    rpb, sb, st = row_addressing(x)
    block_r, block_v, warps, grid = row_launch(n_rows, vocab, _common.MAX_BLOCK_V_FWD, big_warps=1)
    with on_device(x):
        _row_stats_kernel[grid](
            x, rpb, sb, st,
            row_idx if row_idx is not None else targets, targets,
            mask.view(torch.uint8) if mask is not None else targets,
            logp, entropy if entropy is not None else logp, lse,
            n_rows, vocab, LOG2E / temperature,
            ROW_MAP=row_idx is not None, HAS_MASK=mask is not None, ENTROPY=entropy is not None,
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
        )


def launch_row_grad(
    x: torch.Tensor, out: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
    temperature: float, *, scale: torch.Tensor | None = None, row_idx: torch.Tensor | None = None,
) -> None:
    """``out = coef[r] * scale * (onehot(target) - softmax(x / tau)) / tau`` row by row.

    ``out`` may be ``x`` itself (in-place); it is addressed with its own strides. ``scale`` is an
    optional 0-d fp32 device tensor (the loss normaliser times the incoming gradient), read by
    the kernel so that the backward never syncs with the host.
    """
    n_rows, vocab = x.numel() // x.shape[-1], x.shape[-1]
    if row_idx is not None:
        n_rows = row_idx.numel()
    if n_rows == 0:
        return
    rpb, xsb, xst = row_addressing(x)
    rpb_out, dsb, dst = row_addressing(out)
    assert rpb_out == rpb, "gradient rows must be laid out like the logits rows"
    block_r, block_v, warps, grid = row_launch(n_rows, vocab, _common.MAX_BLOCK_V_BWD, big_warps=16)
    with on_device(x):
        _row_grad_kernel[grid](
            x, out, rpb, xsb, xst, dsb, dst,
            row_idx if row_idx is not None else targets, targets, lse, coef,
            scale if scale is not None else lse,
            n_rows, vocab, LOG2E / temperature, 1.0 / temperature,
            ROW_MAP=row_idx is not None, HAS_SCALE=scale is not None,
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
        )


# ----------------------------------------------------------------------------------------------
# token_logprobs: custom op (so torch.compile traces through it) + autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("lgrpo::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    x = addressable(logits)
    tgt = targets.reshape(-1)
    finish_check = start_target_check(tgt, x.shape[-1])
    logp = torch.empty(tgt.numel(), dtype=torch.float32, device=x.device)
    lse = torch.empty_like(logp)
    launch_row_stats(x, tgt, temperature, logp, lse)
    finish_check()  # the row pass is queued: this sync leaves the device busy
    return logp.view(targets.shape), lse


@_token_logprobs_fwd.register_fake
def _(logits, targets, temperature):
    return (logits.new_empty(targets.shape, dtype=torch.float32),
            logits.new_empty(targets.numel(), dtype=torch.float32))


@torch.library.custom_op("lgrpo::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(grad_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                        lse: torch.Tensor, temperature: float) -> torch.Tensor:
    x = addressable(logits)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    coef = grad_logp.reshape(-1).to(torch.float32).contiguous()
    launch_row_grad(x, out, targets.reshape(-1), lse, coef, temperature)
    return out


@_token_logprobs_bwd.register_fake
def _(grad_logp, logits, targets, lse, temperature):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _token_logprobs_setup(ctx, inputs, output):
    logits, targets, temperature = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.temperature = temperature
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _token_logprobs_backward(ctx, grad_logp, _grad_lse):
    if grad_logp is None or not ctx.needs_input_grad[0]:
        return None, None, None
    logits, targets, lse = ctx.saved_tensors
    return _token_logprobs_bwd(grad_logp, logits, targets, lse, ctx.temperature), None, None


_token_logprobs_fwd.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)[..., targets]`` in fp32, shape ``targets.shape``.

    Differentiable w.r.t. ``logits`` (``d logp / d logits = (onehot(target) - softmax(z)) / tau``).
    One streaming pass over the vocabulary forward, one read + one write backward. Falls back to
    ``reference.token_logprobs`` where the Triton kernels do not run (see ``_common``).
    """
    if not use_triton(logits):
        return reference.token_logprobs(logits, targets, temperature)
    check_logprob_args(logits, targets, temperature)
    return _token_logprobs_fwd(logits, targets, float(temperature))[0]
