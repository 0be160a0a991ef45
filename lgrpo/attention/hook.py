"""How a shared-prefix layout reaches the attention layers of an unmodified transformers model.

:func:`install` wraps the attention function transformers registered under the model's
``attn_implementation`` (``sdpa``, ``flash_attention_2``, ...) with a dispatcher that runs the
layout's attention when the mask is a :class:`SharedPrefixLayout` and calls the original function
unchanged otherwise, so every other forward (generate, the vision tower) is untouched. The dispatch
lives in the registry, not in a config switch, because gradient checkpointing replays a layer's forward
during the backward, after any per-call switch would have been undone. No modeling file is copied.
"""

from __future__ import annotations

import torch

from .layout import SharedPrefixLayout


def shared_prefix_attention(module, query, key, value, layout: SharedPrefixLayout, dropout: float = 0.0,
                            scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """One layer's attention over a flat shared-prefix sequence (``query`` ``[1, H, T, D]``).

    Returns ``[1, T, H, D]`` as transformers' attention functions do.
    """
    if query.shape[0] != 1 or query.shape[2] != layout.num_tokens:
        raise ValueError(f"shared-prefix attention takes one flat sequence of {layout.num_tokens} tokens, "
                         f"got query of shape {tuple(query.shape)}")
    if sliding_window:
        raise ValueError("shared-prefix attention does not implement sliding-window layers")
    dtype = compute_dtype(query.device, value.dtype)
    q, k, v = (x[0].to(dtype) for x in (query, key, value))
    return layout.attend(q, k, v, dropout, scaling)[None], None


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on (fp32 weights, bf16 compute: the rotary
    embedding leaves q and k in fp32 beside a bf16 v; SDPA would cast under autocast, the FlashAttention
    and flex kernels take one 16-bit dtype), else ``default``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def _dispatcher(original):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if isinstance(attention_mask, SharedPrefixLayout):
            return shared_prefix_attention(module, query, key, value, attention_mask, *args, **kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    attention.lgrpo_original = original
    return attention


def install(model) -> None:
    """Make ``model``'s attention layers accept a :class:`SharedPrefixLayout` as their mask (idempotent).

    Raises ``ValueError`` for ``attn_implementation="eager"``: transformers calls each model's own eager
    function directly, with no registry entry to hook; load the model with ``sdpa`` instead.
    """
    from transformers.modeling_utils import AttentionInterface

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = getattr(config, "_attn_implementation", None)
    registry = AttentionInterface._global_mapping
    if name not in registry:
        raise ValueError(f"shared-prefix scoring needs an attn_implementation registered with transformers "
                         f"(sdpa, flash_attention_2, flex_attention...), the model uses {name!r}; load it with "
                         f"attn_implementation='sdpa' or pass shared_prefix=False")
    if not hasattr(registry[name], "lgrpo_original"):
        AttentionInterface.register(name, _dispatcher(registry[name]))
