"""Model inputs for Qwen2.5-VL built from the tokenizer and the PIL image processor, without a Processor.

``Qwen2_5_VLProcessor`` insists on a video processor that needs torchvision; this module does its job for
images: each image is patchified by Qwen2-VL's image processor, and its single ``<|image_pad|>``
placeholder in the tokenized text is expanded to ``grid_thw.prod() // merge_size**2`` tokens. Rows are
left-padded (generation appends on the right). ``mm_token_type_ids`` marks image tokens so the model
computes its 3-D (M-RoPE) positions.

- :class:`PromptBatch`: prompts (for ``generate`` and the listener).
- :class:`UpdateBatch`: prompt + completion tokens for the policy update, with the completion mask and the
  targets already aligned to the hidden states that predict them (the loss kernels never shift).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from PIL import Image

from .images import to_rgb
from .prompts import (
    DEFAULT_FORMAT,
    IMAGE_PLACEHOLDER,
    PromptFormat,
    render_listener_prompt,
    render_reasoner_prompt,
    stop_token_ids,
)


@dataclass(frozen=True)
class ProcessedImage:
    """One image after the image processor: patches ``[n_patches, patch_dim]`` and its grid (t, h, w)."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor

    def num_tokens(self, merge_size: int) -> int:
        """Visual tokens in the LLM sequence: patches merged ``merge_size × merge_size``."""
        return int(self.grid_thw.prod()) // merge_size**2


# An image as given by callers: decoded PIL, or already patchified (reuse across a GRPO group).
ImageLike = Image.Image | ProcessedImage


@dataclass
class PromptBatch:
    """Left-padded prompts with their images.

    ``input_ids``/``attention_mask``/``mm_token_type_ids`` ``[B, T]``; ``pixel_values`` ``[sum patches, D]``
    and ``image_grid_thw`` ``[n_images, 3]`` in row order; ``images_per_row`` ``[B]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    images_per_row: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        """Padded prompt length T."""
        return self.input_ids.shape[1]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(...)`` and ``model.generate(...)``."""
        return _model_inputs(self)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> PromptBatch:
        """Move to ``device``; ``dtype`` casts ``pixel_values`` only (match the vision tower's dtype)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)}
        if dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return replace(self, **moved)

    def repeat_interleave(self, repeats: int) -> PromptBatch:
        """Each row ``repeats`` times in a row (GRPO groups: G completions per prompt), images included."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        patches = self.image_grid_thw.prod(-1)
        img_row = torch.repeat_interleave(torch.arange(len(self), device=patches.device), self.images_per_row)
        starts = torch.cumsum(patches, 0) - patches
        per_row = [torch.nonzero(img_row == r).flatten() for r in range(len(self))]
        order = torch.cat([idx for idx in per_row for _ in range(repeats)]) if len(img_row) else img_row
        pix = [self.pixel_values[starts[i]: starts[i] + patches[i]] for i in order.tolist()]
        return PromptBatch(
            input_ids=self.input_ids.repeat_interleave(repeats, 0),
            attention_mask=self.attention_mask.repeat_interleave(repeats, 0),
            mm_token_type_ids=self.mm_token_type_ids.repeat_interleave(repeats, 0),
            pixel_values=torch.cat(pix) if pix else self.pixel_values,
            image_grid_thw=self.image_grid_thw[order],
            images_per_row=self.images_per_row.repeat_interleave(repeats, 0),
        )


