"""Qwen3-VL, dense (``qwen3_vl``): a Qwen3 text model (q/k norms, interleaved M-RoPE) and a vision tower of
16-px patches, 2 × 2 merged (32 × 32 pixels per visual token), with **DeepStack**: features of a few vision
blocks (``deepstack_visual_indexes``), merged like the last one, are added to the hidden states of the first
decoder layers at the image tokens.

DeepStack needs nothing of lgrpo: the model's forward takes it from ``pixel_values`` and adds it where
``input_ids`` holds the image placeholder. A shared-prefix forward holds each prompt (and its placeholders)
once, and completions are text, so each prompt's DeepStack features are computed and added once, never to
a completion; the engine's prefill is the model's forward over the prompts and its decode steps carry no
images. Its MoE sibling (``qwen3_vl_moe``) is another family, not supported.

What differs from Qwen2/2.5-VL here: the text model builds its mask with ``create_causal_mask`` whatever
it is given, where the others take a ``{layer type: mask}`` dict of prepared masks as it is;
:meth:`Qwen3VL.prepare` makes it take one too (the shared-prefix layout, the engine's decode mask).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .qwen_vl import QwenVL


def _taking_prepared_masks(create):
    """``create_causal_mask`` that hands back a dict of prepared masks' full-attention entry as it is (the
    Qwen3-VL text model has full-attention layers only) and builds every other mask as before."""

    def create_causal_mask(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            return mask["full_attention"]
        return create(*args, **kwargs)

    create_causal_mask.lgrpo_original = create
    return create_causal_mask


@dataclass(frozen=True)
class Qwen3VL(QwenVL):
    def prepare(self, model) -> None:
        modeling = importlib.import_module(f"transformers.models.{self.modeling_module}")
        if not hasattr(modeling.create_causal_mask, "lgrpo_original"):
            modeling.create_causal_mask = _taking_prepared_masks(modeling.create_causal_mask)


# The published shapes (each model's config.json on the Hub, the fields the plan reads).
_TEXT = {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
         "vocab_size": 151936, "max_position_embeddings": 262144, "rope_theta": 5000000,
         "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [24, 20, 20]}}
_VISION = {"hidden_act": "gelu_pytorch_tanh", "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2,
           "temporal_patch_size": 2, "num_position_embeddings": 2304, "in_channels": 3}
PUBLISHED = {
    "qwen3-vl-4b": {"tie_word_embeddings": True,
                    "text_config": {**_TEXT, "hidden_size": 2560, "intermediate_size": 9728,
                                    "tie_word_embeddings": True},
                    "vision_config": {**_VISION, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                                      "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17]}},
    "qwen3-vl-8b": {"tie_word_embeddings": False,
                    "text_config": {**_TEXT, "hidden_size": 4096, "intermediate_size": 12288,
                                    "tie_word_embeddings": False},
                    "vision_config": {**_VISION, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                                      "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]}},
}

FAMILY = Qwen3VL(
    name="Qwen3-VL", model_type="qwen3_vl",
    model_class_name="Qwen3VLForConditionalGeneration", config_class_name="Qwen3VLConfig",
    modeling_module="qwen3_vl.modeling_qwen3_vl", liger_function="apply_liger_kernel_to_qwen3_vl",
    tiny_name="tiny-qwen3-vl",
    pixels=(256 * 256, 4096 * 4096),  # Qwen2VLImageProcessor's class defaults are Qwen2-VL's; these Qwen3-VL's
    published=PUBLISHED,
    published_max_pixels=16777216,  # Qwen3-VL's preprocessor_config.json
    vllm_unsupported="the vLLM rollout hands vLLM each image's merged vision output, not the DeepStack "
                     "features Qwen3-VL adds to its first decoder layers; use --rollout.engine engine",
)
