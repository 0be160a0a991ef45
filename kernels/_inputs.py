"""Argument checking and layout normalisation shared by every implementation of the GRPO loss.

The reference (`reference.py`) and the Triton kernels both call :func:`grpo_inputs`, so a bad
argument fails the same way on every path, naming the argument. Everything downstream works on a
flat view: ``N`` rows (``B*T`` padded rows, or the packed rows), each row belonging to sequence
``seq_id[row]`` of ``B``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")


@dataclass
class GRPOInputs:
    """Flat, checked view of the loss arguments. Tensors live on the logits' device."""

    targets: torch.Tensor  # [N] int64; rows with mask 0 may hold anything (e.g. -100)
    mask: torch.Tensor  # [N] bool
    advantages: torch.Tensor  # [N] fp32/fp64: A_i broadcast to its rows, or per-token A_it
    old_logp: torch.Tensor | None  # [N] or None (on-policy: old = logp.detach())
    ref_logp: torch.Tensor | None  # [N] or None
    seq_id: torch.Tensor  # [N] int64, sequence index of each row
    n_seqs: int  # B
    max_len: int  # dr_grpo's denominator length: the caller's max_len, else padded T
    num_items: torch.Tensor  # 0-d fp32: dapo's denominator before the max(·, 1)
    token_shape: torch.Size  # shape of the per-token outputs (== targets.shape)

    @property
    def n_rows(self) -> int:
        return self.targets.numel()

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a per-row tensor [N] into per-sequence totals [B]."""
        out = torch.zeros(self.n_seqs, dtype=x.dtype, device=x.device)
        return out.index_add(0, self.seq_id, x)

    def seq_lengths(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Masked token count of each sequence, [B]."""
        return self.seq_sum(self.mask.to(dtype))


