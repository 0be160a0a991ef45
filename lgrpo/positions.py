"""Token positions of a prompt batch and of the tokens that continue it: the one place they are computed.

Read by the rollout engine (its prefill and each decode step) and by the scorer (the shared-prefix and the
repeated forwards), so a completion is scored at the positions it was sampled at.

- **Text models**: the positions transformers' ``generate`` gives a left-padded batch, ``cumsum(mask) - 1``
  (pads get 1 and are never attended to). The token after a prompt is at its length.
- **M-RoPE** (the Qwen2-VL family, a model whose base model has ``get_rope_index``): three axes (time,
  height, width); an image's tokens are numbered over its patch grid, text on all three axes alike. The
  token after a prompt is at the prompt's largest position + 1 on every axis (``generate``'s ``rope_deltas``):
  completion tokens are text.
"""

from __future__ import annotations

import torch

from .group import PromptBatch


def uses_mrope(model) -> bool:
    """Whether the model numbers positions on three M-RoPE axes (a Qwen2-VL-family VLM)."""
    return hasattr(model.base_model, "get_rope_index")


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as HF generate assigns them to a left-padded text batch (pads get 1, never read)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def prompt_positions(model, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' positions (``[3, P, L]`` M-RoPE for a VLM, ``[P, L]`` for text) and the position of
    the token after each prompt ``[P]``, where its completions start."""
    mask = prompts.attention_mask.bool()
    text = text_positions(prompts.attention_mask)
    if not uses_mrope(model):
        return text, mask.sum(-1)
    if prompts.image_grid_thw is None:  # what get_rope_index numbers a text-only row, without its loop
        pos = text.unsqueeze(0).expand(3, -1, -1)
    else:
        types = prompts.mm_token_type_ids
        if types is None:
            types = (prompts.input_ids == model.config.image_token_id).int()
        pos, _ = model.base_model.get_rope_index(prompts.input_ids, mm_token_type_ids=types,
                                                 image_grid_thw=prompts.image_grid_thw,
                                                 attention_mask=prompts.attention_mask)
    # Text after the last image continues from the largest position so far (as get_rope_index numbers it).
    nxt = pos.masked_fill(~mask[None], -1).amax(dim=(0, 2)) + 1
    return pos, nxt


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
    return pos.unsqueeze(0).expand(3, -1, -1) if uses_mrope(model) else pos
