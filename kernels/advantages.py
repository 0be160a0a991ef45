"""Group-normalised advantages (SPEC §2) in one Triton launch.

Rewards ``[B]`` are ``B / G`` consecutive groups of ``G`` completions of one prompt:

    group: A = (r - mean_g) / (std_g + 1e-4)
    batch: A = (r - mean_g) / (std_batch + 1e-4)
    none:  A = r - mean_g

with the Bessel-corrected std (as TRL), and A = 0 for a group whose rewards are all equal.

The work is a few hundred numbers, so the point of a kernel is only to spend one launch instead of
the ~10 small torch ops of the reference: one program walks the groups in [groups, G] tiles (and,
for ``batch``, first the whole batch for its mean and std). fp32 arithmetic, fp32 output.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import next_pow2, on_device, tl, triton, use_triton
from ._inputs import check_group_rewards

SCALE_CODE = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _group_advantages_kernel(r_ptr, out_ptr, n_groups, G, inv_n, inv_g1, inv_n1, SCALE: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    # inv_n = 1/B, inv_g1 = 1/max(G-1, 1), inv_n1 = 1/max(B-1, 1): from the host as floats (an int
    # argument equal to 1 becomes a compile-time constant in Triton, without tensor methods).
    cols = tl.arange(0, BLOCK_M)
    grp = tl.arange(0, BLOCK_G)
    if SCALE == 1:  # batch std: two passes (mean, then squared deviations) for accuracy
        acc = tl.zeros([BLOCK_G, BLOCK_M], tl.float32)
        for g0 in range(0, n_groups, BLOCK_G):
            ok = ((g0 + grp) < n_groups)[:, None] & (cols < G)[None, :]
            acc += tl.load(r_ptr + (g0 + grp)[:, None] * G + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean_b = tl.sum(tl.sum(acc, axis=1), axis=0) * inv_n
        acc = tl.zeros([BLOCK_G, BLOCK_M], tl.float32)
        for g0 in range(0, n_groups, BLOCK_G):
            ok = ((g0 + grp) < n_groups)[:, None] & (cols < G)[None, :]
            r = tl.load(r_ptr + (g0 + grp)[:, None] * G + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dev = tl.where(ok, r - mean_b, 0.0)
            acc += dev * dev
        ss = tl.sum(tl.sum(acc, axis=1), axis=0)
        std_b = tl.sqrt(ss * inv_n1)  # 0 when B == 1 (ss = 0)

    for g0 in range(0, n_groups, BLOCK_G):
        rows = g0 + grp
        ok = (rows < n_groups)[:, None] & (cols < G)[None, :]
        offs = rows[:, None] * G + cols[None, :]
        r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean_g = tl.sum(r, axis=1) / G
        centred = tl.where(ok, r - mean_g[:, None], 0.0)
        if SCALE == 0:
            std_g = tl.sqrt(tl.sum(centred * centred, axis=1) * inv_g1)
            centred = centred / (std_g[:, None] + 1e-4)
        elif SCALE == 1:
            centred = centred / (std_b + 1e-4)
        first = tl.load(r_ptr + rows * G, mask=rows < n_groups, other=0.0).to(tl.float32)
        n_diff = tl.sum(tl.where(ok & (r != first[:, None]), 1, 0), axis=1)
        centred = tl.where((n_diff == 0)[:, None], 0.0, centred)  # all-equal group: exactly 0
        tl.store(out_ptr + offs, centred, mask=ok)


@torch.library.custom_op("lgrpo::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    if rewards.numel():
        block_m = next_pow2(group_size)
        block_g = max(1, min(1024 // block_m, next_pow2(rewards.numel() // group_size)))
        n = rewards.numel()
        with on_device(rewards):
            _group_advantages_kernel[(1,)](rewards, out, n // group_size, group_size, 1.0 / n,
                                           1.0 / max(group_size - 1, 1), 1.0 / max(n - 1, 1),
                                           SCALE=SCALE_CODE[scale], BLOCK_G=block_g, BLOCK_M=block_m)
    return out


@_group_advantages_op.register_fake
def _(rewards, group_size, scale):
    return torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Group-normalised advantages from rewards ``[B]`` (formulas in the module docstring), fp32.

    Not differentiable (advantages are constants of the loss). Falls back to
    ``reference.group_advantages`` where the Triton kernels do not run.
    """
    if not use_triton(rewards):
        return reference.group_advantages(rewards, group_size, scale)
    check_group_rewards(rewards, group_size, scale)
    return _group_advantages_op(rewards.contiguous(), group_size, scale)
