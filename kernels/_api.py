"""Types shared by every implementation of the public kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GRPOLossOutput:
    """Result of ``grpo_loss`` / ``linear_grpo_loss``.

    ``loss`` is a differentiable scalar (fp32). The per-token tensors have the targets' shape, are
    detached, and hold 0 (``clipped``: False) where the mask is 0:

    - ``logp``: ``log_softmax(z / temperature)[target]`` in fp32;
    - ``entropy``: ``-sum_v p log p`` of ``softmax(z / temperature)``;
    - ``kl``: the k3 estimate ``exp(ref - logp) - (ref - logp) - 1`` when ``ref_logp`` is given
      (even with ``beta == 0``, for monitoring), else zeros;
    - ``clipped``: True where the clipped surrogate was the active (strictly smaller) term.
    """

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
