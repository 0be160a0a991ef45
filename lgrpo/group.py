"""The step's batch: P prompts, each once, and the completions that point at their prompt.

A GRPO step samples G completions of each of P prompts. Every pass over the step (rollouts, the
reference and old-log-prob passes, the listener, the update) takes the same layout:

- :class:`PromptBatch`: P prompts, left padded, with their images (``pixel_values`` holds each image's
  patches once) and per-row bookkeeping of the task (``extra``: labels, examples...).
- :class:`GroupBatch`: the prompts plus N completions ``[N, C]`` (right padded, ``completion_mask``
  true up to and including the stop) and ``group`` ``[N]``: the prompt row each completion continues.
  For a step ``group = arange(P).repeat_interleave(G)``: completion ``i`` is sample ``i % G`` of prompt
  ``i // G`` (the layout ``group_advantages`` expects).
- :class:`Rollout`: a :class:`GroupBatch` with the decoded texts and truncation flags.

Nothing here repeats a prompt to make rows, except :meth:`GroupBatch.repeated_prompts`, which the
plain-transformers path (``--loss.shared_prefix false``, HF ``generate``) needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from .models.qwen_vl import MODEL_INPUTS as MODEL_KEYS  # the tensors of a prompt batch a (V)LM's forward takes
from .prompts import encode_text


def _take(value, rows: torch.Tensor):
    """Rows of a per-row bookkeeping value (a tensor or a sequence)."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)]
    return [value[i] for i in rows.tolist()]


def _check_ids_and_mask(ids: torch.Tensor, mask: torch.Tensor, ids_name: str, mask_name: str, dims: str) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{ids_name} must be {dims}, got shape {tuple(ids.shape)}")
    if mask.shape != ids.shape:
        raise ValueError(f"{mask_name} must have the shape of {ids_name} {tuple(ids.shape)}, got {tuple(mask.shape)}")


@dataclass
class PromptBatch:
    """P left-padded prompts with their images.

    ``input_ids``/``attention_mask`` ``[P, L]``; for a VLM ``mm_token_type_ids`` ``[P, L]`` (1 on image
    tokens: M-RoPE positions), ``pixel_values`` ``[patches, D]`` and ``image_grid_thw`` ``[images, 3]`` in
    row order, ``images_per_row`` ``[P]``. ``extra``: the task's per-row bookkeeping (tensors or lists
    with P entries), carried along by :meth:`select`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    images_per_row: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_ids_and_mask(self.input_ids, self.attention_mask, "input_ids", "attention_mask", "[P, L]")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw come together (both or neither)")
        if self.image_grid_thw is not None and self.images_per_row is None:
            n_img, n_rows = self.image_grid_thw.shape[0], self.input_ids.shape[0]
            if n_img % max(n_rows, 1):
                raise ValueError(f"image_grid_thw has {n_img} images for {n_rows} rows: pass images_per_row")
            self.images_per_row = torch.full((n_rows,), n_img // max(n_rows, 1), dtype=torch.long)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        """Padded prompt length L."""
        return self.input_ids.shape[1]

    @property
    def has_images(self) -> bool:
        return self.pixel_values is not None

    def lengths(self) -> torch.Tensor:
        """Tokens per prompt ``[P]`` (padding excluded)."""
        return self.attention_mask.sum(-1)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> PromptBatch:
        """Move every tensor to ``device``; ``dtype`` casts ``pixel_values`` only (the vision tower's dtype)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        if dtype is not None and self.pixel_values is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}
        return replace(self, **moved, extra=extra)

    def select(self, rows: torch.Tensor | Sequence[int]) -> PromptBatch:
        """The sub-batch of ``rows`` (any order, repeats allowed), each row's images and bookkeeping included."""
        rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"rows must lie in [0, {len(self)}), got {rows.tolist()}")
        dev = self.input_ids.device
        out = dict(
            input_ids=self.input_ids[rows.to(dev)],
            attention_mask=self.attention_mask[rows.to(dev)],
            mm_token_type_ids=None if self.mm_token_type_ids is None else self.mm_token_type_ids[rows.to(dev)],
            extra={k: _take(v, rows) for k, v in self.extra.items()},
        )
        if self.image_grid_thw is not None:
            per_row = self.images_per_row.cpu()
            patches = self.image_grid_thw.prod(-1).cpu()
            img_start = torch.cumsum(per_row, 0) - per_row  # first image of each row
            patch_start = torch.cumsum(patches, 0) - patches  # first patch of each image
            images = [i for r in rows.tolist() for i in range(int(img_start[r]), int(img_start[r] + per_row[r]))]
            images_t = torch.tensor(images, dtype=torch.long)
            patch_idx = [torch.arange(int(patch_start[i]), int(patch_start[i] + patches[i])) for i in images]
            flat = torch.cat(patch_idx) if patch_idx else torch.zeros(0, dtype=torch.long)
            out.update(
                pixel_values=self.pixel_values[flat.to(self.pixel_values.device)],
                image_grid_thw=self.image_grid_thw[images_t.to(self.image_grid_thw.device)],
                images_per_row=self.images_per_row[rows.to(self.images_per_row.device)],
            )
        return PromptBatch(**out)

    def trim(self) -> PromptBatch:
        """Without the left-pad columns that every row has."""
        if not self.attention_mask.numel():
            return self
        first = int((self.attention_mask != 0).float().argmax(-1).min())
        if first == 0:
            return self
        cut = {"input_ids": self.input_ids[:, first:], "attention_mask": self.attention_mask[:, first:]}
        if self.mm_token_type_ids is not None:
            cut["mm_token_type_ids"] = self.mm_token_type_ids[:, first:]
        return replace(self, **cut)

    def model_inputs(self, model=None) -> dict[str, torch.Tensor]:
        """Keyword arguments for a HF model's ``forward`` / ``generate``.

        With ``model``: only the keys its forward names (``mm_token_type_ids`` is new in transformers 5.x;
        older releases derive M-RoPE positions from the image token ids), and ``pixel_values`` in the
        model's floating dtype.
        """
        out = {k: getattr(self, k) for k in MODEL_KEYS if getattr(self, k) is not None}
        if model is not None:
            keys = accepted_keys(model)
            out = {k: v for k, v in out.items() if k in keys}
            dtype = next(model.parameters()).dtype
            if "pixel_values" in out and out["pixel_values"].is_floating_point() and dtype.is_floating_point:
                out["pixel_values"] = out["pixel_values"].to(dtype)
        return out