def check_hparams(
    *,
    temperature: float,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    beta: float,
    loss_type: str,
    importance_level: str,
    ref_logp: torch.Tensor | None,
    kl_bias_correction: bool = False,
) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (eps_low >= 0 and eps_high >= 0):
        raise ValueError(f"eps_low and eps_high must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if eps_low >= 1:
        raise ValueError(f"eps_low must be < 1 (the lower clip bound is 1 - eps_low), got {eps_low}")
    if delta is not None and not delta >= 1.0:
        raise ValueError(f"delta (two-sided clipping bound on the ratio) must be >= 1, got {delta}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's per-token log-probs)")
    if not isinstance(kl_bias_correction, bool):
        raise ValueError(f"kl_bias_correction must be a bool, got {kl_bias_correction!r}")


def check_targets(targets: torch.Tensor, vocab: int, mask: torch.Tensor | None = None) -> None:
    """Raise IndexError when a target id (where mask is set) lies outside [0, vocab)."""
    start_target_check(targets, vocab, mask)()


def check_target_dtype(targets: torch.Tensor) -> None:
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")


def start_target_check(
    targets: torch.Tensor, vocab: int, mask: torch.Tensor | None = None
) -> Callable[[], None]:
    """Start :func:`check_targets` without waiting for the device; call the result to finish it.

    The bounds of the live ids are reduced on the device and copied to the host asynchronously.
    The Triton path queues its first vocabulary pass (which never reads out of bounds, whatever
    the ids) before calling the returned function, so the one host sync the check needs does not
    leave the GPU idle. The returned function raises the IndexError.
    """
    check_target_dtype(targets)
    ids = targets.reshape(-1)
    if mask is not None:
        ids = torch.where(mask.reshape(-1), ids, 0)  # 0 is always a valid id; no data-dependent shape
    if ids.numel() == 0:
        return lambda: None
    bounds = torch.stack(torch.aminmax(ids))
    done = None
    if bounds.is_cuda:
        bounds = bounds.to("cpu", non_blocking=True)  # lands in pinned memory; `done` says when
        done = torch.cuda.Event()
        done.record()

    def finish() -> None:
        if done is not None:
            done.synchronize()
        lo, hi = bounds.tolist()
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise IndexError(f"targets holds token id {bad}, outside the vocabulary [0, {vocab})")

    return finish


def _same_device(name: str, t: torch.Tensor | None, device: torch.device) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")


def _per_token(name: str, t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    if t is None:
        return None
    if t.shape != shape:
        raise ValueError(f"{name} must have the targets' shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t.reshape(-1)


def grpo_inputs(
    lead_shape: torch.Size,
    vocab: int,
    device: torch.device,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    *,
    cu_seqlens: torch.Tensor | None,
    temperature: float,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    beta: float,
    loss_type: str,
    importance_level: str,
    max_len: int | None,
    num_items: int | float | torch.Tensor | None,
    kl_bias_correction: bool = False,
    name: str = "logits",
    check_target_ids: bool = True,
) -> GRPOInputs:
    """Check every argument of the GRPO loss and return the flat view.

    ``lead_shape`` is the input's shape without its last dimension: ``[B, T]`` for padded logits
    (or hidden states), ``[N]`` for packed ones, which then need ``cu_seqlens``.
    ``check_target_ids=False`` leaves the id range check (a host sync) to the caller, who must run
    :func:`start_target_check` on the returned ``targets``/``mask`` before trusting any result.
    """
    check_hparams(
        temperature=temperature,
        eps_low=eps_low,
        eps_high=eps_high,
        delta=delta,
        beta=beta,
        loss_type=loss_type,
        importance_level=importance_level,
        ref_logp=ref_logp,
        kl_bias_correction=kl_bias_correction,
    )
    if vocab < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension")
    for arg, t in (("targets", targets), ("advantages", advantages), ("mask", mask), ("old_logp", old_logp),
                   ("ref_logp", ref_logp), ("cu_seqlens", cu_seqlens)):
        _same_device(arg, t, device)
    if targets.shape != lead_shape:
        raise ValueError(f"targets must have shape {tuple(lead_shape)} ({name} without its last dim), "
                         f"got {tuple(targets.shape)}")

    if len(lead_shape) == 2:  # padded [B, T]
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is only for packed 2-D {name} [N, V]; got padded {name} of rank 3")
        n_seqs, padded_len = lead_shape
        if n_seqs < 1:
            raise ValueError(f"{name} holds no sequences (B = 0)")
        seq_id = torch.arange(n_seqs, device=device).repeat_interleave(padded_len)
    elif len(lead_shape) == 1:  # packed [N]
        if cu_seqlens is None:
            raise ValueError(f"packed 2-D {name} [N, V] need cu_seqlens [B+1] to say where each sequence starts")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [B+1] with B >= 1, got "
                             f"shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != lead_shape[0] or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to N = {lead_shape[0]} without decreasing, "
                             f"got first {first}, last {last}")
        n_seqs = cu_seqlens.numel() - 1
        padded_len = int(lengths.max())
        seq_id = torch.repeat_interleave(torch.arange(n_seqs, device=device), lengths.long())
    else:
        raise ValueError(f"{name} must be [B, T, V] (padded) or [N, V] (packed), got rank {len(lead_shape) + 1}")

    if mask is None:
        mask_flat = torch.ones(targets.numel(), dtype=torch.bool, device=device)
    else:
        if mask.shape != lead_shape:
            raise ValueError(f"mask must have the targets' shape {tuple(lead_shape)}, got {tuple(mask.shape)}")
        mask_flat = mask.reshape(-1) != 0
    if check_target_ids:
        check_targets(targets.reshape(-1), vocab, mask_flat)
    else:
        check_target_dtype(targets)  # the id range is the caller's job; a float id is never right

    if not advantages.is_floating_point():
        raise ValueError(f"advantages must be floating point, got dtype {advantages.dtype}")
    if advantages.shape == (n_seqs,):
        adv = advantages[seq_id]
    elif advantages.shape == lead_shape:
        adv = advantages.reshape(-1)
    else:
        raise ValueError(f"advantages must be per sequence [{n_seqs}] or per token {tuple(lead_shape)}, "
                         f"got {tuple(advantages.shape)}")

    if max_len is None:
        max_len = padded_len
    elif max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if num_items is None:
        n_items = mask_flat.sum().to(torch.float32)
    else:
        n_items = torch.as_tensor(num_items, dtype=torch.float32, device=device)
        if n_items.numel() != 1:
            raise ValueError(f"num_items must be a scalar, got shape {tuple(n_items.shape)}")
        n_items = n_items.reshape(())

    return GRPOInputs(
        targets=targets.reshape(-1).long(),
        mask=mask_flat,
        advantages=adv,
        old_logp=_per_token("old_logp", old_logp, lead_shape),
        ref_logp=_per_token("ref_logp", ref_logp, lead_shape),
        seq_id=seq_id,
        n_seqs=n_seqs,
        max_len=int(max_len),
        num_items=n_items,
        token_shape=targets.shape,
    )


def check_group_rewards(rewards: torch.Tensor, group_size: int, scale: str) -> None:
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be floating point, got dtype {rewards.dtype}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")


def check_logprob_args(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Shapes and temperature of token_logprobs (the target id range is checked where the data is read)."""
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_listener_layout(
    logits: torch.Tensor, positions: torch.Tensor | None, candidate_ids: torch.Tensor, temperature: float,
    *, native: bool = True,
) -> None:
    """The data-free checks of listener_confidence's arguments (ranks, dtypes, shapes, devices,
    temperature), with the messages of the C++ op's ``listener_params`` (csrc/ops.cpp).

    ``native``: the op's rules (fp32/fp16/bf16 logits, int32/int64 indices), which its fake kernel
    must apply without looking at data; False: the fp64 reference's, which also takes fp64 logits
    and indices of any integer dtype.
    """
    floats = (torch.float32, torch.float16, torch.bfloat16) + (() if native else (torch.float64,))
    if native:
        index_kind = "an int32 or int64 tensor"

        def is_index(t: torch.Tensor) -> bool:
            return t.dtype in (torch.int32, torch.int64)
    else:
        index_kind = "an integer tensor"

        def is_index(t: torch.Tensor) -> bool:
            return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)

    if logits.dtype not in floats:
        raise ValueError(f"logits must be fp32, fp16 or bf16, got {logits.dtype}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, T, V] or [B, V], got rank {logits.dim()}")
    batch = logits.shape[0]
    if logits.shape[-1] < 1:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if logits.dim() == 3:
        if positions is None:
            raise ValueError("positions [B] is required for logits of shape [B, T, V]")
        if positions.dim() != 1 or positions.shape[0] != batch or not is_index(positions):
            raise ValueError(f"positions must be {index_kind} of shape [{batch}], got "
                             f"{list(positions.shape)} {positions.dtype}")
    elif positions is not None:
        raise ValueError("positions must be None for logits of shape [B, V]")
    if candidate_ids.dim() not in (1, 2) or not is_index(candidate_ids):
        raise ValueError(f"candidate_ids must be {index_kind} [K] or [B, K], got "
                         f"{list(candidate_ids.shape)} {candidate_ids.dtype}")
    if candidate_ids.dim() == 2 and candidate_ids.shape[0] != batch:
        raise ValueError(f"candidate_ids [B, K] must have B = {batch} rows, got {candidate_ids.shape[0]}")
    if candidate_ids.shape[-1] < 1:
        raise ValueError("candidate_ids must hold at least one candidate (K >= 1)")
    for name, t in (("positions", positions), ("candidate_ids", candidate_ids)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")


def check_listener_inputs(
    logits: torch.Tensor, positions: torch.Tensor | None, candidate_ids: torch.Tensor, temperature: float
) -> None:
    """All checks of the reference listener_confidence: the layout, then the index ranges (reads data)."""
    check_listener_layout(logits, positions, candidate_ids, temperature, native=False)
    if positions is not None and positions.numel() and (
        int(positions.min()) < 0 or int(positions.max()) >= logits.shape[1]
    ):
        raise IndexError(f"positions must lie in [0, {logits.shape[1]}), got "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    vocab = logits.shape[-1]
    if candidate_ids.numel() and (int(candidate_ids.min()) < 0 or int(candidate_ids.max()) >= vocab):
        raise IndexError(f"candidate_ids must lie in [0, {vocab}), got "
                         f"[{int(candidate_ids.min())}, {int(candidate_ids.max())}]")
