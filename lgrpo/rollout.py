"""Rollouts: G sampled completions per prompt, stopped at the stop string or EOS.

Sampling is a pure function of ``(seed, step, row id, position)`` and the logits (lgrpo.sampling): the
same prompt gets the same completions on any number of ranks, in any batch composition, and after a
resume.

The prompts come as a :class:`lgrpo.group.PromptBatch` (P rows, each once); the result is a
:class:`lgrpo.group.Rollout` whose completion ``i`` is sample ``i % G`` of prompt ``i // G``. This path
runs transformers' ``generate`` on the prompts repeated G times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .group import PromptBatch, Rollout, completion_mask
from .prompts import stop_token_ids
from .sampling import BanTokens, CounterSampler, placeholder_token_ids


class StopOnString(StoppingCriteria):
    """Per-row stop once the decoded completion contains ``stop``; records where each row stopped.

    Decodes only the last few tokens of each row (the stop string's length in tokens is at most its
    length in characters), so each check is cheap.
    """

    def __init__(self, tokenizer, stop: str, prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.tail = len(stop) + 1
        self.stop_len: torch.Tensor | None = None  # completion length at the stop, per row; -1 = not stopped

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        n_rows, length = input_ids.shape
        if self.stop_len is None:
            self.stop_len = torch.full((n_rows,), -1, dtype=torch.long)
        new = length - self.prompt_len
        start = max(self.prompt_len, length - self.tail)
        tails = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=False)
        done = torch.tensor([self.stop in t for t in tails], dtype=torch.bool)
        fresh = done & (self.stop_len < 0)
        self.stop_len[fresh] = new
        return (self.stop_len >= 0).to(input_ids.device)


# --- rollouts -----------------------------------------------------------------------------------------


def clean_generation_config(model, tokenizer) -> None:
    """Replace the checkpoint's generation defaults (Qwen ships repetition_penalty, top_k, ...).

    Rollouts must sample from exactly the policy's distribution at the configured temperature: any
    inherited logits processor would make the sampler differ from the distribution the loss scores.
    """
    stops = sorted(stop_token_ids(tokenizer)) or None
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad_token_id(tokenizer),
                                               bos_token_id=None)


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
    sampled them (this module's ``generate`` or :mod:`lgrpo.engine`).

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


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: PromptBatch,
    group_size: int = 1,
    *,
    max_new_tokens: int,
    stop: str | None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int = 0,
    prompt_ids: torch.Tensor | None = None,
    batch_size: int | None = None,
    static_cache: bool = False,
) -> Rollout:
    """``group_size`` completions of every prompt; returns a :class:`Rollout` over the P prompts.

    ``prompt_ids`` [P]: the prompts' global positions in the step (default ``arange(P)``); the seeded
    sampler's row ids follow from them (:func:`sample_row_ids`). ``greedy`` ignores
    temperature/top_p (evaluation). Rows are generated ``batch_size`` at a time.
    ``static_cache``: a preallocated KV cache instead of a growing one; on CUDA transformers then
    compiles the decode step (a minute for the first call, and again when a call needs a longer cache
    or another batch size). Same tokens either way.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n_prompts = len(prompts)
    row_ids = sample_row_ids(prompt_ids, n_prompts, group_size)
    group = torch.arange(n_prompts).repeat_interleave(group_size)
    n_rows, prompt_len = len(group), prompts.length
    eos_ids = stop_token_ids(tokenizer)
    pad = pad_token_id(tokenizer)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=pad,
        use_cache=True,
        **({"cache_implementation": "static"} if static_cache else {}),
    )
    chunk = batch_size or n_rows
    was_training = model.training
    model.eval()
    completions, stops = [], []
    try:
        for lo in range(0, n_rows, chunk):
            rows = torch.arange(lo, min(lo + chunk, n_rows))
            part = prompts.select(group[rows]).model_inputs(model)
            processors = LogitsProcessorList()
            banned = placeholder_token_ids(getattr(model, "config", None))
            if banned:
                processors.append(BanTokens(banned))
            sampler = None
            if not greedy:
                sampler = CounterSampler(seed, step, row_ids[rows], temperature, top_p, prompt_len, max_new_tokens)
                processors.append(sampler)
            criteria = StoppingCriteriaList()
            stopper = StopOnString(tokenizer, stop, prompt_len) if stop else None
            if stopper is not None:
                criteria.append(stopper)
            out = model.generate(
                **part, generation_config=gen_cfg, logits_processor=processors, stopping_criteria=criteria
            )
            if sampler is not None:
                sampler.check()
            completion = out[:, prompt_len:].cpu()
            completions.append(F.pad(completion, (0, max_new_tokens - completion.shape[1]), value=pad))
            stops.append(stopper.stop_len if stopper else torch.full((len(rows),), -1, dtype=torch.long))
    finally:
        model.train(was_training)
    return finish_rollout(tokenizer, prompts, group_size, torch.cat(completions), torch.cat(stops), eos_ids=eos_ids)