def accepted_keys(model) -> frozenset[str]:
    """The :data:`MODEL_KEYS` a model's forward names explicitly (``input_ids``/``attention_mask`` always)."""
    inner = getattr(model, "base_model", model)
    names = set()
    for m in (model, inner):
        try:
            names |= set(inspect.signature(m.forward).parameters)
        except (TypeError, ValueError):
            pass
    return frozenset(k for k in MODEL_KEYS if k in names or k in ("input_ids", "attention_mask"))


@dataclass
class GroupBatch:
    """Prompts (each once) and completions that point at them.

    ``completion_ids`` ``[N, C]`` right padded; ``completion_mask`` ``[N, C]`` bool, the tokens that count
    (up to and including the stop); ``group`` ``[N]`` long: the row of ``prompts`` that completion ``n``
    continues. Every prompt row is used by at least one completion after :meth:`select`.
    """

    prompts: PromptBatch
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    group: torch.Tensor

    def __post_init__(self):
        _check_ids_and_mask(self.completion_ids, self.completion_mask, "completion_ids", "completion_mask", "[N, C]")
        self.completion_mask = self.completion_mask.bool()
        self.group = torch.as_tensor(self.group, dtype=torch.long)
        if self.group.shape != (self.completion_ids.shape[0],):
            raise ValueError(f"group must be [N={self.completion_ids.shape[0]}], got shape {tuple(self.group.shape)}")
        if len(self.group) and (int(self.group.min()) < 0 or int(self.group.max()) >= len(self.prompts)):
            raise IndexError(f"group must index the {len(self.prompts)} prompts, got values in "
                             f"[{int(self.group.min())}, {int(self.group.max())}]")

    @classmethod
    def grouped(cls, prompts: PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                group_size: int) -> GroupBatch:
        """``group_size`` consecutive completions per prompt: completion ``i`` continues prompt ``i // G``."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if completion_ids.shape[0] != len(prompts) * group_size:
            raise ValueError(f"completion_ids must have P x G = {len(prompts)} x {group_size} rows, "
                             f"got {completion_ids.shape[0]}")
        group = torch.arange(len(prompts), device=completion_ids.device).repeat_interleave(group_size)
        return cls(prompts, completion_ids, completion_mask, group)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per completion ``[N]``."""
        return self.completion_mask.sum(-1)

    def select(self, rows: torch.Tensor | Sequence[int]) -> GroupBatch:
        """Completions ``rows`` (in that order) and, once each, the prompts they continue (in prompt order).

        A micro-batch: a group split across micro-batches has its prompt in each of them.
        """
        rows = torch.as_tensor(rows, dtype=torch.long).flatten().to(self.completion_ids.device)
        group = self.group.to(rows.device)[rows]
        used, remapped = torch.unique(group, sorted=True, return_inverse=True)
        return GroupBatch(self.prompts.select(used), self.completion_ids[rows], self.completion_mask[rows],
                          remapped)

    def trim(self) -> GroupBatch:
        """Without the prompts' shared left padding and the columns after the longest completion (>= 1 kept)."""
        width = max(int(self.lengths.max()) if len(self) else 1, 1)
        return GroupBatch(self.prompts.trim(), self.completion_ids[:, :width], self.completion_mask[:, :width],
                          self.group)

    def repeated_prompts(self) -> PromptBatch:
        """One prompt row per completion (row ``n`` = prompt ``group[n]``): the plain-transformers layout."""
        return self.prompts.select(self.group)

    def prompt_tokens(self, shared_prefix: bool = True) -> int:
        """Prompt tokens a forward over this batch computes: each prompt once, or once per completion."""
        per_prompt = self.prompts.lengths().cpu()
        if shared_prefix:
            return int(per_prompt.sum())
        return int(per_prompt[self.group.cpu()].sum())


