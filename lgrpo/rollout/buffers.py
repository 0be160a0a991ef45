"""The rollout engine's static buffers: everything a decode step reads and writes, allocated once.

A CUDA graph records the addresses its kernels touch, so the step's whole state lives in tensors that
are allocated once and rewritten in place: the static KV cache, each slot's token, position, stop state
and mask, the output rows, and the scalars (the step counter, the sampler's key and temperature). Slots
are the batch rows a step runs over (a bucket's worth); each slot writes into the output row ``orig``, the
padding slots into an extra *trash* row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .face import Prefill

# The per-slot tensors: a compaction moves them together (with the slot's cache rows).
SLOTS = ("tokens", "next_pos", "row_ids", "orig", "stop_state", "done", "mask", "uniforms", "prompt_of")


@dataclass(eq=False)
class DecodeBuffers:
    rows: int  # slots (the largest bucket these buffers serve)
    length: int  # cache columns: prompt columns + max_new_tokens
    vocab: int
    kv_dtype: torch.dtype
    device: torch.device
    kv_shape: tuple  # (kv heads, head dim)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [rows, kv heads, length, head dim]
    # per slot
    tokens: torch.Tensor  # [rows] the last sampled token (the next step's input)
    next_pos: torch.Tensor  # [rows] the position of the slot's first completion token
    row_ids: torch.Tensor  # [rows] the sampler's global row id
    orig: torch.Tensor  # [rows] the output row the slot writes (trash for padding slots)
    stop_state: torch.Tensor  # [rows] the stop automaton's state
    done: torch.Tensor  # [rows] bool
    mask: torch.Tensor  # [rows, length] bool: the cache columns the slot attends to
    uniforms: torch.Tensor  # [rows, max_new_tokens] fp64: the top-p sampler's uniforms
    prompt_of: torch.Tensor  # [rows] the slot's prompt in the pass
    # per output row, plus the trash row
    out: torch.Tensor  # [rows + 1, max_new_tokens] the sampled ids
    stop_len: torch.Tensor  # [rows + 1] tokens up to the stop string; -1: not stopped
    bad: torch.Tensor  # [rows + 1] bool: met logits with nothing to draw from
    # scalars read by the step
    j: torch.Tensor  # [1] the completion token the step feeds
    key: torch.Tensor  # [2] int64 the sampler's (seed, step) key
    temperature: torch.Tensor  # [1] fp32
    banned: torch.Tensor | None  # [vocab] int8, or None when nothing is banned

    @property
    def trash(self) -> int:
        """The output row padding slots write to."""
        return self.rows

    @classmethod
    def allocate(cls, rows: int, length: int, pre: Prefill, max_new_tokens: int, pad_id: int,
                 banned_ids: list[int]) -> DecodeBuffers:
        k0 = pre.kv[0][0]
        dev, vocab = k0.device, pre.logits.shape[-1]
        banned = torch.zeros(vocab, dtype=torch.int8, device=dev)
        ids = [i for i in banned_ids if 0 <= i < vocab]
        if ids:
            banned[ids] = 1
        long = dict(dtype=torch.long, device=dev)
        return cls(
            rows=rows, length=length, vocab=vocab, kv_dtype=k0.dtype, device=dev, kv_shape=tuple(k0.shape[1::2]),
            # zeros, not empty: masked cache columns are multiplied by 0 in attention, never NaN * 0
            kv=[(torch.zeros(rows, k.shape[1], length, k.shape[3], dtype=k.dtype, device=dev),
                 torch.zeros(rows, v.shape[1], length, v.shape[3], dtype=v.dtype, device=dev))
                for k, v in pre.kv],
            tokens=torch.zeros(rows, **long),
            next_pos=torch.zeros(rows, **long),
            row_ids=torch.zeros(rows, **long),
            orig=torch.full((rows,), rows, **long),
            stop_state=torch.zeros(rows, **long),
            done=torch.ones(rows, dtype=torch.bool, device=dev),
            mask=torch.zeros(rows, length, dtype=torch.bool, device=dev),
            uniforms=torch.zeros(rows, max_new_tokens, dtype=torch.float64, device=dev),
            prompt_of=torch.zeros(rows, **long),
            out=torch.full((rows + 1, max_new_tokens), pad_id, **long),
            stop_len=torch.full((rows + 1,), -1, **long),
            bad=torch.zeros(rows + 1, dtype=torch.bool, device=dev),
            j=torch.zeros(1, **long),
            key=torch.zeros(2, **long),
            temperature=torch.ones(1, dtype=torch.float32, device=dev),
            banned=banned if ids else None,
        )

    def fits(self, rows: int, length: int, pre: Prefill) -> bool:
        """Whether these buffers serve a pass of ``rows`` slots and ``length`` cache columns."""
        k0 = pre.kv[0][0]
        return (self.rows >= rows and self.length >= length and self.vocab == pre.logits.shape[-1]
                and self.kv_dtype == k0.dtype and self.device == k0.device and len(self.kv) == len(pre.kv)
                and self.kv_shape == tuple(k0.shape[1::2]))

    def begin(self, pre: Prefill, group_size: int, b: int, t_cap: int, row_ids: torch.Tensor, pad_id: int, *,
              key: torch.Tensor, temperature: float, uniforms: torch.Tensor | None) -> None:
        """Write one pass's starting state into the first ``b`` slots: the G-way forked cache, masks,
        positions, row ids; ``uniforms`` ``[P*G, max_new_tokens]`` for the top-p sampler, else None."""
        n_prompts, t = pre.attention_mask.shape
        rows = n_prompts * group_size
        length = t_cap + self.out.shape[1]
        prompt_of = torch.cat([torch.arange(rows) // group_size, torch.zeros(b - rows, dtype=torch.long)])
        self.prompt_of[:b].copy_(prompt_of)
        for (k, v), (pk, pv) in zip(self.kv, pre.kv):
            for dst, src in ((k, pk), (v, pv)):
                # the G-way fork: each prompt's keys/values copied into its G rows (no [N, T] temporary)
                dst[:rows].unflatten(0, (n_prompts, group_size))[:, :, :, :t].copy_(
                    src.unsqueeze(1).expand(-1, group_size, -1, -1, -1))
                if b > rows:  # padding slots: a copy of prompt 0 (done from the start)
                    dst[rows:b, :, :t].copy_(src[:1].expand(b - rows, -1, -1, -1))
                dst[:b, :, t:length].zero_()
        self.mask[:b].zero_()
        self.mask[:b, :t].copy_(pre.attention_mask.to(self.device).bool().index_select(0, prompt_of.to(self.device)))
        self.next_pos[:b].copy_(pre.next_pos.index_select(0, prompt_of.to(pre.next_pos.device)))
        self.row_ids[:b].copy_(torch.cat([row_ids, torch.zeros(b - rows, dtype=torch.long)]))
        self.orig[:b].copy_(torch.cat([torch.arange(rows), torch.full((b - rows,), self.trash)]))
        self.done[:b].copy_(torch.arange(b) >= rows)
        self.stop_state[:b].zero_()
        self.tokens[:b].fill_(pad_id)
        self.out.fill_(pad_id)
        self.stop_len.fill_(-1)
        self.bad.zero_()
        self.j.zero_()
        self.key.copy_(key)
        self.temperature.fill_(float(temperature))
        if uniforms is not None:
            self.uniforms[:rows].copy_(uniforms)

    def quiesce(self) -> None:
        """Contents a warm-up or capture step can run on without recording anything: every slot finished,
        token 0, step 0, one visible cache column."""
        self.done.fill_(True)
        self.tokens.zero_()
        self.stop_state.zero_()
        self.j.zero_()
        self.mask[:, 0] = True

    def compact(self, b: int, nb: int) -> None:
        """Move the live slots among the first ``b`` to the front and pad to ``nb`` slots with finished ones."""
        done = self.done[:b]
        live = (~done).nonzero().flatten()
        filler = done.nonzero().flatten()[: nb - len(live)]
        src = torch.cat([live, filler])
        for name in SLOTS:
            t = getattr(self, name)
            t[:nb] = t[src]
        self.orig[len(live):nb] = self.trash
        for k, v in self.kv:
            k[:nb, :, :self.length] = k[src, :, :self.length]
            v[:nb, :, :self.length] = v[src, :, :self.length]

