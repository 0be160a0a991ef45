"""Pure-PyTorch reference of every public kernel: the CPU fallback and the tests' oracle.

Written for clarity, straight from the formulas of SPEC §2-3; it materialises whatever it needs.
Compute precision is fp32 whatever the input dtype, or fp64 when the inputs are fp64, so the tests
get their fp64 truth by calling these functions on upcast inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._api import GRPOLossOutput
from ._inputs import check_group_rewards, check_listener_inputs, check_logprob_args, check_targets, grpo_inputs


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)[..., targets]`` in fp32, shape ``targets.shape``.

    Differentiable w.r.t. ``logits``; row ``t`` of the logits predicts ``targets[t]`` (no shift).
    """
    check_logprob_args(logits, targets, temperature)
    check_targets(targets, logits.shape[-1])
    z = logits.to(_compute_dtype(logits)) / temperature
    return z.log_softmax(-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


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
    """GRPO clipped-surrogate loss (SPEC §2) from logits ``[B, T, V]`` or packed ``[N, V]``.

    ``L_it = -min(r̂ A, clip(r, 1-eps_low, 1+eps_high) A) + beta * kl_it``, aggregated by
    ``loss_type``; with ``kl_bias_correction`` the KL term is ``beta * r_it * kl_it`` (TRL's
    ``use_bias_correction_kl``: ``r`` the unclipped ratio at the chosen level, gradient through it).
    ``inplace_grad`` is accepted for signature parity with the Triton version and ignored here.
    """
    del inplace_grad
    vocab = logits.shape[-1]
    inp = grpo_inputs(
        logits.shape[:-1], vocab, logits.device, targets, advantages, mask, old_logp, ref_logp,
        cu_seqlens=cu_seqlens, temperature=temperature, eps_low=eps_low, eps_high=eps_high, delta=delta,
        beta=beta, loss_type=loss_type, importance_level=importance_level, max_len=max_len,
        num_items=num_items, kl_bias_correction=kl_bias_correction,
    )
    dtype = _compute_dtype(logits)
    rows = inp.mask.nonzero().squeeze(-1)  # only masked-in rows are computed; the rest report 0

    z = logits.reshape(-1, vocab).index_select(0, rows).to(dtype) / temperature
    log_probs = z.log_softmax(-1)
    logp_rows = log_probs.gather(-1, inp.targets[rows].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        probs = log_probs.exp()
        entropy_rows = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)

    def scatter(values: torch.Tensor) -> torch.Tensor:  # [rows] -> [N], zeros where masked
        return torch.zeros(inp.n_rows, dtype=values.dtype, device=values.device).index_put((rows,), values)

    logp = scatter(logp_rows)
    m = inp.mask.to(dtype)
    old = logp.detach() if inp.old_logp is None else torch.where(inp.mask, inp.old_logp.to(dtype), 0)
    log_ratio = logp - old
    if importance_level == "sequence":
        per_seq = inp.seq_sum(m * log_ratio) / inp.seq_lengths(dtype).clamp(min=1)
        log_ratio = per_seq[inp.seq_id]
    ratio = torch.exp(log_ratio)
    ratio_hat = ratio.clamp(max=delta) if delta is not None else ratio
    adv = inp.advantages.to(dtype)
    unclipped = ratio_hat * adv
    clipped_term = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped_term)

    kl = torch.zeros_like(logp)
    if inp.ref_logp is not None:
        d = torch.where(inp.mask, inp.ref_logp.to(dtype) - logp, 0)
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * (ratio * kl if kl_bias_correction else kl)
    per_token = torch.where(inp.mask, per_token, 0)

    if loss_type == "grpo":
        loss = (inp.seq_sum(per_token) / inp.seq_lengths(dtype).clamp(min=1)).sum() / inp.n_seqs
    elif loss_type == "bnpo":
        loss = per_token.sum() / m.sum().clamp(min=1)
    elif loss_type == "dapo":
        loss = per_token.sum() / inp.num_items.to(dtype).clamp(min=1)
    else:  # dr_grpo
        loss = per_token.sum() / (inp.n_seqs * inp.max_len)

    shape = inp.token_shape
    return GRPOLossOutput(
        loss=loss,
        logp=logp.detach().view(shape),
        entropy=scatter(entropy_rows).view(shape),
        kl=torch.where(inp.mask, kl, 0).detach().view(shape),
        clipped=((clipped_term < unclipped) & inp.mask).view(shape),
    )


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    **options,
) -> GRPOLossOutput:
    """``grpo_loss(hidden @ weight.T, ...)`` with hidden ``[B, T, H]`` / ``[N, H]`` and weight ``[V, H]``.

    Materialises the full logits (that is the point of the reference); ``chunk_size`` is accepted for
    signature parity and ignored. Differentiable w.r.t. ``hidden`` and ``weight``.
    """
    del chunk_size
    if weight.dim() != 2:
        raise ValueError(f"weight must be the lm_head matrix [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] or [B, T, H] with H = {weight.shape[1]} (weight's dim 1), "
                         f"got shape {tuple(hidden.shape)}")
    if hidden.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    dtype = _compute_dtype(hidden, weight)
    logits = F.linear(hidden.to(dtype), weight.to(dtype))
    return grpo_loss(logits, targets, advantages, mask, old_logp, ref_logp, **options)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Group-normalised advantages from rewards ``[B]`` laid out as ``B / G`` groups of ``G``.

    ``group``: ``(r - mean_g) / (std_g + 1e-4)``; ``batch``: ``(r - mean_g) / (std_batch + 1e-4)``;
    ``none``: ``r - mean_g``. ``std`` is Bessel-corrected (as TRL). Groups whose rewards are all
    equal get exactly 0.
    """
    check_group_rewards(rewards, group_size, scale)
    r = rewards.to(_compute_dtype(rewards)).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + 1e-4)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        centred = centred / (std + 1e-4)
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(centred), centred).view(-1)


def listener_confidence(
    logits: torch.Tensor,
    positions: torch.Tensor | None,
    candidate_ids: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The listener's confidence in each of K candidate tokens at one position per row.

    ``logits`` ``[B, T, V]`` read at ``positions[b]``, or ``[B, V]`` with ``positions=None``;
    ``candidate_ids`` ``[K]`` (shared) or ``[B, K]``. Returns fp32 ``(probs, logp)``, both ``[B, K]``:
    ``probs`` the softmax over the K candidate logits, ``logp`` the full-vocabulary log-softmax at
    the candidates, both of ``logits / temperature``.
    """
    check_listener_inputs(logits, positions, candidate_ids, temperature)
    if logits.dim() == 3:
        rows = logits[torch.arange(logits.shape[0], device=logits.device), positions.long()]
    else:
        rows = logits
    z = rows.to(_compute_dtype(logits)) / temperature
    ids = candidate_ids.long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0).expand(z.shape[0], -1)
    cand = z.gather(-1, ids)
    return cand.softmax(-1), cand - z.logsumexp(-1, keepdim=True)


