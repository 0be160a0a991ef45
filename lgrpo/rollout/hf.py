"""The hf rollout path (``--rollout.engine hf``): G sampled completions per prompt through transformers'
``generate``, stopped at the stop string or EOS.

Sampling is a pure function of ``(seed, step, row id, position)`` and the logits (the top-p sampler of
:mod:`lgrpo.rollout.top_p`, run as a logits processor): the same prompt gets the same completions on any
number of ranks, in any batch composition, and after a resume.

The prompts come as a :class:`lgrpo.group.PromptBatch` (P rows, each once); the result is a
:class:`lgrpo.group.Rollout` whose completion ``i`` is sample ``i % G`` of prompt ``i // G``. This path
runs transformers' ``generate`` on the prompts repeated G times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..group import PromptBatch, Rollout
from ..prompts import stop_token_ids
from .result import finish_rollout, pad_token_id, sample_row_ids
from .sampler import NonFiniteLogitsError, placeholder_token_ids
from .top_p import counter_uniform, sample_from_logits


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


class CounterSampler(LogitsProcessor):
    """Turns HF greedy decoding into seeded sampling: the chosen token gets 0, every other -inf.

    The uniforms of all ``max_new_tokens`` positions are made at construction (on the host) and moved
    to the logits' device on the first call. Rows with no finite logit are recorded, not raised on
    the spot (that would wait for the GPU every token): call :meth:`check` after generating.
    """

    def __init__(
        self,
        seed: int,
        step: int,
        row_ids: torch.Tensor,
        temperature: float,
        top_p: float,
        prompt_len: int,
        max_new_tokens: int,
    ):
        self.temperature, self.top_p, self.prompt_len = temperature, top_p, prompt_len
        self.row_ids = torch.as_tensor(row_ids, dtype=torch.long).cpu()
        self.uniforms = counter_uniform(seed, step, self.row_ids, torch.arange(max_new_tokens))
        self.empty: torch.Tensor | None = None  # [B] bool on the logits' device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # The index within the completion, not the padded length: padding depends on the batch.
        position = input_ids.shape[1] - self.prompt_len
        if self.uniforms.device != scores.device:
            self.uniforms = self.uniforms.to(scores.device)
        ids, empty = sample_from_logits(scores, self.uniforms[:, position], self.temperature, self.top_p)
        self.empty = empty if self.empty is None else self.empty | empty
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, ids.unsqueeze(1), 0.0)
        return out

    def check(self) -> None:
        """Raise if any row met logits with nothing finite to sample from (a diverged policy)."""
        if self.empty is not None and bool(self.empty.any()):
            rows = self.row_ids[self.empty.cpu()].tolist()
            raise NonFiniteLogitsError(
                f"the policy's logits had no finite value (NaN or all -inf) while sampling rows {rows[:8]}"
                f"{' ...' if len(rows) > 8 else ''}: the model has diverged"
            )


class BanTokens(LogitsProcessor):
    """Never emit these ids (a VLM's image/video placeholders: one in a completion breaks the next forward,
    which counts placeholders against image features). Applied before sampling, so the sampler draws from
    the policy renormalised without them; a trained model gives them ~0 mass anyway."""

    def __init__(self, ids: list[int]):
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long)
        self._on_device: tuple | None = None  # (device, vocab, ids there): one copy, not one per token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        key = (scores.device, scores.shape[-1])
        if self._on_device is None or self._on_device[:2] != key:
            self._on_device = (*key, self.ids[self.ids < scores.shape[-1]].to(scores.device))
        return scores.index_fill(-1, self._on_device[2], float("-inf"))


# --- rollouts -----------------------------------------------------------------------------------------


def clean_generation_config(model, tokenizer) -> None:
    """Replace the checkpoint's generation defaults (Qwen ships repetition_penalty, top_k, ...).

    Rollouts must sample from exactly the policy's distribution at the configured temperature: any
    inherited logits processor would make the sampler differ from the distribution the loss scores.
    """
    stops = sorted(stop_token_ids(tokenizer)) or None
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad_token_id(tokenizer),
                                               bos_token_id=None)


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


class HFRollout:
    """:func:`generate` behind the face every rollout path has, ``generate(prompts, G, ...) -> Rollout``
    (what :func:`lgrpo.rollout.rollout_for` returns for ``--rollout.engine hf``)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int, stop: str | None, static_cache: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.stop, self.static_cache = max_new_tokens, stop, static_cache

    def generate(self, prompts: PromptBatch, group_size: int = 1, *, reduce_max=None, **sampling) -> Rollout:
        """``sampling``: greedy, temperature, top_p, seed, step, prompt_ids, batch_size. ``reduce_max`` is
        accepted for the engine's face: ``generate`` runs no collective, so ranks need not agree on steps."""
        return generate(self.model, self.tokenizer, prompts, group_size, max_new_tokens=self.max_new_tokens,
                        stop=self.stop, static_cache=self.static_cache, **sampling)
