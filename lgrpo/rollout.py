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
    stops = list(stop_token_ids(tokenizer)) or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [None])[0]
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad, bos_token_id=None)


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
    sampler's row id of sample g of prompt p is ``prompt_ids[p] * G + g``. ``greedy`` ignores
    temperature/top_p (evaluation). Rows are generated ``batch_size`` at a time.
    ``static_cache``: a preallocated KV cache instead of a growing one; on CUDA transformers then
    compiles the decode step (a minute for the first call, and again when a call needs a longer cache
    or another batch size). Same tokens either way.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n_prompts = len(prompts)
    if prompt_ids is None:
        prompt_ids = torch.arange(n_prompts)
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).cpu()
    if prompt_ids.shape != (n_prompts,):
        raise ValueError(f"prompt_ids must be [P={n_prompts}], got shape {tuple(prompt_ids.shape)}")
    group = torch.arange(n_prompts).repeat_interleave(group_size)
    row_ids = prompt_ids[group] * group_size + torch.arange(group_size).repeat(n_prompts)
    n_rows, prompt_len = len(group), prompts.length
    device = prompts.input_ids.device
    eos_ids = set(stop_token_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=None)
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
    completions, masks, truncs = [], [], []
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
            stop_len = stopper.stop_len if stopper else None
            completions.append(completion)
            masks.append(completion_mask(completion, eos_ids, stop_len))
            # Truncated: neither an EOS nor the stop string before max_new_tokens.
            hit = torch.isin(completion, torch.tensor(sorted(eos_ids), dtype=completion.dtype)).any(-1)
            truncs.append(~(hit | (stop_len >= 0)) if stop_len is not None else ~hit)
    finally:
        model.train(was_training)
    width = max(c.shape[1] for c in completions)
    completion = torch.cat(
        [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad) for c in completions]
    )
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
    completion = torch.where(mask, completion, torch.full_like(completion, pad))
    texts = tokenizer.batch_decode(
        [c[m].tolist() for c, m in zip(completion, mask)], skip_special_tokens=True
    )
    return Rollout(
        prompts=prompts,
        completion_ids=completion.to(device),
        completion_mask=mask.to(device),
        group=group.to(device),
        texts=texts,
        truncated=torch.cat(truncs),
    )
