"""Model inputs built from the tokenizer and the family's PIL image processor, without a Processor.

The transformers Processors of the Qwen-VL families insist on a video processor that needs torchvision;
this module does their job for images: each image is patchified by the family's image processor
(:mod:`lgrpo.models`), and its single placeholder (``<|image_pad|>``) in the tokenized text is expanded to
``grid_thw.prod() // merge_size**2`` tokens. Rows are
left-padded (generation appends on the right). ``mm_token_type_ids`` marks image tokens so the model
computes its 3-D (M-RoPE) positions. The result is a :class:`lgrpo.group.PromptBatch`, the prompt half of
the step's batch (:mod:`lgrpo.group`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .group import PromptBatch
from .images import to_rgb
from .models import DEFAULT, Family, family_for
from .prompts import (
    DEFAULT_FORMAT,
    ChatText,
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


class VLBatcher:
    """Builds :class:`lgrpo.group.PromptBatch` from texts and images for one model family."""

    def __init__(self, tokenizer, image_processor, fmt: PromptFormat = DEFAULT_FORMAT, *,
                 family: Family = DEFAULT):
        self.tokenizer, self.image_processor, self.fmt, self.family = tokenizer, image_processor, fmt, family
        self.placeholder = family.image_placeholder
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.placeholder)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.placeholder} token; is it a {family.name} tokenizer?")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.pad_id = tokenizer.pad_token_id
        self.merge_size = int(image_processor.merge_size)
        self.eos_ids = list(stop_token_ids(tokenizer))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "tiny", fmt: PromptFormat = DEFAULT_FORMAT, *,
                        min_pixels: int | None = None, max_pixels: int | None = None) -> VLBatcher:
        """Tokenizer and image processor of ``"tiny"`` or a local model folder."""
        from .model import load_image_processor, load_tokenizer, model_dir

        family = family_for(model_dir(name_or_path))  # an unsupported model type is refused before loading
        return cls(load_tokenizer(name_or_path),
                   load_image_processor(name_or_path, min_pixels=min_pixels, max_pixels=max_pixels), fmt,
                   family=family)

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
        """Left-padded batch from rendered texts (one placeholder per image) and each row's images.

        A :class:`ChatText` (what the renderers return) is encoded by its rule: only the template's control
        tokens are live, whatever the prompt or reasoning in it spells. A plain ``str`` is taken as a
        trusted rendering: every control token in it is live."""
        if len(texts) != len(images):
            raise ValueError(f"got {len(texts)} texts but {len(images)} image lists")
        if not texts:
            raise ValueError("cannot build an empty batch")
        processed = self._processed(images)
        rows = []
        for b, (text, imgs) in enumerate(zip(texts, processed)):
            rows.append(self._expand(self.text_ids(text), imgs, b))
        return self._pad_left(rows, processed)

    def text_ids(self, text: str) -> list[int]:
        """A rendered text's ids before the image placeholders are expanded (see :meth:`encode`)."""
        if isinstance(text, ChatText):
            return text.ids(self.tokenizer)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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

    # -- internals ------------------------------------------------------------------------------------

    def _processed(self, images) -> list[list[ProcessedImage]]:
        todo = [img for row in images for img in row if not isinstance(img, ProcessedImage)]
        done = iter(self.process_images(todo))
        return [[img if isinstance(img, ProcessedImage) else next(done) for img in row] for row in images]

    def _expand(self, ids: list[int], imgs: list[ProcessedImage], row: int) -> list[int]:
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(imgs):
            raise ValueError(f"row {row}: the text has {len(slots)} {self.placeholder} placeholders but "
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
        pixel_values = torch.cat([img.pixel_values for img in flat]) if flat else None
        grids = torch.stack([img.grid_thw for img in flat]).long() if flat else None
        return PromptBatch(
            input_ids=input_ids, attention_mask=attention_mask,
            mm_token_type_ids=((input_ids == self.image_token_id) & attention_mask.bool()).to(torch.int32),
            pixel_values=pixel_values, image_grid_thw=grids,
            images_per_row=torch.tensor([len(row) for row in processed], dtype=torch.long) if flat else None)