@dataclass
class Rollout(GroupBatch):
    """Sampled completions: a :class:`GroupBatch` plus what sampling saw.

    ``texts``: decoded completions (special tokens dropped); ``truncated`` ``[N]`` bool: hit the token
    limit before the stop string or EOS.
    """

    texts: list[str] = field(default_factory=list)
    truncated: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def completion_prompts(self, key: str) -> list:
        """The prompts' bookkeeping ``extra[key]`` for each completion (``[N]`` entries)."""
        return _take(self.prompts.extra[key], self.group.cpu())


def group_identical(keys: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, list[int]]:
    """Rows whose keys are equal (every tensor the same shape and values) share a prompt.

    ``keys[b]``: the tensors row ``b``'s prompt is made of, as a backbone reads them (ids, mask, images...).
    Returns ``group`` ``[B]`` (long, CPU): each row's distinct prompt, numbered in order of first
    appearance, and ``leaders``: the first row of each distinct prompt. Rows of a prompt may be anywhere.
    The one rule the adapters (TRL's, verl's) group their rows by.
    """
    # B is a micro-batch (a few rows to a few dozen): comparing each row with each distinct prompt is cheap.
    distinct, group, leaders = [], [], []
    for b, mine in enumerate(keys):
        found = next((g for g, theirs in enumerate(distinct)
                      if len(theirs) == len(mine)
                      and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(theirs, mine))), None)
        if found is None:
            found = len(distinct)
            distinct.append(mine)
            leaders.append(b)
        group.append(found)
    return torch.tensor(group, dtype=torch.long), leaders


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int],
                    stop_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, C]`` bool: the tokens up to and including the first EOS (all of them when there is none),
    cut at ``stop_lengths[n]`` tokens where that is ``>= 0`` (a stop string seen after that many)."""
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be [N, C], got shape {tuple(completion_ids.shape)}")
    n, c = completion_ids.shape
    eos = torch.tensor(sorted(set(eos_ids)), dtype=completion_ids.dtype, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos).int()
    # Tokens strictly after the first EOS have seen one EOS before them.
    mask = (torch.cumsum(is_eos, 1) - is_eos) == 0
    if stop_lengths is not None:
        stop = stop_lengths.to(completion_ids.device)
        limit = torch.where(stop >= 0, stop, torch.full_like(stop, c))
        mask &= torch.arange(c, device=completion_ids.device)[None] < limit[:, None]
    return mask


def encode_completions(tokenizer, texts: Sequence[str], end_id: int | None, *, pad_id: int | None = None,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Given completion texts as ids ``[N, C]`` (right padded) closed with ``end_id`` (when not None),
    and their mask: the targets of the supervised warm-up, the listener's prefills. The texts are text
    (:func:`lgrpo.prompts.encode_text`): a ``<|im_end|>`` spelled in one is not the control token."""

    pad = pad_id if pad_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    rows = [encode_text(tokenizer, t) + ([end_id] if end_id is not None else [])
            for t in texts]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), max(width, 1)), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)
