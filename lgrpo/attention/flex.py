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

        return cls(t, block_mask(s, mask_mod))

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


def block_mask(s: Segments, mask_mod) -> object:
    """The :class:`BlockMask` of the shared-prefix rule over the flat ``T x T`` scores, tile by tile,
    counted from the segment geometry instead of evaluating ``mask_mod`` on every pair.

    Under :func:`.layout.allowed` query ``q`` reads two key intervals: its own segment from its start to
    ``q``, and (a completion) its whole prompt. So the number of keys a row may read in each key tile is
    the overlap of two intervals with the tile: ``T x tiles`` integers instead of the ``T x T`` booleans
    torch's ``create_block_mask`` evaluates (2.9 GB of temporaries measured at T = 9.5 k; this one
    ~6 MB there). A tile is *full* when every row reads all ``BLOCK`` of its keys (flex then skips the
    mask) and *partial* when some row reads some; ``mask_mod`` decides the entries of partial tiles.
    Padding rows and keys past ``T`` read and are read by nothing, as in torch's builder.
    """
    from torch.nn.attention.flex_attention import BlockMask

    segment, reads = s.token_segments()
    t = len(segment)
    n = -(-t // BLOCK)
    seg, rd = segment.long(), reads.long()
    starts = torch.cat([s.prompt_start, s.completion_start])  # by segment id
    pos = torch.arange(t, device=seg.device)
    own_lo, own_hi = starts[seg], pos + 1
    completion = seg != rd  # a prompt token's prompt interval is its own: counted once
    pre_lo = torch.where(completion, s.prompt_start[rd], 0)
    pre_hi = torch.where(completion, s.prompt_start[rd] + s.prompt_lengths[rd], 0)
    edges = torch.arange(n + 1, device=seg.device) * BLOCK

    def overlap(lo, hi):  # [t, n]: keys of [lo, hi) in each tile
        return (torch.minimum(hi[:, None], edges[None, 1:]) - torch.maximum(lo[:, None], edges[None, :-1])).clamp(min=0)

    count = overlap(own_lo, own_hi) + overlap(pre_lo, pre_hi)
    count = torch.cat([count, count.new_zeros(n * BLOCK - t, n)]).view(n, BLOCK, n)
    some, every = (count > 0).any(1), (count == BLOCK).all(1)
    return BlockMask.from_kv_blocks(*_ordered(some & ~every), *_ordered(every),
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
