"""The top-p sampler of rollouts (the hf path's, and the engine's with ``top_p < 1``): a pure function of
``(seed, step, row id, position)`` and the logits.

Each row draws one counter-based uniform number per position and inverts the CDF of
``softmax(logits / T)`` (after top-p). The same prompt therefore gets the same completion on any
number of ranks, in any batch composition, and after a resume — which is what makes "2 ranks ==
1 rank" and "N steps == K steps + resume" exact.

The CDF is built from the probabilities as 61-bit fixed-point integers. Integer sums are exact in
any order, so the CDF is exactly monotone, the same however a scan is split into blocks, and the
same whatever else is in the batch; a token of probability 0 (a banned id, a ``-inf`` logit,
outside the nucleus) can never be drawn. The price is that tokens below 2^-61 ≈ 4e-19 are
treated as 0 (their total mass is under 1e-13 at V = 152k).

Speed: every pass is an elementwise or row-blocked op. Torch's CUDA scan along the last dimension of
a tensor with few long rows runs on one thread block (pytorch/pytorch#122170): a plain
``cumsum`` over [16, 152064] takes milliseconds, so rows are scanned as [16 x 149, 1024] blocks
plus a short scan of the block totals. The uniforms of a whole rollout are computed once, on the
host, and copied to the device once: nothing in a decoding step waits for the GPU.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
PROB_ONE = 2**61  # fixed-point scale of a probability: 1.0 -> 2^61; a row's sum stays below 2^62
SCAN_BLOCK = 1024  # elements per block of the blocked row scan


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2^32.

    The multipliers are below 2^31 so every product stays below 2^63: no signed overflow, hence the
    same bits on CPU and CUDA.
    """
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seed: int, step: int, row_ids: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64, determined by (seed, step, row id, position).

    ``position`` an int: one number per row, shape of ``row_ids``. A 1-D tensor of positions: a
    table ``[len(row_ids), len(position)]``.
    """
    row_ids = torch.as_tensor(row_ids, dtype=torch.long)
    if isinstance(position, torch.Tensor):
        row_ids, position = row_ids.unsqueeze(-1), position.to(row_ids.device, torch.long).unsqueeze(0)
    else:
        position = torch.full_like(row_ids, position)
    h = _mix32(
        torch.full_like(row_ids, seed & _MASK32) ^ _mix32(torch.full_like(row_ids, (seed >> 32) + 0x9E3779B9))
    )
    h = _mix32(h ^ _mix32(torch.full_like(row_ids, step & _MASK32) + 0x632BE5AB))
    h = _mix32(h ^ _mix32(row_ids & _MASK32) ^ _mix32((row_ids >> 32) + 0x85EBCA6B))
    h = _mix32(h ^ _mix32((position & _MASK32) + 0xC2B2AE35))
    return (h.double() + 0.5) / 2**32


def row_cumsum(
    x: torch.Tensor, block: int = SCAN_BLOCK, *, keep_padding: bool = False, blocked: bool | None = None
) -> torch.Tensor:
    """Inclusive prefix sums along the last dim of an integer ``[B, V]`` tensor, scanned in blocks.

    Exact for integers, so equal to ``x.cumsum(-1)`` bit for bit; the blocks only make the scan
    parallel over ``B x V / block`` rows instead of ``B`` (see the module docstring). With
    ``keep_padding`` the result is ``[B, V rounded up to the block]`` (contiguous; the padding repeats
    the row total) instead of a non-contiguous slice. ``blocked`` defaults to True on CUDA only: a
    CPU scan has no one-block pathology, and one pass is cheaper there (same bits either way).
    """
    n_rows, width = x.shape
    pad = (-width) % block
    if not (x.is_cuda if blocked is None else blocked):
        return torch.nn.functional.pad(x, (0, pad)).cumsum(-1) if keep_padding else x.cumsum(-1)
    blocks = torch.nn.functional.pad(x, (0, pad)).view(n_rows, -1, block)
    within = blocks.cumsum(-1)
    totals = within[..., -1]
    before = totals.cumsum(-1) - totals  # mass of the earlier blocks of the row
    out = (within + before.unsqueeze(-1)).view(n_rows, -1)
    return out if keep_padding else out[:, :width]


def fixed_point_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """``softmax(logits / temperature)`` as int64 multiples of 2^-61, 0 outside the top-p nucleus.

    With top_p < 1 the smallest set of most likely tokens whose mass reaches top_p is kept (the most
    likely token always); ties are ordered by token id, so the nucleus is a function of the row
    alone. A row without a finite logit (all -inf, or NaN) is all zeros.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # fp32 -> fp64 and the power-of-two scale are exact; the cast truncates below 2^-61.
    weights = (probs.nan_to_num_(0.0).double() * PROB_ONE).long()
    if top_p < 1.0:
        w_sorted, order = weights.sort(dim=-1, descending=True, stable=True)
        inclusive = row_cumsum(w_sorted)
        above = inclusive - w_sorted  # mass strictly above each token
        outside = above.double() >= top_p * inclusive[:, -1:].double()
        weights = weights.scatter(-1, order, w_sorted.masked_fill(outside, 0))
    return weights


def sample_from_logits(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B] drawn by inverse CDF from ``softmax(logits / temperature)`` restricted to top-p,
    and a bool [B] that is True for rows that had nothing to draw from (no finite logit).

    ``u`` [B] uniform in (0, 1). Exact: P(id = v) = w_v / sum(w) for the fixed-point weights w of
    :func:`fixed_point_probs`, up to the 2^-52 resolution of ``u x sum(w)``. Never a token of
    weight 0. A row with nothing to draw from gets id 0.
    """
    # The padding after the last token repeats the total, which no target reaches.
    cdf = row_cumsum(fixed_point_probs(logits, temperature, top_p), keep_padding=True)
    total = cdf[:, -1]
    empty = total <= 0
    # target in [0, total): the first token whose CDF exceeds it has weight > 0
    target = (u.to(cdf.device, torch.float64) * total.double()).long()
    target = torch.minimum(target, total - 1).clamp_(min=0)
    idx = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    return idx.masked_fill_(empty, 0), empty
