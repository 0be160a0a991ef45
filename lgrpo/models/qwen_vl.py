"""The rules the Qwen-VL lineage (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) shares, written once; each family module
(:mod:`.qwen2_vl`, :mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`) is a :class:`QwenVL` with its own classes, patch
size, liger kernels and published shapes.

- **Images**: Qwen2-VL's image processor patchifies each image into ``patch × patch`` squares (14 px for
  Qwen2/2.5-VL, 16 px for Qwen3-VL) and the vision tower merges ``merge × merge`` of them into one token, so
  an image of area A becomes ``A / (patch · merge)²`` visual tokens. The chat template writes each image
  as ``<|vision_start|><|image_pad|><|vision_end|>``; the batcher expands ``<|image_pad|>`` to that count.
- **Positions** (M-RoPE): three axes (time, height, width); an image's tokens are numbered over its merged
  patch grid, text on all three axes alike (``get_rope_index`` of the model). The token after a prompt is
  at the prompt's largest position + 1 on every axis (``generate``'s ``rope_deltas``): completion tokens
  are text.
- **Never sampled**: the vision placeholders and delimiters (one in a completion breaks the next forward,
  which counts placeholders against image features).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the config imports this package, and no torch
    import torch


ASSETS = Path(__file__).resolve().parent.parent / "assets"

IMAGE_PLACEHOLDER = "<|image_pad|>"
# Qwen's two end markers: <|im_end|> ends an assistant turn (the Instruct tokenizers' EOS), <|endoftext|>
# ends a document (the base tokenizers' EOS, and what the models' generation_config also stops on).
END_MARKERS = ("<|im_end|>", "<|endoftext|>")
# What a prompt batch hands the model's forward / generate: the lineage's image inputs are patches, their
# grids and the per-token modality (M-RoPE numbers image tokens over their grid).
MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
IMAGE_INPUTS = MODEL_INPUTS[2:]
# The config fields naming vision placeholder / delimiter ids.
VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                       "vision_token_id")


def placeholder_token_ids(config) -> list[int]:
    """The vision placeholder / delimiter ids a (V)LM config names (empty for a text model)."""
    ids = [getattr(config, n, None) for n in VISION_TOKEN_FIELDS]
    return [int(i) for i in ids if isinstance(i, int)]


def pil_image_processor_class():
    """Qwen2-VL's PIL/numpy image processor (torchvision may not import beside a CPU torch), which every
    family of the lineage uses.

    transformers >= 5.x (the releases with backend-specific processors) names it
    ``Qwen2VLImageProcessorPil``; earlier releases' ``Qwen2VLImageProcessor`` is the PIL/numpy one.
    """
    import transformers

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if cls is None:
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
                Qwen2VLImageProcessorPil as cls,
            )
        except ImportError:
            from transformers import Qwen2VLImageProcessor as cls
    return cls


# Settings of a preprocessor_config.json that the image processor takes as they are.
_PROCESSOR_KEYS = ("do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                   "resample", "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size")


@dataclass(frozen=True)
class QwenVL:
    """One family of the Qwen-VL lineage: what differs between them is data; the rules are these methods.

    ``pixels``: the folder-less default bounds (min, max) on an image's resized area, as the image
    processor's class has them. ``published``: preset name -> the fields of that model's ``config.json``
    the memory plan reads (no download needed); ``published_max_pixels``: their image bound.
    """

    name: str  # as people write it: "Qwen2.5-VL"
    model_type: str  # config.json's
    model_class_name: str  # in transformers
    config_class_name: str
    modeling_module: str  # transformers.models.<this>
    liger_function: str  # in liger_kernel.transformers
    tiny_name: str  # the built-in tiny model: "tiny-qwen2.5-vl" (a folder under lgrpo/assets)
    pixels: tuple[int, int] = (56 * 56, 28 * 28 * 1280)
    published: dict = field(default_factory=dict)
    published_max_pixels: int = 0
    image_placeholder: str = IMAGE_PLACEHOLDER  # what the chat template writes per image
    # Why the vLLM rollout (which hands vLLM each image's merged vision output as its embedding) cannot
    # serve this family, or None.
    vllm_unsupported: str | None = None

    # -- classes and loading ----------------------------------------------------------------------------

    @property
    def tiny(self) -> Path:
        """The tiny model's folder: configs and tokenizer, weights initialised from a seed."""
        return ASSETS / self.tiny_name

    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def config_class(self):
        import transformers

        return getattr(transformers, self.config_class_name)

    def prepare(self, model) -> None:
        """Make ``model``'s forward take lgrpo's prepared masks (a ``{layer type: mask}`` dict) as they are;
        idempotent. Qwen2-VL and Qwen2.5-VL do already."""

    def image_processor(self, cfg: dict, min_pixels: int | None, max_pixels: int | None):
        """The PIL image processor from a ``preprocessor_config.json``'s content, its area bounds overridden
        by ``min_pixels`` / ``max_pixels`` where given."""
        cfg = dict(cfg)
        size = dict(cfg.pop("size", None) or {})
        folder_lo = cfg.pop("min_pixels", size.get("shortest_edge", self.pixels[0]))
        folder_hi = cfg.pop("max_pixels", size.get("longest_edge", self.pixels[1]))
        lo = folder_lo if min_pixels is None else min_pixels
        hi = folder_hi if max_pixels is None else max_pixels
        if not 0 < lo <= hi:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {lo}, {hi}")
        kwargs = {k: v for k, v in cfg.items() if k in _PROCESSOR_KEYS}
        # A fresh size dict: some 5.x releases mutate the class-level default when given min/max_pixels.
        return pil_image_processor_class()(size={"shortest_edge": int(lo), "longest_edge": int(hi)}, **kwargs)

    def apply_liger(self, model) -> list[str]:
        """Swap in liger-kernel's RMSNorm, SwiGLU and multimodal RoPE kernels for this family's model.

        Its cross-entropy and fused-linear-cross-entropy patches stay off: the model's forward keeps returning
        logits/hidden states, and the GRPO loss is the trainer's own. Returns the kernels that take effect:
        liger replaces ``apply_multimodal_rotary_pos_emb``, which transformers 5.x no longer calls (it merges
        the M-RoPE sections before attention), so there only RMSNorm and SwiGLU change. Raises
        ``RuntimeError`` when this liger-kernel cannot patch the installed transformers.
        """
        import transformers

        modeling = importlib.import_module(f"transformers.models.{self.modeling_module}")
        rope_used = hasattr(modeling, "apply_multimodal_rotary_pos_emb")
        try:
            patch = getattr(importlib.import_module("liger_kernel.transformers"), self.liger_function)
            patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
                  model=model)
        except (ImportError, AttributeError) as err:  # AttributeError: a liger release without this family
            raise RuntimeError(f"liger-kernel cannot patch {self.name} under transformers "
                               f"{transformers.__version__}: {err}") from err
        return ["rms_norm", "swiglu"] + (["rope"] if rope_used else [])

    # -- tokens -----------------------------------------------------------------------------------------

    def banned_ids(self, config) -> list[int]:
        """Ids never sampled: the vision placeholders and delimiters."""
        return placeholder_token_ids(config)

    def image_tokens(self, image_processor, width: int, height: int) -> int:
        """Visual tokens of one ``width × height`` image after the processor's resize and the merge."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
        size = image_processor.size
        h, w = smart_resize(height, width, factor=patch * merge, min_pixels=size["shortest_edge"],
                            max_pixels=size["longest_edge"])
        return (h // patch) * (w // patch) // merge**2

    def max_image_tokens(self, image_processor) -> int:
        """Visual tokens of an image at the largest area the processor resizes to."""
        ip = image_processor
        return ip.size["longest_edge"] // (int(ip.patch_size) * int(ip.merge_size)) ** 2

    # -- positions --------------------------------------------------------------------------------------

    def prompt_positions(self, model, prompts, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions ``[3, P, L]`` of a left-padded prompt batch and the position of the token after
        each prompt ``[P]``; ``text``: the batch's text positions (what a text-only row gets on each axis)."""
        mask = prompts.attention_mask.bool()
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

    def continuation_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Positions ``[3, N, J]`` of continuation tokens at text positions ``pos`` ``[N, J]``: text tokens
        get the same position on all three axes."""
        return pos.unsqueeze(0).expand(3, -1, -1)

    # -- shapes -----------------------------------------------------------------------------------------

    def vision_shapes(self, vision) -> dict[str, int]:
        """The vision tower's shapes the memory plan reads, from the built config's ``vision_config``."""
        return dict(vision_layers=vision.depth, vision_hidden=vision.hidden_size,
                    vision_intermediate=vision.intermediate_size, vision_heads=vision.num_heads,
                    patch=vision.patch_size, merge=vision.spatial_merge_size)

    def vision_tower(self, model):
        # The conditional-generation class keeps the tower on its inner model (model.model.visual); a bare
        # inner model (FSDP2's or peft's base_model) has it itself.
        inner = getattr(model, "model", model)
        return getattr(inner, "visual", None) or model.visual
