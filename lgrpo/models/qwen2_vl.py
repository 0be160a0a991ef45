"""Qwen2-VL (``qwen2_vl``): Qwen2.5-VL's text model and positions, 14-px patches and the 2 × 2 merge (28 × 28
pixels per visual token); its vision tower has no windowed attention and is ``embed_dim`` wide."""

from __future__ import annotations

from dataclasses import dataclass

from .qwen_vl import QwenVL


@dataclass(frozen=True)
class Qwen2VL(QwenVL):
    def vision_shapes(self, vision) -> dict[str, int]:
        """Qwen2-VL's vision config names its width ``embed_dim`` (``hidden_size`` is the LLM's) and its MLP
        ``mlp_ratio`` times that."""
        return dict(vision_layers=vision.depth, vision_hidden=vision.embed_dim,
                    vision_intermediate=vision.embed_dim * vision.mlp_ratio, vision_heads=vision.num_heads,
                    patch=vision.patch_size, merge=vision.spatial_merge_size)


FAMILY = Qwen2VL(
    name="Qwen2-VL", model_type="qwen2_vl",
    model_class_name="Qwen2VLForConditionalGeneration", config_class_name="Qwen2VLConfig",
    modeling_module="qwen2_vl.modeling_qwen2_vl", liger_function="apply_liger_kernel_to_qwen2_vl",
    tiny_name="tiny-qwen2-vl",
)