@dataclass
class UpdateBatch:
    """Prompt + completion for the policy update: ``[B, P + C]`` with P the padded prompt length.

    Row layout: left padding, prompt, completion, right padding (after the first EOS). The hidden state
    at position ``P - 1 + c`` predicts completion token ``c``: :meth:`completion_hidden` slices those,
    and ``targets[b, c]`` / ``completion_mask[b, c]`` line up with them (``[B, C]``), ready for
    ``linear_grpo_loss(batch.completion_hidden(hidden), lm_head.weight, batch.targets, adv,
    batch.completion_mask)``. Masked targets hold the pad id (a valid id, never read).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    targets: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(...)`` / :func:`lgrpo.model.final_hidden_states`."""
        return _model_inputs(self)

    def completion_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden[:, P-1 : P-1+C]``: the positions whose next token is a completion token."""
        if hidden.shape[:2] != self.input_ids.shape:
            raise ValueError(f"hidden must be [B, T, H] with [B, T] = {tuple(self.input_ids.shape)}, "
                             f"got {tuple(hidden.shape)}")
        c = self.targets.shape[1]
        return hidden[:, self.prompt_length - 1: self.prompt_length - 1 + c]

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> UpdateBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "prompt_length"}
        if dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return replace(self, **moved)


_MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def _model_inputs(batch) -> dict[str, torch.Tensor]:
    return {name: getattr(batch, name) for name in _MODEL_INPUTS}


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """``[B, C]`` bool: tokens up to and including the first EOS (all of them when there is none)."""
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be [B, C], got shape {tuple(completion_ids.shape)}")
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    # Tokens strictly after the first EOS have seen one EOS before them.
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return eos_before == 0


class VLBatcher:
    """Builds :class:`PromptBatch` / :class:`UpdateBatch` from texts and images for one model family."""

    def __init__(self, tokenizer, image_processor, fmt: PromptFormat = DEFAULT_FORMAT):
        self.tokenizer, self.image_processor, self.fmt = tokenizer, image_processor, fmt
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token; is it a Qwen2-VL tokenizer?")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.pad_id = tokenizer.pad_token_id
        self.merge_size = int(image_processor.merge_size)
        self.eos_ids = list(stop_token_ids(tokenizer))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "tiny", fmt: PromptFormat = DEFAULT_FORMAT, *,
                        min_pixels: int | None = None, max_pixels: int | None = None) -> VLBatcher:
        """Tokenizer and image processor of ``"tiny"`` or a local model folder."""
        from .model import load_image_processor, load_tokenizer

        return cls(load_tokenizer(name_or_path),
                   load_image_processor(name_or_path, min_pixels=min_pixels, max_pixels=max_pixels), fmt)

    # -- images ---------------------------------------------------------------------------------------

    def process_images(self, images: Sequence[Image.Image]) -> list[ProcessedImage]:
        """Patchify images (any sizes). Process a pair once and reuse it for all G completions."""
        if not images:
            return []
        rgb = [to_rgb(img) for img in images]  # upright, 8-bit, transparency over white
        out = self.image_processor(images=rgb, return_tensors="pt")
        pixel_values, grids = torch.as_tensor(out["pixel_values"]), torch.as_tensor(out["image_grid_thw"])
        sizes = grids.prod(-1).tolist()
        return [ProcessedImage(pv, g) for pv, g in zip(torch.split(pixel_values, sizes), grids)]

    # -- prompts --------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], images: Sequence[Sequence[ImageLike]]) -> PromptBatch:
        """Left-padded batch from rendered texts (one placeholder per image) and each row's images."""
        if len(texts) != len(images):
            raise ValueError(f"got {len(texts)} texts but {len(images)} image lists")
        if not texts:
            raise ValueError("cannot build an empty batch")
        processed = self._processed(images)
        rows = []
        for b, (text, imgs) in enumerate(zip(texts, processed)):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(self._expand(ids, imgs, b))
        return self._pad_left(rows, processed)

    def reasoner_batch(self, prompts: Sequence[str],
                       images: Sequence[Sequence[ImageLike]]) -> PromptBatch:
        """The reasoner's prompts (system + user turn with both images + question, assistant turn opened)."""
        return self.encode([render_reasoner_prompt(self.tokenizer, p, self.fmt) for p in prompts], images)

    def listener_batch(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]],
                       reasonings: Sequence[str]) -> PromptBatch:
        """The listener's inputs: reasoner prompt + assistant turn prefilled up to ``<answer>``."""
        if len(reasonings) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(reasonings)} reasonings")
        texts = [render_listener_prompt(self.tokenizer, p, r, self.fmt) for p, r in zip(prompts, reasonings)]
        return self.encode(texts, images)

    # -- policy update --------------------------------------------------------------------------------

    def update_batch(self, prompts: PromptBatch, completion_ids: torch.Tensor | Sequence[Sequence[int]],
                     mask: torch.Tensor | None = None) -> UpdateBatch:
        """Prompt + completion tokens for the loss.

        ``completion_ids``: ``[B, C]`` (e.g. ``generate``'s output ``[:, P:]``) or a list of id lists.
        ``mask``: which completion tokens count; default :func:`completion_mask` (up to and including the
        first EOS). ``prompts`` must have one row per completion (``repeat_interleave`` for groups).
        """
        given = None  # for id lists: which positions hold a token at all
        if not isinstance(completion_ids, torch.Tensor):
            width = max((len(c) for c in completion_ids), default=0)
            given = torch.zeros(len(completion_ids), width, dtype=torch.bool)
            for b, c in enumerate(completion_ids):
                given[b, : len(c)] = True
            padded = [list(c) + [self.pad_id] * (width - len(c)) for c in completion_ids]
            completion_ids = torch.tensor(padded, dtype=torch.long).view(len(given), width)
        completion_ids = completion_ids.to(prompts.input_ids.device).long()
        if completion_ids.dim() != 2 or completion_ids.shape[0] != len(prompts):
            raise ValueError(f"completion_ids must be [B={len(prompts)}, C], "
                             f"got {tuple(completion_ids.shape)}")
        if completion_ids.shape[1] == 0:
            raise ValueError("completions are empty (C = 0)")
        if mask is None:
            mask = completion_mask(completion_ids, self.eos_ids)
        mask = mask.to(completion_ids.device).bool()
        if mask.shape != completion_ids.shape:
            raise ValueError(f"mask must have shape {tuple(completion_ids.shape)}, got {tuple(mask.shape)}")
        if given is not None:
            mask = mask & given.to(mask.device)
        targets = torch.where(mask, completion_ids, torch.full_like(completion_ids, self.pad_id))
        text_types = torch.zeros_like(targets, dtype=prompts.mm_token_type_ids.dtype)  # completions are text
        return UpdateBatch(
            input_ids=torch.cat([prompts.input_ids, targets], 1),
            attention_mask=torch.cat([prompts.attention_mask, mask.to(prompts.attention_mask.dtype)], 1),
            mm_token_type_ids=torch.cat([prompts.mm_token_type_ids, text_types], 1),
            pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
            targets=targets, completion_mask=mask, prompt_length=prompts.length)

    def completion_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of given completions, each closed with ``<|im_end|>`` as the policy would end its turn
        (e.g. the synthetic task's reference completions for the supervised warm-up)."""
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return [self.tokenizer.encode(t, add_special_tokens=False) + [end] for t in texts]

    def decode(self, completion_ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """Completion texts (special tokens dropped), reading only the masked-in tokens."""
        if mask is None:
            mask = completion_mask(completion_ids, self.eos_ids)
        return [self.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                for ids, m in zip(completion_ids, mask.bool())]

    # -- internals ------------------------------------------------------------------------------------

    def _processed(self, images) -> list[list[ProcessedImage]]:
        todo = [img for row in images for img in row if not isinstance(img, ProcessedImage)]
        done = iter(self.process_images(todo))
        return [[img if isinstance(img, ProcessedImage) else next(done) for img in row] for row in images]

    def _expand(self, ids: list[int], imgs: list[ProcessedImage], row: int) -> list[int]:
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(imgs):
            raise ValueError(f"row {row}: the text has {len(slots)} {IMAGE_PLACEHOLDER} placeholders but "
                             f"{len(imgs)} images were given")
        out, prev = [], 0
        for slot, img in zip(slots, imgs):
            out += ids[prev:slot] + [self.image_token_id] * img.num_tokens(self.merge_size)
            prev = slot + 1
        return out + ids[prev:]

    def _pad_left(self, rows: list[list[int]], processed: list[list[ProcessedImage]]) -> PromptBatch:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, width - len(r):] = 1
        flat = [img for row in processed for img in row]
        if flat:
            pixel_values = torch.cat([img.pixel_values for img in flat])
            grids = torch.stack([img.grid_thw for img in flat]).long()
        else:
            pixel_values, grids = torch.zeros(0, 0), torch.zeros(0, 3, dtype=torch.long)
        return PromptBatch(
            input_ids=input_ids, attention_mask=attention_mask,
            mm_token_type_ids=((input_ids == self.image_token_id) & attention_mask.bool()).to(torch.int32),
            pixel_values=pixel_values, image_grid_thw=grids,
            images_per_row=torch.tensor([len(row) for row in processed], dtype=torch.long))
