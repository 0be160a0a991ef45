"""AdamW with decay/no-decay parameter groups, and the warm-up + cosine/constant schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms and other 1-D parameters get no weight decay (as GPT-2 on)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (DTensor shards under FSDP2: each rank steps its shard).

    ``foreach`` is left to torch's default; ``fused`` is asked for on CUDA, where it is fastest.
    """
    params = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in params):
        raise ValueError("the model has no trainable parameters")
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=cfg.lr if lr is None else lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True if on_cuda else None,
    )


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up ``(step + 1) / warmup`` (never 0, so the first step learns), then constant, or a
    half cosine from 1 down to ``min_lr_ratio`` at the last step.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(total - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    """A LambdaLR over ``lr_factor``; its state (last_epoch) is part of every checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
