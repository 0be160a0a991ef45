"""Rollouts: G sampled completions per prompt, stopped at the stop string or EOS.

Sampling is a pure function of ``(seed, step, row id, position)`` and the logits (lgrpo.sampling): the
same prompt gets the same completions on any number of ranks, in any batch composition, and after a
resume.

The prompt batches are dicts of tensors as the processor/collator makes them: ``input_ids`` and
``attention_mask`` [N, P] (left padded), and for a VLM ``pixel_values`` [patches, D] with
``image_grid_thw`` [images, 3]. ``repeat_rows`` and ``select_rows`` handle the image tensors, whose
first dimension counts patches or images rather than rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .prompts import stop_token_ids
from .sampling import BanTokens, CounterSampler, placeholder_token_ids

# --- batches of prompts with images -------------------------------------------------------------------

ROW_KEYS_EXCLUDED = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
# What a HF (V)LM's forward/generate takes from a batch; anything else (labels, examples) is bookkeeping.
MODEL_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "mm_token_type_ids",
)
# Keys holding one entry per token [N, P]: trimmed and extended along with input_ids.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _images_per_row(batch: dict, n_rows: int) -> torch.Tensor | None:
    grid = batch.get("image_grid_thw")
    if grid is None:
        return None
    if "images_per_row" in batch:
        return batch["images_per_row"]
    if grid.shape[0] % n_rows:
        raise ValueError(
            f"image_grid_thw has {grid.shape[0]} images for {n_rows} rows: pass images_per_row "
            f"when rows hold different numbers of images"
        )
    return torch.full((n_rows,), grid.shape[0] // n_rows, dtype=torch.long)


def select_rows(batch: dict, rows: torch.Tensor | list[int]) -> dict:
    """The sub-batch of ``rows`` (any order, repeats allowed), images included."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    n_rows = batch["input_ids"].shape[0]
    out = {}
    per_row = _images_per_row(batch, n_rows)
    for k, v in batch.items():
        if k in ROW_KEYS_EXCLUDED or k == "images_per_row":
            continue
        out[k] = v[rows.to(v.device)] if isinstance(v, torch.Tensor) else [v[i] for i in rows.tolist()]
    if per_row is not None:
        grid = batch["image_grid_thw"]
        patches = grid.prod(-1)  # patches per image
        img_start = torch.cumsum(per_row, 0) - per_row  # first image of each row
        patch_start = torch.cumsum(patches, 0) - patches  # first patch of each image
        images, patch_idx = [], []
        for r in rows.tolist():
            for i in range(int(img_start[r]), int(img_start[r] + per_row[r])):
                images.append(i)
                patch_idx.append(torch.arange(int(patch_start[i]), int(patch_start[i] + patches[i])))
        images_t = torch.tensor(images, dtype=torch.long)
        out["image_grid_thw"] = grid[images_t.to(grid.device)]
        pv = batch["pixel_values"]
        out["pixel_values"] = pv[torch.cat(patch_idx).to(pv.device)] if patch_idx else pv[:0]
        out["images_per_row"] = per_row[rows]
    return out


def repeat_rows(batch: dict, times: int) -> dict:
    """Each row ``times`` times in a row (``[a, a, b, b]`` for 2): the layout group_advantages expects."""
    n = batch["input_ids"].shape[0]
    return select_rows(batch, torch.arange(n).repeat_interleave(times))


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


def accepted_keys(model) -> frozenset[str]:
    """Batch keys this model's forward names explicitly (``mm_token_type_ids`` is new in transformers 5.x:
    older versions derive M-RoPE positions from the image token ids instead)."""
    import inspect

    inner = getattr(model, "base_model", model)
    names = set()
    for m in (model, inner):
        try:
            names |= set(inspect.signature(m.forward).parameters)
        except (TypeError, ValueError):
            pass
    return frozenset(k for k in MODEL_KEYS if k in names or k in ("input_ids", "attention_mask"))


def model_inputs(batch: dict, model=None) -> dict:
    """The keys a HF model's forward/generate takes (drops our bookkeeping: labels, images_per_row...).

    With ``model``, also the keys it does not name; floating image tensors get the model's dtype.
    """
    keys = accepted_keys(model) if model is not None else MODEL_KEYS
    out = {k: v for k, v in batch.items() if k in keys}
    if model is not None:
        dtype = next(model.parameters()).dtype
        for k in ("pixel_values", "pixel_values_videos"):
            if k in out and out[k].is_floating_point() and dtype.is_floating_point:
                out[k] = out[k].to(dtype)
    return out


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


@dataclass
class Rollout:
    """Completions of one batch of prompts; row ``i`` is completion ``i % G`` of prompt ``i // G``."""

    prompt: dict  # the prompt batch, rows repeated G times (input_ids/attention_mask [N, P], images)
    completion_ids: torch.Tensor  # [N, C] right padded with pad_id
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the stop string / EOS
    texts: list[str]  # decoded completions (special tokens dropped)
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens before the stop string or EOS
    meta: dict = field(default_factory=dict)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def clean_generation_config(model, tokenizer) -> None:
    """Replace the checkpoint's generation defaults (Qwen ships repetition_penalty, top_k, ...).

    Rollouts must sample from exactly the policy's distribution at the configured temperature: any
    inherited logits processor would make the sampler differ from the distribution the loss scores.
    """
    stops = list(stop_token_ids(tokenizer)) or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [None])[0]
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad, bos_token_id=None)


def _completion_mask(completion: torch.Tensor, stop_len: torch.Tensor | None, eos_ids: set[int]) -> tuple:
    """Mask through the first EOS or the recorded stop; truncated where neither happened."""
    n, c = completion.shape
    length = torch.full((n,), c, dtype=torch.long)
    hit = torch.zeros(n, dtype=torch.bool)
    if eos_ids:
        is_eos = torch.zeros_like(completion, dtype=torch.bool)
        for e in eos_ids:
            is_eos |= completion.cpu() == e
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, torch.full((n,), c))
        hit |= is_eos.any(-1)
        length = torch.minimum(length, first)
    if stop_len is not None:
        stopped = stop_len >= 0
        length = torch.where(stopped, torch.minimum(length, stop_len), length)
        hit |= stopped
    mask = torch.arange(c).unsqueeze(0) < length.unsqueeze(1)
    return mask, ~hit


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: dict,
    *,
    max_new_tokens: int,
    stop: str | None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int = 0,
    row_ids: torch.Tensor | None = None,
    batch_size: int | None = None,
    static_cache: bool = False,
) -> Rollout:
    """Complete every row of ``prompt`` (already repeated G times); returns a :class:`Rollout`.

    ``row_ids`` [N]: global ids of the rows (prompt index x G + sample) for the seeded sampler;
    ``greedy`` ignores temperature/top_p (evaluation). Rows are generated ``batch_size`` at a time.
    ``static_cache``: a preallocated KV cache instead of a growing one; on CUDA transformers then
    compiles the decode step (a minute for the first call, and again when a call needs a longer cache
    or another batch size). Same tokens either way.
    """
    n_rows, prompt_len = prompt["input_ids"].shape
    device = prompt["input_ids"].device
    if row_ids is None:
        row_ids = torch.arange(n_rows)
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
            part = model_inputs(select_rows(prompt, rows) if chunk < n_rows else prompt, model)
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
            mask, trunc = _completion_mask(completion, stopper.stop_len if stopper else None, eos_ids)
            completions.append(completion)
            masks.append(mask)
            truncs.append(trunc)
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
        prompt=prompt,
        completion_ids=completion.to(device),
        completion_mask=mask.to(device),
        texts=texts,
        truncated=torch.cat(truncs),
    )
