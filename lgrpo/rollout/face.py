"""The rollout engine's face to a transformers causal (V)LM: what it reads of the model and how it calls it.

The model is called through its own ``forward`` (no copied modeling code): the prefill as any padded
forward, at the positions of :mod:`lgrpo.positions`; a decode step with a prepared attention mask
(transformers accepts a ``{layer type: mask}`` dict and then builds none), the step's positions, and a
small cache object whose ``update`` writes the step's keys/values into the engine's static cache at the
step's column. Decode attention runs as SDPA whatever the model's prefill attention is.

Models whose layers use sliding-window attention are refused. The face holds no reference to the model
(the engine's cache of engines holds its model weakly): every call takes it.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..group import PromptBatch
from ..models import prepare
from ..positions import continuation_positions, forward_positions
from .sampler import placeholder_token_ids


class StepCache:
    """The cache a decode step hands the model: each layer's ``update`` writes the step's keys/values
    at column ``write`` of the static cache and returns the whole (fixed-length) cache."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], write: torch.Tensor, length: int):
        self.layers_kv, self.write, self.length = layers, write, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.layers_kv[layer_idx]
        k.index_copy_(2, self.write, key_states.to(k.dtype))
        v.index_copy_(2, self.write, value_states.to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def __len__(self) -> int:
        return len(self.layers_kv)


@dataclass
class Prefill:
    """The prompts' forward: what a pass forks G ways."""

    logits: torch.Tensor  # [P, V] at each prompt's last position
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [P, kv heads, T, head dim]
    next_pos: torch.Tensor  # [P]: the position of each prompt's first completion token
    attention_mask: torch.Tensor  # [P, T]


def is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch releases before FSDP2's public name
        return False

    return any(isinstance(m, FSDPModule) for m in model.modules())


class ModelFace:
    """What the engine needs to know about a transformers causal (V)LM, and its two calls of it."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        # transformers renamed the forward's cache argument within the supported 5.x range
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        config = model.config
        self.text_config = config.get_text_config()
        types = getattr(self.text_config, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in types) or getattr(self.text_config, "use_sliding_window", False):
            raise ValueError("the rollout engine supports full-attention layers only (this model has "
                             f"{sorted(set(types))}); use --rollout.engine hf")
        self.layer_types = sorted(set(types))
        self.banned = placeholder_token_ids(config)
        prepare(model)  # the family's forward takes the decode step's mask dict as it is
        # every config object an attention module may read its implementation from
        configs = {id(c): c for c in (config, self.text_config)}
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and hasattr(c, "_attn_implementation_internal"):
                configs[id(c)] = c
        self._configs = [c for c in configs.values() if hasattr(c, "_attn_implementation_internal")]

    def prefill(self, model, prompts: PromptBatch) -> Prefill:
        """The prompts' forward (images through the vision tower once each), at ``generate``'s positions."""
        inputs = prompts.model_inputs(model)
        positions, next_pos = forward_positions(model, prompts)
        out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return Prefill(out.logits[:, -1].float(), kv, next_pos, prompts.attention_mask)

    def decode(self, model, tokens: torch.Tensor, next_pos: torch.Tensor, j: torch.Tensor, mask: torch.Tensor,
               cache: StepCache) -> torch.Tensor:
        """Logits ``[B, V]`` after feeding each row's token ``tokens`` ``[B]`` as completion token ``j`` (a
        device scalar) of its prompt (``next_pos`` ``[B]``: where the completion starts), attending to the
        cache columns of ``mask`` ``[B, length]``."""
        b, length = mask.shape
        position_ids = continuation_positions(model, next_pos, j)
        mask = mask.view(b, 1, 1, length)
        out = model(input_ids=tokens.unsqueeze(1), position_ids=position_ids,
                    attention_mask={t: mask for t in self.layer_types},
                    **{self.cache_kw: cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @contextmanager
    def sdpa(self):
        """Decode attention through SDPA (it takes the prepared boolean mask) whatever the model's
        prefill attention is (flash-attention, eager)."""
        saved = [c._attn_implementation_internal for c in self._configs]
        try:
            for c in self._configs:
                c._attn_implementation_internal = "sdpa"
            yield
        finally:
            for c, impl in zip(self._configs, saved):
                c._attn_implementation_internal = impl
