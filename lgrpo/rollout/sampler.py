"""The rollout engine's token samplers behind one call, :func:`draw`.

Every sampler here draws token ``t`` of each row as a pure function of (seed, step, row id, position) and
the row's logits, so a completion is the same on any number of ranks, in any batch, after a resume:

- **kernel** (:func:`lgrpo.kernels.sampler.sample_tokens`): Gumbel-max with Philox noise in one Triton
  kernel over ``[B, V]``; on CUDA.
- **twin** (:func:`lgrpo.kernels.reference.sample_tokens`): the kernel's pure-PyTorch twin, the same ids;
  off CUDA. (The Triton interpreter, which ``TRITON_INTERPRET=1`` would otherwise route a CPU launch to,
  is for testing the kernel, not for decoding.)
- **top-p** (:func:`lgrpo.rollout.top_p.sample_from_logits`): the fixed-point inverse-CDF sampler of the
  hf path, for ``top_p < 1``: the same tokens as that path, up to floating-point differences in the logits.

Greedy decoding is the kernel's (or twin's) argmax. Banned ids (vision placeholders) are never drawn;
rows with no finite logit come back flagged and the engine raises :class:`NonFiniteLogitsError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import reference as _reference
from ..kernels import sampler as _kernel
from ..models import banned_ids
from .top_p import sample_from_logits

GPU_SAMPLER = _kernel.sample_tokens
CPU_SAMPLER = _reference.sample_tokens
key_tensor = _kernel.key_tensor  # the (seed, step) key the kernel and its twin read


class NonFiniteLogitsError(RuntimeError):
    """The policy's logits had nothing finite to sample from: the model has diverged."""


def placeholder_token_ids(config) -> list[int]:
    """The ids of a (V)LM config that are never sampled (its family's vision placeholders and delimiters;
    empty for a text model): one in a completion breaks the next forward, which counts placeholders
    against image features."""
    return banned_ids(config)


@dataclass(frozen=True)
class SamplingMode:
    """How a pass samples; part of a CUDA graph's key. ``top_p``/``temperature`` are baked into the top-p
    path's graph (the fixed-point sampler takes Python floats); the kernel reads its temperature from
    device memory, so greedy/sample graphs serve every temperature."""

    kind: str  # "greedy" | "sample" | "top_p"
    top_p: float = 1.0
    temperature: float = 0.0

    @staticmethod
    def of(greedy: bool, temperature: float, top_p: float) -> SamplingMode:
        if greedy:
            return SamplingMode("greedy")
        if top_p < 1.0:
            return SamplingMode("top_p", float(top_p), float(temperature))
        return SamplingMode("sample")


def draw(mode: SamplingMode, logits: torch.Tensor, t: torch.Tensor, *, key: torch.Tensor, row_ids: torch.Tensor,
         temperature: torch.Tensor, banned: torch.Tensor | None, uniforms: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ``t`` (a device scalar) of each of the B rows of ``logits`` ``[B, V]``, and a bool ``[B]``
    marking rows with nothing to draw from. Device work only (a CUDA graph can capture it).

    ``key``: :func:`key_tensor` of (seed, step); ``row_ids`` ``[B]``: the rows' global ids; ``temperature``:
    a one-element float tensor (kernel and twin); ``banned``: an int8 ``[V]`` mask or None; ``uniforms``
    ``[B, max_new_tokens]``: the top-p sampler's counter-based uniforms
    (:func:`lgrpo.rollout.top_p.counter_uniform`; unread by the others).
    """
    if mode.kind == "top_p":  # the hf path's fixed-point inverse-CDF sampler, after the ban
        x = logits.float()
        if banned is not None:
            x = x.masked_fill(banned.bool(), float("-inf"))
        u = uniforms.index_select(1, t).squeeze(1)
        return sample_from_logits(x, u, mode.temperature, mode.top_p)
    if logits.dtype == torch.float64:  # the kernel reads fp32/bf16/fp16 (generate samples in fp32 too)
        logits = logits.float()
    sample = GPU_SAMPLER if logits.is_cuda else CPU_SAMPLER
    return sample(logits, key, row_ids, t.expand(len(logits)), temperature, banned, greedy=mode.kind == "greedy")
