"""What every rollout path shares: the sampler's row ids, the pad id, and the :class:`lgrpo.group.Rollout`
built from the ids a path sampled (the engine, the hf path and the vLLM path end the same way)."""

from __future__ import annotations

import torch

from ..group import PromptBatch, Rollout, completion_mask
from ..prompts import stop_token_ids


def pad_token_id(tokenizer) -> int | None:
    """The id that pads completions: the tokenizer's pad token, else its smallest stop token."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return min(stop_token_ids(tokenizer), default=None)


def sample_row_ids(prompt_ids: torch.Tensor | None, n_prompts: int, group_size: int) -> torch.Tensor:
    """The seeded sampler's row id of each of the P x G completions, ``prompt_ids[p] * G + g`` for sample
    ``g`` of prompt ``p`` (``prompt_ids``: the prompts' global positions in the step, default ``arange(P)``).
    Global, so a completion draws the same tokens in any batch, on any rank, on either rollout path."""
    if prompt_ids is None:
        prompt_ids = torch.arange(n_prompts)
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).cpu()
    if prompt_ids.shape != (n_prompts,):
        raise ValueError(f"prompt_ids must be [P={n_prompts}], got shape {tuple(prompt_ids.shape)}")
    return prompt_ids.repeat_interleave(group_size) * group_size + torch.arange(group_size).repeat(n_prompts)


def finish_rollout(tokenizer, prompts: PromptBatch, group_size: int, completion: torch.Tensor,
                   stop_lengths: torch.Tensor | None, *, eos_ids, meta: dict | None = None) -> Rollout:
    """The :class:`Rollout` of ``group_size`` completions per prompt from the sampled ids, whichever path
    sampled them (:mod:`lgrpo.rollout.engine`, :mod:`lgrpo.rollout.hf` or :mod:`lgrpo.rollout.vllm`).

    ``completion`` ``[P*G, C]``: the ids each row drew (anything after its end is ignored);
    ``stop_lengths`` ``[P*G]``: tokens up to and including the stop string, ``-1`` where none was seen.
    The mask runs up to and including the first EOS or the stop string; a row is truncated when it has
    neither; ids outside the mask become the pad id; columns after the longest row are dropped.
    """
    mask = completion_mask(completion, eos_ids, stop_lengths)
    eos = torch.tensor(sorted(eos_ids), dtype=completion.dtype, device=completion.device)
    ended = (torch.isin(completion, eos) & mask).any(-1)
    if stop_lengths is not None:
        ended |= stop_lengths.to(completion.device) >= 0
    width = max(int(mask.sum(-1).max()) if len(mask) else 0, 1)
    completion, mask = completion[:, :width], mask[:, :width]
    completion = torch.where(mask, completion, torch.full_like(completion, pad_token_id(tokenizer)))
    texts = tokenizer.batch_decode([c[m].tolist() for c, m in zip(completion.cpu(), mask.cpu())],
                                   skip_special_tokens=True)
    device = prompts.input_ids.device
    return Rollout(
        prompts=prompts,
        completion_ids=completion.to(device),
        completion_mask=mask.to(device),
        group=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
        texts=texts,
        truncated=~ended.cpu(),
        meta=meta or {},
    )
