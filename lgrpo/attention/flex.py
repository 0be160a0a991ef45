"""The FlexAttention backend: one ``flex_attention`` call per layer over the flat sequence, with a block mask.

No key/value is copied (the SDPA backend gathers each prompt's keys once per completion) and blocks
of the flat ``T x T`` score matrix that no query may read are skipped: a completion block reads only
its prompt's blocks and its own. The mask is :func:`.layout.allowed`, the same rule the reference
checks.

``flex_attention`` is compiled once per process (``dynamic=True``: a new sequence length does not
recompile). PyTorch runs its forward on CPU and CUDA, its backward on CUDA only (torch 2.13 refuses
gradients on CPU): on CPU this backend serves the no-gradient passes (reference, old log-probs,
listener) and the update needs ``sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import Segments, SharedPrefixLayout, allowed

BLOCK = 128  # flex_attention's default tile; the block mask is built at this granularity
_ROWS_PER_CHUNK = 1024  # query rows of the dense mask held at once while the block mask is built
_compiled = None


@dataclass(frozen=True)
class FlexLayout(SharedPrefixLayout):
    num_tokens: int
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    backend = "flex"

    @classmethod
    def build(cls, s: Segments) -> FlexLayout:
        segment, reads = s.token_segments()
        t = len(segment)

        def mask_mod(b, h, q, k):
            return allowed(segment, reads, q, k)

        return cls(t, block_mask(mask_mod, t, segment.device))

    def attend(self, query, key, value, dropout, scale):
        if dropout:
            raise ValueError("the flex shared-prefix attention has no dropout; use prefix_attention='sdpa'")
        if query.device.type == "cpu" and torch.is_grad_enabled() and (
                query.requires_grad or key.requires_grad or value.requires_grad):
            raise ValueError("FlexAttention has no backward on CPU (torch refuses it): use "
                             "prefix_attention='sdpa' for a pass with gradients on CPU")
        out = _flex()(query[None], key[None], value[None], block_mask=self.block_mask, scale=scale,
                      enable_gqa=query.shape[0] != key.shape[0])
        return out[0].transpose(0, 1)


def block_mask(mask_mod, t: int, device: torch.device):
    """The :class:`BlockMask` of ``mask_mod`` over ``t x t``, built ``_ROWS_PER_CHUNK`` query rows at a time.

    ``create_block_mask`` evaluates the whole dense ``t x t`` mask at once (measured: 2.9 GB of
    temporaries at t = 9.5 k, two 1024² prompts with 16 completions of 256 tokens); here at most
    ``_ROWS_PER_CHUNK x t`` booleans live at a time. A tile is *full* when every entry is allowed (flex
    skips the mask there) and *partial* when some are.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-t // BLOCK)
    keys = torch.arange(n * BLOCK, device=device)
    partial, full = [], []
    for r0 in range(0, n * BLOCK, _ROWS_PER_CHUNK):
        rows = torch.arange(r0, min(r0 + _ROWS_PER_CHUNK, n * BLOCK), device=device)
        # Padding rows/keys past t: clamped for the lookup, then masked out (flex reads none of them).
        ok = mask_mod(0, 0, rows.clamp(max=t - 1)[:, None], keys.clamp(max=t - 1)[None, :])
        ok &= (rows[:, None] < t) & (keys[None, :] < t)
        tiles = ok.view(-1, BLOCK, n, BLOCK)
        some, every = tiles.any(dim=(1, 3)), tiles.all(dim=(1, 3))
        partial.append(some & ~every)
        full.append(every)
    return BlockMask.from_kv_blocks(*_ordered(torch.cat(partial)), *_ordered(torch.cat(full)),
                                    BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(t, t))


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[q_blocks, kv_blocks]`` tile map as flex wants it: per query block the number of kv blocks and
    their indices first (``[1, 1, q_blocks]``, ``[1, 1, q_blocks, kv_blocks]``, int32)."""
    count = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[None, None].contiguous(), order[None, None].contiguous()


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Uncompiled, flex_attention materializes the whole score matrix; compiled it is a fused kernel.
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled
