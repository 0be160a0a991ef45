"""From a loss type to the GRPO kernels' options: which normaliser each loss divides by.

The trainer, the TRL adapter and the verl adapter all ask :func:`loss_options`, so the rule
"bnpo over a global token count is dapo with that count; dr_grpo needs its length; dapo its count"
is written once. Each caller passes the normalisers it knows; each loss type takes the one it
divides by (module docstring of ``grpo.py`` for the formulas):

- ``grpo``: each sequence's token mean, averaged over the batch's B sequences (takes neither);
- ``bnpo``: the mean over the batch's live tokens; with ``num_items`` (the token count of a larger
  batch this one is a share of: every rank's, every micro-batch's) it is ``dapo`` over that count,
  the same mean taken over the whole batch;
- ``dapo``: the token sum over ``max(num_items, 1)`` (``num_items = 1``: the plain token sum, for a
  caller that divides by its own normaliser; None: this batch's live tokens, the kernel's default);
- ``dr_grpo``: the token sum over ``B * max_len`` (None: the padded length, the kernel's default).
"""

from __future__ import annotations

import torch

from ._inputs import LOSS_TYPES

# Loss types whose kernel normaliser counts this call's sequences (B): a caller that splits one batch
# into micro-batches or ranks weighs each call's loss by its share of the batch's sequences.
PER_SEQUENCE = ("grpo", "dr_grpo")


def loss_options(
    loss_type: str,
    *,
    num_items: int | float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> dict:
    """``loss_type`` and its normaliser (``num_items`` / ``max_len``) as keyword arguments of
    ``grpo_loss`` / ``linear_grpo_loss``; the normalisers a loss type does not divide by are ignored."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "bnpo" and num_items is not None:
        return {"loss_type": "dapo", "num_items": num_items}
    if loss_type == "dapo":
        return {"loss_type": "dapo", "num_items": num_items}
    if loss_type == "dr_grpo":
        return {"loss_type": "dr_grpo", "max_len": max_len}
    return {"loss_type": loss_type}