# --- the rollout sampler (kernels/sampler.py): Philox4x32-10 noise, exponential race --------------

_M32 = 0xFFFFFFFF


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 (triton.language.philox_impl's rounds) on uint32 numpy arrays, keys as ints.

    numpy because its unsigned 64-bit products are exact and wrap by definition: the 32 x 32 -> 64
    bit multiply is one operation, where torch (no unsigned shifts) needs a 16-bit split.
    """
    a, b, shift = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), np.uint64(32)
    for _ in range(rounds):
        pb, pa = c2.astype(np.uint64) * b, c0.astype(np.uint64) * a
        c0, c1, c2, c3 = ((pb >> shift).astype(np.uint32) ^ c1 ^ np.uint32(k0), pb.astype(np.uint32),
                          (pa >> shift).astype(np.uint32) ^ c3 ^ np.uint32(k1), pa.astype(np.uint32))
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def sample_tokens(
    logits: torch.Tensor,
    key: torch.Tensor,
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    temperature: torch.Tensor,
    banned: torch.Tensor | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch twin of :func:`lgrpo.kernels.sampler.sample_tokens` (same ids, same empty rows)."""
    n, v = logits.shape
    x = logits.float()
    if banned is not None:
        x = x.masked_fill(banned.bool().unsqueeze(0), float("-inf"))
    empty = (torch.isnan(x) | (x == float("inf"))).any(-1) | ~torch.isfinite(x).any(-1)
    if greedy:
        keys = x.double()
    else:
        # counters (token, position, row id low, row id high) on the host; a CUDA caller waits here
        rows = row_ids.to("cpu", torch.int64).numpy()
        pos = positions.to("cpu", torch.int64).numpy()
        k0, k1 = (int(k) & _M32 for k in key.tolist())

        def per_row(a):
            return np.broadcast_to((a & _M32).astype(np.uint32)[:, None], (n, v))

        tokens = np.broadcast_to(np.arange(v, dtype=np.uint32)[None, :], (n, v))
        r0, r1, _, _ = philox4x32(tokens, per_row(pos), per_row(rows), per_row(rows >> 32), k0, k1)
        r0, r1 = (torch.from_numpy(r.astype(np.float64)).to(x.device) for r in (r0, r1))
        w = (r0 * 4294967296.0 + r1 + 0.5) * 2.0**-64
        series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0)))
        e = torch.where(w < 2.0**-20, series, -torch.log(torch.clamp(1.0 - w, min=2.0**-60)))
        keys = x.double() * (1.0 / temperature.reshape(()).double()) - torch.log(e)
    # NaN keys never win (as in the kernel's strict comparison); the lowest id wins a tie.
    keys = keys.nan_to_num(nan=float("-inf"), posinf=float("inf"))
    best = keys.max(-1, keepdim=True).values
    cols = torch.arange(v, device=x.device).expand(n, v)
    idx = torch.where(keys == best, cols, v).min(-1).values
    idx = torch.where(empty | (idx >= v), 0, idx)
    return idx.to(torch.int64), empty
