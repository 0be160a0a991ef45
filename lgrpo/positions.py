"""Token positions of a prompt batch and of the tokens that continue it: the one place they are computed.

Read by the rollout engine (its prefill and each decode step) and by the scorer (the shared-prefix and the
repeated forwards), so a completion is scored at the positions it was sampled at.

- **Text models**: the positions transformers' ``generate`` gives a left-padded batch, ``cumsum(mask) - 1``
  (pads get 1 and are never attended to). The token after a prompt is at its length.
- **A vision-language model** (:mod:`lgrpo.models`): its family's positions; for the Qwen-VL lineage
  M-RoPE's three axes (:mod:`lgrpo.models.qwen_vl`), continuing after a prompt at its largest position + 1.
"""

from __future__ import annotations

import torch

from .group import PromptBatch
from .models import family_of


def uses_mrope(model) -> bool:
    """Whether the model numbers positions on three M-RoPE axes (a vision-language model of a family)."""
    return family_of(model) is not None


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as HF generate assigns them to a left-padded text batch (pads get 1, never read)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def prompt_positions(model, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' positions (``[3, P, L]`` M-RoPE for a VLM, ``[P, L]`` for text) and the position of
    the token after each prompt ``[P]``, where its completions start."""
    text = text_positions(prompts.attention_mask)
    family = family_of(model)
    if family is None:
        return text, prompts.attention_mask.bool().sum(-1)
    return family.prompt_positions(model, prompts, text)


def forward_positions(model, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``position_ids`` for a padded forward of the prompts, as ``generate`` passes them (for M-RoPE
    ``[4, P, L]``: the text positions first, which transformers reads for its masks, then the three axes),
    and the position of the token after each prompt ``[P]``."""
    pos, nxt = prompt_positions(model, prompts)
    if pos.dim() == 3:
        pos = torch.cat([text_positions(prompts.attention_mask).unsqueeze(0), pos], 0)
    return pos, nxt


def continuation_positions(model, start: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Positions of continuation tokens: token ``offsets[j]`` after row ``n``'s prompt is at ``start[n] +
    offsets[j]`` (``start``: :func:`prompt_positions`' second result per row). ``[N, J]`` for a text
    model, ``[3, N, J]`` for M-RoPE (text tokens: the same position on all three axes)."""
    pos = start[:, None] + offsets[None]
    family = family_of(model)
    return pos if family is None else family.continuation_positions(pos)
