"""Qwen2.5-VL (``qwen2_5_vl``): 14-px patches, 2 × 2 merge (28 × 28 pixels per visual token), a windowed
vision tower, M-RoPE. The built-in ``tiny`` model is one."""

from __future__ import annotations

from .qwen_vl import QwenVL

# The published shapes (each model's config.json on the Hub, the fields the plan reads), so that a plan
# needs no download. Qwen2.5-VL's vision tower is the same for both sizes.
_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
           "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
           "fullatt_block_indexes": [7, 15, 23, 31]}
PUBLISHED = {
    "qwen2.5-vl-3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                      "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                      "tie_word_embeddings": True, "vision_config": {**_VISION, "out_hidden_size": 2048}},
    "qwen2.5-vl-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                      "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                      "tie_word_embeddings": False, "vision_config": {**_VISION, "out_hidden_size": 3584}},
}

FAMILY = QwenVL(
    name="Qwen2.5-VL", model_type="qwen2_5_vl",
    model_class_name="Qwen2_5_VLForConditionalGeneration", config_class_name="Qwen2_5_VLConfig",
    modeling_module="qwen2_5_vl.modeling_qwen2_5_vl", liger_function="apply_liger_kernel_to_qwen2_5_vl",
    tiny_name="tiny-qwen2.5-vl",
    published=PUBLISHED,
    published_max_pixels=12845056,  # Qwen2.5-VL's preprocessor_config.json
)
