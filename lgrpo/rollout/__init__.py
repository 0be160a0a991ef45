"""Rollouts: G completions per prompt, through one of three paths behind one face.

Every path takes the un-repeated prompts (:class:`lgrpo.group.PromptBatch`) and returns a
:class:`lgrpo.group.Rollout` whose completion ``i`` is sample ``i % G`` of prompt ``i // G``:

- ``engine`` (:mod:`lgrpo.rollout.engine`, the default): prefill once per prompt, KV fork, a fixed-shape
  decode step on the device (CUDA graphs on a GPU), the seeded samplers of :mod:`lgrpo.rollout.sampler`;
- ``hf`` (:mod:`lgrpo.rollout.hf`): transformers' ``generate`` with the same seeded sampler as a logits
  processor;
- ``vllm`` (:mod:`lgrpo.rollout.vllm`): an in-process vLLM engine beside the policy (the vllm extra).

Greedy decoding gives the same tokens on all three; sampled, the engine and hf draw the same tokens with
``top_p < 1`` and the same distribution otherwise; vLLM's draws are its own. :func:`rollout_for` is the one
place the path is chosen (the trainer, eval and the judge call it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from . import vllm
from .engine import engine_for
from .hf import HFRollout

if TYPE_CHECKING:
    import torch

    from ..config import RolloutConfig
    from ..group import PromptBatch, Rollout


class Rollouts(Protocol):
    """What :func:`rollout_for` returns: ``generate`` as :meth:`lgrpo.rollout.engine.RolloutEngine.generate`
    documents it (the hf and vLLM paths accept ``reduce_max`` and ``batch_size`` and need neither)."""

    def generate(self, prompts: PromptBatch, group_size: int = 1, *, greedy: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, step: int = 0,
                 prompt_ids: torch.Tensor | None = None, batch_size: int | None = None,
                 reduce_max=None) -> Rollout: ...


def rollout_for(cfg: RolloutConfig, model, tokenizer, **vllm_options) -> Rollouts:
    """The rollout path ``cfg.engine`` names for ``model``, with ``cfg``'s completion budget and stop string.

    The engine and vLLM paths are kept per model (static buffers and captured graphs; a started vLLM
    engine), so calling this before every rollout costs nothing. ``vllm_options`` (``dtype``, ``seed``, ...:
    :class:`lgrpo.rollout.vllm.VLLMRollout`) start the vLLM engine on its first call and are ignored after;
    the other paths take none.
    """
    stop = cfg.stop or None
    if cfg.engine == "vllm":
        return vllm.engine_for(model, tokenizer, max_new_tokens=cfg.max_new_tokens, stop=stop,
                               gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, **vllm_options)
    if vllm_options:
        raise ValueError(f"options {sorted(vllm_options)} are for --rollout.engine vllm, not {cfg.engine!r}")
    if cfg.engine == "engine":
        return engine_for(model, tokenizer, max_new_tokens=cfg.max_new_tokens, stop=stop)
    if cfg.engine == "hf":
        return HFRollout(model, tokenizer, max_new_tokens=cfg.max_new_tokens, stop=stop,
                         static_cache=cfg.static_cache)
    raise ValueError(f"rollout engine must be 'engine', 'hf' or 'vllm', got {cfg.engine!r}")
