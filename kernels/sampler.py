"""The rollout engine's sampler: one pass over ``[B, V]`` logits in one Triton kernel.

Sampling is Gumbel-max in its exponential-race form::

    token = argmax_v  logit_v / T - log E_v,      E_v ~ Exp(1)

which draws ``v`` with probability ``softmax(logit / T)_v`` exactly. ``E_v`` comes from counter-based
noise: Philox4x32-10 keyed by ``(seed, step)`` (:func:`sampler_key`) with the counter
``(v, position, row id)``, so a token is a pure function of (seed, step, row id, position) and the
row's logits: the same on any number of ranks, in any batch, after a resume, and the same whether
the kernel or its PyTorch twin (:func:`lgrpo.kernels.reference.sample_tokens`) ran. The uniform
behind ``E`` has 64 random bits and ``E`` is computed in fp64, so the race is resolved far below
any probability a policy can put on a token (a token ~44 nats under the best one can still win).

One program handles a ``[BLOCK_R, BLOCK_V]`` tile of rows and walks the vocabulary with a running
(max, argmax) per lane; nothing is written but the id and a flag per row. Variants are compile-time
switches: ``GREEDY`` (argmax of the logits, lowest id on ties, as ``torch.argmax``) and
``HAS_BANNED`` (ids that are never drawn: a VLM's vision placeholders).

Everything a call varies — the key, the positions, the temperature — is read from device memory,
so a CUDA graph that captured one launch replays correctly for every later step and call.

A row is *empty* when it has nothing to draw from: a NaN or +inf logit among the allowed ids (the
softmax is undefined) or no finite one. Its id is 0; the caller raises (``NonFiniteLogitsError``).
"""

from __future__ import annotations

import torch

from . import _common, reference
from ._common import next_pow2, on_device, tl, triton

_M64 = (1 << 64) - 1
MAX_BLOCK_V = 2048  # vocabulary tile of one program (module-level so tests can walk several tiles)
ROW_TILE = 2048  # elements per program when rows are short
# The interpreter pays per operation, not per element: far bigger tiles there keep CPU tests fast.
INTERPRETED_ROW_TILE = 1 << 16

# Philox4x32 constants (the same as triton.language.random and the PyTorch twin).
_TWO_M64 = tl.constexpr(5.421010862427522e-20)  # 2^-64
_SERIES_BELOW = tl.constexpr(2.0**-20)  # below this, -log(1 - w) is summed as a series
_ONE_MINUS_W_MIN = tl.constexpr(2.0**-60)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sampler_key(seed: int, step: int) -> tuple[int, int]:
    """The two 32-bit halves of the Philox key for ``(seed, step)`` (any Python ints)."""
    k = _splitmix64(_splitmix64(seed & _M64) ^ (step & _M64))
    return k & 0xFFFFFFFF, k >> 32


