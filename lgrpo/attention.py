"""Shared-prefix attention: each prompt's keys/values computed once, read by all its completions.

A shared-prefix forward runs the model once on one flat, padding-free sequence: every prompt's tokens
(each prompt once, its images once), then every completion's tokens. Which token may attend to which is
described by a :class:`SharedPrefixLayout`, handed to the model as its ``attention_mask`` (transformers
passes a dict of prepared masks straight to the attention layers). Attention is then two calls per
layer (Prefix Grouper, arXiv 2506.05433):

- each prompt attends causally to itself;
- each completion attends to its prompt's keys/values (computed once, gathered into the attention call
  with its own) and causally to its own tokens; its keys start at 0 whatever the micro-batch holds, so
  its numbers do not depend on which other prompts share the forward (the rank count, micro-batching).

That is exactly the attention of the plain computation with each prompt repeated once per completion,
so outputs and gradients are the same (the gradients of the G copies of a prompt's keys/values sum in
the gather's backward), while everything outside attention (projections, MLPs, the vision tower) runs
on each prompt once.

The hook: :func:`install` wraps the attention function transformers registered under the model's
``attn_implementation`` (``sdpa``, ``flash_attention_2``, ...) with a dispatcher that runs the shared-prefix
attention when the mask is a :class:`SharedPrefixLayout` and calls the original function unchanged
otherwise, so every other forward (generate, the vision tower) is untouched. The dispatch lives in the
registry, not in a config switch, because gradient checkpointing replays a layer's forward during the
backward, after any per-call switch would have been undone. No modeling file is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SharedPrefixLayout:
    """Positions in the flat sequence ``[prompt 0 | prompt 1 | ... | completion 0 | completion 1 | ...]``.

    ``prompt_index`` ``[P, Lp]``: the flat positions of each prompt's tokens, right padded (pads point at
    position 0 and are never read). ``completion_index`` ``[N, Lc]`` likewise for each completion's
    tokens; ``context_index`` ``[N, Lp + Lc]``: what completion ``n`` attends to, its prompt's tokens then
    its own, from key 0 (pads after), and ``completion_mask`` ``[N, 1, Lc, Lp + Lc]``: token ``c`` sees
    keys ``0 .. len(prompt) + c``. Keys start at 0 whatever the other prompts' lengths, so a completion's
    attention is computed in the same order in any micro-batch. ``prompt_keep`` / ``completion_keep``:
    the non-pad entries of the two query views, flattened, in flat order (the two attention outputs
    concatenate back into it).
    """

    prompt_index: torch.Tensor
    completion_index: torch.Tensor
    context_index: torch.Tensor
    completion_mask: torch.Tensor
    prompt_keep: torch.Tensor
    completion_keep: torch.Tensor

    @classmethod
    def build(cls, prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor,
              group: torch.Tensor) -> SharedPrefixLayout:
        """From the tokens of each prompt ``[P]``, of each completion ``[N]``, and each completion's prompt."""
        device = group.device
        prompt_lengths, completion_lengths = prompt_lengths.to(device), completion_lengths.to(device)
        lp = max(int(prompt_lengths.max()), 1)
        lc = max(int(completion_lengths.max()) if len(completion_lengths) else 0, 1)
        p_start = torch.cumsum(prompt_lengths, 0) - prompt_lengths
        c_start = int(prompt_lengths.sum()) + torch.cumsum(completion_lengths, 0) - completion_lengths
        ar_p, ar_c = torch.arange(lp, device=device), torch.arange(lc, device=device)
        p_valid = ar_p[None] < prompt_lengths[:, None]
        c_valid = ar_c[None] < completion_lengths[:, None]
        prompt_index = torch.where(p_valid, p_start[:, None] + ar_p[None], 0)
        completion_index = torch.where(c_valid, c_start[:, None] + ar_c[None], 0)
        # Completion n's keys: its prompt's len_g tokens, then its own, then pads (flat position 0).
        len_g = prompt_lengths[group][:, None]
        ar_k = torch.arange(lp + lc, device=device)[None]
        own = ar_k - len_g
        context_index = torch.where(ar_k < len_g, p_start[group][:, None] + ar_k,
                                    torch.where((own >= 0) & (own < completion_lengths[:, None]),
                                                c_start[:, None] + own, 0))
        # Token c sees its prompt and its own tokens up to itself. Pad queries see at least the prompt
        # (never an empty row, which would make NaNs); their outputs are dropped.
        mask = (ar_k[:, None, :] <= len_g[:, :, None] + ar_c[None, :, None])[:, None]
        return cls(prompt_index, completion_index, context_index, mask,
                   torch.nonzero(p_valid.flatten()).squeeze(-1), torch.nonzero(c_valid.flatten()).squeeze(-1))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_keep) + len(self.completion_keep)


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


def shared_prefix_attention(module, query, key, value, layout: SharedPrefixLayout, dropout: float = 0.0,
                            scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """The attention of one layer over a flat shared-prefix sequence (``query`` ``[1, H, T, D]``).

    Returns ``[1, T, H, D]`` as transformers' attention functions do.
    """
    if query.shape[0] != 1 or query.shape[2] != layout.num_tokens:
        raise ValueError(f"shared-prefix attention takes one flat sequence of {layout.num_tokens} tokens, "
                         f"got query of shape {tuple(query.shape)}")
    if sliding_window:
        raise ValueError("shared-prefix attention does not implement sliding-window layers")
    q, k, v = query[0], key[0], value[0]
    heads, dim = q.shape[0], v.shape[-1]
    # Prompts: right padded in this view, so plain causal attention never lets a real token see a pad.
    p = layout.prompt_index
    out_p = _sdpa(_rows(q, p), _rows(k, p), _rows(v, p), None, dropout, scaling, causal=True)
    # Completions: [their prompt's keys, their own keys], masked. The gather copies each prompt's keys
    # once per completion (into this call only); its backward sums the copies' gradients.
    ctx = layout.context_index
    out_c = _sdpa(_rows(q, layout.completion_index), _rows(k, ctx), _rows(v, ctx), layout.completion_mask,
                  dropout, scaling, causal=False)
    flat = torch.cat([out_p.transpose(1, 2).reshape(-1, heads, dim)[layout.prompt_keep],
                      out_c.transpose(1, 2).reshape(-1, heads, dim)[layout.completion_keep]])
    return flat[None], None


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
