"""The SDPA backend: two ``scaled_dot_product_attention`` calls per layer (Prefix Grouper, arXiv 2506.05433).

- each prompt attends causally to itself (prompts right padded into a ``[P, Lp]`` view);
- each completion attends to its prompt's keys/values (gathered into the call with its own, one copy
  per completion, in this call only) and causally to its own tokens. Its keys start at 0 whatever the
  micro-batch holds, so its numbers do not depend on which other prompts share the forward.

Runs forward and backward on any device (the gather's backward sums the G copies' gradients); the
fallback of the other backends and the one the CPU uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import Segments, SharedPrefixLayout


@dataclass(frozen=True)
class SdpaLayout(SharedPrefixLayout):
    """``prompt_index`` ``[P, Lp]``: the flat positions of each prompt's tokens, right padded (pads point
    at position 0 and are never read). ``completion_index`` ``[N, Lc]`` likewise for each completion;
    ``context_index`` ``[N, Lp + Lc]``: what completion ``n`` attends to, its prompt's tokens then its
    own (pads after), and ``completion_mask`` ``[N, 1, Lc, Lp + Lc]``: token ``c`` sees keys
    ``0 .. len(prompt) + c``. ``prompt_keep`` / ``completion_keep``: the non-pad entries of the two query
    views, flattened, in flat order (the two outputs concatenate back into it)."""

    num_tokens: int
    prompt_index: torch.Tensor
    completion_index: torch.Tensor
    context_index: torch.Tensor
    completion_mask: torch.Tensor
    prompt_keep: torch.Tensor
    completion_keep: torch.Tensor
    backend = "sdpa"

    @classmethod
    def build(cls, s: Segments) -> SdpaLayout:
        device = s.group.device
        lengths_p, lengths_c = s.prompt_lengths, s.completion_lengths
        lp = max(int(lengths_p.max()), 1)
        lc = max(int(lengths_c.max()) if len(lengths_c) else 0, 1)
        ar_p, ar_c = torch.arange(lp, device=device), torch.arange(lc, device=device)
        p_valid = ar_p[None] < lengths_p[:, None]
        c_valid = ar_c[None] < lengths_c[:, None]
        prompt_index = torch.where(p_valid, s.prompt_start[:, None] + ar_p[None], 0)
        completion_index = torch.where(c_valid, s.completion_start[:, None] + ar_c[None], 0)
        # Completion n's keys: its prompt's len_g tokens, then its own, then pads (flat position 0).
        len_g = lengths_p[s.group][:, None]
        ar_k = torch.arange(lp + lc, device=device)[None]
        own = ar_k - len_g
        context_index = torch.where(ar_k < len_g, s.prompt_start[s.group][:, None] + ar_k,
                                    torch.where((own >= 0) & (own < lengths_c[:, None]),
                                                s.completion_start[:, None] + own, 0))
        # Token c sees its prompt and its own tokens up to itself. Pad queries see at least the prompt
        # (never an empty row, which would make NaNs); their outputs are dropped.
        mask = (ar_k[:, None, :] <= len_g[:, :, None] + ar_c[None, :, None])[:, None]
        prompt_keep = torch.nonzero(p_valid.flatten()).squeeze(-1)
        completion_keep = torch.nonzero(c_valid.flatten()).squeeze(-1)
        return cls(len(prompt_keep) + len(completion_keep), prompt_index, completion_index, context_index,
                   mask, prompt_keep, completion_keep)

    def attend(self, query, key, value, dropout, scale):
        heads, dim = query.shape[0], value.shape[-1]
        p = self.prompt_index
        out_p = _sdpa(_rows(query, p), _rows(key, p), _rows(value, p), None, dropout, scale, causal=True)
        ctx = self.context_index
        out_c = _sdpa(_rows(query, self.completion_index), _rows(key, ctx), _rows(value, ctx), self.completion_mask,
                      dropout, scale, causal=False)
        return torch.cat([out_p.transpose(1, 2).reshape(-1, heads, dim)[self.prompt_keep],
                          out_c.transpose(1, 2).reshape(-1, heads, dim)[self.completion_keep]])


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``[heads, T, D]`` gathered at ``index`` ``[R, L]`` → ``[R, heads, L, D]``."""
    return x[:, index].transpose(0, 1)


def _sdpa(q, k, v, mask, dropout: float, scale: float | None, causal: bool) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and mask is not None and q.device.type == "cuda":
        # Grouped-query attention: CUDA's masked kernels do not take enable_gqa (they fall back to the
        # math kernel), so expand the key/value heads as transformers' sdpa path does.
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        n_rep = 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                          is_causal=causal, enable_gqa=n_rep > 1)
