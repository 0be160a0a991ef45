"""The varlen backend: FlashAttention's variable-length kernels, two calls per layer, no padding, no mask.

- the prompts, packed back to back (they are, at the head of the flat sequence): causal attention
  within each (``cu_seqlens`` = the prompt boundaries);
- the completions, packed back to back (also already), each against the keys
  ``[its prompt's tokens, its own tokens]`` gathered into one packed key sequence, causal. FlashAttention
  (>= 2.1) aligns the causal mask to the bottom right when a sequence has fewer queries than keys,
  so completion token ``c`` sees ``len(prompt) + c + 1`` keys: its prompt and its own causal past.

The kernels: ``flash_attn.flash_attn_varlen_func`` where flash-attn is installed, else PyTorch's own
``torch.nn.attention.varlen.varlen_attn`` (the same FlashAttention-2 kernels, shipped with CUDA builds
of torch >= 2.10). Both are CUDA-only; forward and backward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .layout import Segments, SharedPrefixLayout


@dataclass(frozen=True)
class VarlenLayout(SharedPrefixLayout):
    """``prompt_tokens``: the flat positions ``[0, prompt_tokens)`` hold the prompts; ``cu_prompt``
    ``[P + 1]`` their boundaries (int32). ``cu_query`` / ``cu_key`` ``[M + 1]``: the boundaries of the M
    non-empty completions' queries and of their packed keys; ``key_index`` ``[cu_key[-1]]``: the flat
    position each packed key comes from. ``max_*``: the longest sequence of each (host ints, read once
    here so no layer syncs)."""

    num_tokens: int
    prompt_tokens: int
    cu_prompt: torch.Tensor
    max_prompt: int
    cu_query: torch.Tensor
    cu_key: torch.Tensor
    key_index: torch.Tensor
    max_query: int
    max_key: int
    kernel: object  # varlen_kernel()'s function, looked up once per forward rather than per layer
    backend = "varlen"

    @classmethod
    def build(cls, s: Segments) -> VarlenLayout:
        live = s.completion_lengths > 0  # an empty completion has no query: left out of the call
        len_q = s.completion_lengths[live]
        len_p = s.prompt_lengths[s.group[live]]
        len_k = len_p + len_q
        cu_key = _cumulative(len_k)
        # Packed key j of completion m: its prompt's token j, then (j >= len_p) its own token j - len_p.
        seq = torch.repeat_interleave(torch.arange(len(len_k), device=len_k.device), len_k)
        j = torch.arange(int(cu_key[-1]), device=len_k.device) - cu_key[seq].long()
        from_prompt = j < len_p[seq]
        key_index = torch.where(from_prompt, s.prompt_start[s.group[live]][seq] + j,
                                s.completion_start[live][seq] + j - len_p[seq])
        prompt_tokens = int(s.prompt_lengths.sum())
        return cls(prompt_tokens + int(s.completion_lengths.sum()), prompt_tokens, _cumulative(s.prompt_lengths),
                   int(s.prompt_lengths.max()), _cumulative(len_q), cu_key, key_index,
                   int(len_q.max()) if len(len_q) else 0, int(len_k.max()) if len(len_k) else 0, varlen_kernel())

    def attend(self, query, key, value, dropout, scale):
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
        n = self.prompt_tokens
        fn = self.kernel
        parts = [fn(q[:n], k[:n], v[:n], self.cu_prompt, self.cu_prompt, self.max_prompt, self.max_prompt,
                    dropout, scale)]
        if self.max_query:
            idx = self.key_index
            parts.append(fn(q[n:], k[idx], v[idx], self.cu_query, self.cu_key, self.max_query, self.max_key,
                            dropout, scale))
        return torch.cat(parts)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def varlen_kernel():
    """``fn(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale) -> out``: causal, bottom-right aligned,
    grouped-query heads allowed. Raises ``ValueError`` where no FlashAttention varlen kernel can run."""
    if not torch.cuda.is_available():
        raise ValueError("prefix_attention='varlen' needs CUDA (FlashAttention); use 'sdpa' or 'flex' here")
    from ..model import flash_attn_available

    if flash_attn_available():
        from flash_attn import flash_attn_varlen_func

        def flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale):
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout,
                                          softmax_scale=scale, causal=True)
        return flash
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise ValueError("prefix_attention='varlen' needs flash-attn or torch >= 2.10 "
                         "(torch.nn.attention.varlen); use 'sdpa' or 'flex'") from e

    return _torch_varlen(varlen_attn)


def _torch_varlen(varlen_attn):
    """torch's ``varlen_attn`` called as the installed release spells it (read from its signature, so that
    a release of another spelling fails here, at the start-up check, not at the first shared-prefix forward):

    - causal: ``window_size=(-1, 0)`` (2.11, 2.13: the left window unbounded, nothing to the right) or
      ``is_causal=True`` (2.10); either is FlashAttention's causal mask, aligned bottom right;
    - ``scale``: passed where it is a parameter; 2.10 has none and always uses ``1/sqrt(head dim)``, so
      another scale is folded into the queries (``softmax(s q.k) = softmax(d^-1/2 (s d^1/2 q).k)``);
    - grouped-query heads: 2.13 asks for them with ``enable_gqa``; 2.10-2.11 (the GPU image's torch) have
      no such argument and pass any head counts to FlashAttention, which reads a key head per query-head
      group natively. The start-up check (check_backend) compares every form with SDPA on grouped heads.
    """
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = dict(window_size=(-1, 0))
    elif "is_causal" in params:
        causal = dict(is_causal=True)
    else:
        raise ValueError(f"torch {torch.__version__}'s varlen_attn{inspect.signature(varlen_attn)} takes neither "
                         "window_size nor is_causal (no causal mask): install flash-attn or use 'sdpa'")
    has_scale = "scale" in params
    gqa_flag = "enable_gqa" in params

    def builtin(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale):
        if dropout:
            raise ValueError("torch's varlen_attn has no dropout; install flash-attn or use 'sdpa'")
        kw = dict(causal)
        if has_scale:
            kw["scale"] = scale
        elif scale is not None and scale != q.shape[-1] ** -0.5:
            q = q * (scale * q.shape[-1] ** 0.5)
        if gqa_flag:
            kw["enable_gqa"] = q.shape[1] != k.shape[1]
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    return builtin