def key_tensor(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`sampler_key` as the int64 ``[2]`` tensor the kernel reads."""
    return torch.tensor(sampler_key(seed, step), dtype=torch.int64, device=device)


@triton.jit
def _sample_kernel(logits_ptr, stride_l, n_rows, V, key_ptr, row_ptr, pos_ptr, stride_pos, temp_ptr, banned_ptr,
                   out_ptr, empty_ptr, GREEDY: tl.constexpr, HAS_BANNED: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.uint32)
    if not GREEDY:
        k0 = tl.load(key_ptr).to(tl.uint32)
        k1 = tl.load(key_ptr + 1).to(tl.uint32)
        row_id = tl.load(row_ptr + rows64, mask=in_rows, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + rows64 * stride_pos, mask=in_rows, other=0).to(tl.int64)
        c1 = zero + pos.to(tl.uint32)[:, None]
        c2 = zero + (row_id & 0xFFFFFFFF).to(tl.uint32)[:, None]
        c3 = zero + ((row_id >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None]
        inv_t = 1.0 / tl.load(temp_ptr).to(tl.float64)
    best = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float64)
    best_idx = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.int32)
    bad = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.int32)
    live = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        in_cols = cols < V
        m = in_rows[:, None] & in_cols[None, :]
        x = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :], mask=m,
                    other=float("-inf")).to(tl.float32)
        if HAS_BANNED:
            ban = tl.load(banned_ptr + cols, mask=in_cols, other=1) != 0
            x = tl.where(ban[None, :], float("-inf"), x)
        bad += ((x != x) | (x == float("inf"))).to(tl.int32)
        live += ((x > float("-inf")) & (x < float("inf"))).to(tl.int32)
        if GREEDY:
            key = x.to(tl.float64)
        else:
            r0, r1, _, _ = tl.philox_impl(zero + cols.to(tl.uint32)[None, :], c1, c2, c3, k0, k1)
            # w uniform in (0, 1) from 64 bits; E = -log(1 - w) ~ Exp(1), accurate for small E.
            w = (r0.to(tl.float64) * 4294967296.0 + r1.to(tl.float64) + 0.5) * _TWO_M64
            series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0)))
            e = tl.where(w < _SERIES_BELOW, series, -tl.log(tl.maximum(1.0 - w, _ONE_MINUS_W_MIN)))
            key = x.to(tl.float64) * inv_t - tl.log(e)
        take = key > best  # strict: each lane keeps its first maximum
        best = tl.where(take, key, best)
        best_idx = tl.where(take, cols, best_idx)
    row_best = tl.max(best, axis=1)
    idx = tl.min(tl.where(best == row_best[:, None], best_idx, V), axis=1)
    empty = (tl.sum(bad, axis=1) > 0) | (tl.sum(live, axis=1) == 0)
    idx = tl.where(empty | (idx >= V), 0, idx)
    tl.store(out_ptr + rows64, idx.to(tl.int64), mask=in_rows)
    tl.store(empty_ptr + rows64, empty.to(tl.int8), mask=in_rows)


def _check(logits, key, row_ids, positions, temperature, banned):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    n, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    if key.shape != (2,) or key.dtype != torch.int64:
        raise ValueError(f"key must be an int64 [2] tensor (key_tensor), got {key.dtype} {tuple(key.shape)}")
    if row_ids.shape != (n,):
        raise ValueError(f"row_ids must be [B={n}], got shape {tuple(row_ids.shape)}")
    if positions.shape != (n,):
        raise ValueError(f"positions must be [B={n}] (an expanded scalar is fine), got {tuple(positions.shape)}")
    if temperature.numel() != 1:
        raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
    if banned is not None and banned.shape != (v,):
        raise ValueError(f"banned must be a [V={v}] mask, got shape {tuple(banned.shape)}")


def sample_tokens(
    logits: torch.Tensor,
    key: torch.Tensor,
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    temperature: torch.Tensor,
    banned: torch.Tensor | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V] and a bool [B] that marks rows with nothing to draw from.

    ``key``: :func:`key_tensor` (seed, step); ``row_ids`` [B] int64 global row ids; ``positions`` [B]
    int64 positions in the completion (``j.expand(B)`` shares one); ``temperature`` a one-element
    float tensor; ``banned`` a bool/int8 [V] mask of ids never drawn. ``greedy`` ignores the noise
    and the temperature (argmax, lowest id on ties). All tensors on the logits' device.
    Triton on CUDA (or under the interpreter), the PyTorch twin elsewhere: the same ids.
    """
    _check(logits, key, row_ids, positions, temperature, banned)
    if not _common.use_triton(logits):
        return reference.sample_tokens(logits, key, row_ids, positions, temperature, banned, greedy)
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    empty = torch.empty(n, dtype=torch.int8, device=logits.device)
    if n == 0:
        return out, empty.bool()
    block_v = min(next_pow2(v), MAX_BLOCK_V)
    tile = INTERPRETED_ROW_TILE if _common.INTERPRET and not logits.is_cuda else ROW_TILE
    block_r = max(1, min(tile // block_v, next_pow2(n)))
    num_warps = 8 if block_r * block_v >= 2048 else 4
    ban = banned.to(torch.int8) if banned is not None and banned.dtype == torch.bool else banned
    with on_device(logits):
        _sample_kernel[(triton.cdiv(n, block_r),)](
            logits, logits.stride(0), n, v, key, row_ids, positions, positions.stride(0), temperature,
            ban if ban is not None else out, out, empty, GREEDY=greedy, HAS_BANNED=ban is not None,
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps)
    return out, empty.bool()
