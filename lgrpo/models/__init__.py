"""Model families: one module per family behind one small protocol, the only place a family's rules live.

Scoring, the rollout engine, the listener, the batcher, the memory plan and the TRL adapter ask the family
(:class:`Family`) instead of naming a model class. The family of a folder is its ``config.json``'s
``model_type`` (:func:`family_for`); of a loaded model, its config's (:func:`family_of`). A model type
that is not here (a MoE variant, Qwen3.5's linear-attention layers, any other VLM) is refused, naming what
is supported.

Adding a family: a module beside these with a ``FAMILY`` (for the Qwen-VL lineage a
:class:`~.qwen_vl.QwenVL` with its classes, patch size and published shapes), its entry in
:data:`FAMILIES`, and its tiny assets written by ``tools/build_tiny_assets.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import qwen2_5_vl, qwen2_vl, qwen3_vl
from .qwen_vl import placeholder_token_ids

if TYPE_CHECKING:  # annotations only: the config imports this package, and no torch
    import torch


class Family(Protocol):
    """What lgrpo needs to know about a family of vision-language models."""

    name: str  # as people write it: "Qwen2.5-VL"
    model_type: str  # config.json's
    image_placeholder: str  # the one token the chat template writes per image, expanded by the batcher
    published: dict  # preset name -> the fields of that model's config.json the memory plan reads
    published_max_pixels: int  # those models' image-area bound (their preprocessor_config.json)
    vllm_unsupported: str | None  # why the vLLM rollout cannot serve this family, or None

    @property
    def tiny(self) -> Path:
        """The built-in tiny model's folder (configs and tokenizer; weights from a seed)."""

    def model_class(self) -> type: ...

    def config_class(self) -> type: ...

    def prepare(self, model) -> None:
        """Make the model's forward take a ``{layer type: mask}`` dict of prepared masks as it is."""

    def image_processor(self, cfg: dict, min_pixels: int | None, max_pixels: int | None):
        """The image processor from a ``preprocessor_config.json``'s content and area bounds."""

    def apply_liger(self, model) -> list[str]:
        """liger-kernel's kernels for this family; the names of those that take effect."""

    def banned_ids(self, config) -> list[int]:
        """Token ids never sampled (vision placeholders and delimiters)."""

    def image_tokens(self, image_processor, width: int, height: int) -> int:
        """Visual tokens of one image of this size."""

    def max_image_tokens(self, image_processor) -> int:
        """Visual tokens of an image at the largest size the processor resizes to."""

    def prompt_positions(self, model, prompts, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' positions and the position of the token after each prompt ``[P]``."""

    def continuation_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """The positions the model reads for continuation tokens at text positions ``pos``."""

    def vision_shapes(self, vision) -> dict[str, int]:
        """The vision tower's shapes the memory plan reads."""

    def vision_tower(self, model) -> torch.nn.Module:
        """The loaded model's vision tower (its parameters: the plan's count; LoRA's ``visual.NAME``)."""


FAMILIES: dict[str, Family] = {f.model_type: f for f in (qwen2_vl.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY)}
DEFAULT = qwen2_5_vl.FAMILY  # the family of the built-in "tiny" model


def supported() -> str:
    """The supported families, for messages: ``Qwen2.5-VL (qwen2_5_vl), ...``."""
    return ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())


def family_names() -> str:
    """The supported families as people write them: ``Qwen2-VL, Qwen2.5-VL or Qwen3-VL``."""
    names = [f.name for f in FAMILIES.values()]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def family_named(model_type: str | None, where: str = "the model") -> Family:
    """The family of a ``model_type``; ``ValueError`` naming what is supported for any other."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"{where} holds a {model_type!r} model; lgrpo supports {supported()}")
    return family


def family_for(folder: str | os.PathLike) -> Family:
    """The family of a model folder, read from its ``config.json``'s ``model_type`` (a config class reports
    its own class's type whatever the file says, so the file is read)."""
    path = Path(folder)
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    return family_named(model_type, str(path))


def family_of(model) -> Family | None:
    """The family of a loaded model; None for a text model (no vision config). A vision-language model of
    another family is refused: its positions and tokens follow rules lgrpo does not know."""
    config = model.config
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None and getattr(config, "vision_config", None) is not None:
        raise ValueError(f"{type(model).__name__} ({config.model_type!r}) is a vision-language model of a family "
                         f"lgrpo does not support; supported: {supported()}")
    return family


def tiny_folders() -> dict[str, Path]:
    """The built-in tiny models by name ("tiny" is the default family's)."""
    out = {"tiny": DEFAULT.tiny}
    out.update({f.tiny.name: f.tiny for f in FAMILIES.values()})
    return out


def published() -> dict[str, tuple[Family, dict]]:
    """Every family's published shapes by preset name."""
    return {name: (f, shapes) for f in FAMILIES.values() for name, shapes in f.published.items()}


def banned_ids(config) -> list[int]:
    """Token ids a model's config says are never sampled: its family's rule; for a config of no family,
    the vision placeholder ids it names (none for a text model)."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    return placeholder_token_ids(config) if family is None else family.banned_ids(config)


def vision_tower(model):
    """A loaded model's vision tower, or None for a text model (:meth:`Family.vision_tower`)."""
    family = family_of(model)
    return None if family is None else family.vision_tower(model)


def prepare(model) -> None:
    """Make a loaded model's forward take lgrpo's prepared masks (its family's :meth:`Family.prepare`;
    nothing for a text model). Idempotent: every path that hands the model such masks calls it."""
    family = family_of(model)
    if family is not None:
        family.prepare(model)
