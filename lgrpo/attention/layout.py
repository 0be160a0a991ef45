"""Which token attends to which in a shared-prefix forward, independent of the kernel that computes it.

The flat sequence is ``[prompt 0 | prompt 1 | ... | completion 0 | completion 1 | ...]``, no padding.
Query ``q`` may read key ``k`` when ``k <= q`` and either both are in the same segment (one prompt, or
one completion) or ``k`` is in the prompt that ``q``'s segment continues. Every backend computes
exactly this; :func:`dense_mask` writes it out (the tests' and the self-check's reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Per-segment geometry of the flat sequence (every tensor on one device).

    ``prompt_lengths`` ``[P]``, ``completion_lengths`` ``[N]``, ``group`` ``[N]`` (completion ``n``
    continues prompt ``group[n]``); ``prompt_start`` / ``completion_start``: flat offsets.
    """

    prompt_lengths: torch.Tensor
    completion_lengths: torch.Tensor
    group: torch.Tensor
    prompt_start: torch.Tensor
    completion_start: torch.Tensor

    @classmethod
    def of(cls, prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, group: torch.Tensor) -> Segments:
        device = group.device
        prompt_lengths, completion_lengths = prompt_lengths.to(device).long(), completion_lengths.to(device).long()
        if prompt_lengths.dim() != 1 or completion_lengths.shape != group.shape or group.dim() != 1:
            raise ValueError(f"prompt_lengths [P], completion_lengths [N] and group [N] expected, got shapes "
                             f"{tuple(prompt_lengths.shape)}, {tuple(completion_lengths.shape)}, {tuple(group.shape)}")
        p_start = torch.cumsum(prompt_lengths, 0) - prompt_lengths
        c_start = prompt_lengths.sum() + torch.cumsum(completion_lengths, 0) - completion_lengths
        return cls(prompt_lengths, completion_lengths, group.long(), p_start, c_start)

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_lengths)

    def token_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``segment`` ``[T]``: each token's segment (prompt ``p`` is ``p``, completion ``n`` is ``P + n``);
        ``reads`` ``[T]``: the prompt a token's segment continues (a prompt token: its own prompt)."""
        p = self.num_prompts
        ids = torch.arange(p + len(self.group), device=self.group.device)
        lengths = torch.cat([self.prompt_lengths, self.completion_lengths])
        segment = torch.repeat_interleave(ids, lengths)
        reads = torch.cat([ids[:p], self.group])[segment]
        return segment.int(), reads.int()


def allowed(segment: torch.Tensor, reads: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Whether query ``q`` may read key ``k`` (flat positions, broadcast): the rule of the module docstring.

    A completion's prompt lies before it in the flat order, so ``k <= q`` holds for every prompt key."""
    return (k <= q) & ((segment[k] == segment[q]) | (segment[k] == reads[q]))


def dense_mask(segments: Segments) -> torch.Tensor:
    """The whole ``[T, T]`` boolean mask (small inputs only: references and checks)."""
    segment, reads = segments.token_segments()
    pos = torch.arange(len(segment), device=segment.device)
    return allowed(segment, reads, pos[:, None], pos[None, :])


class SharedPrefixLayout:
    """What the attention layers receive as their mask in a shared-prefix forward: the segments of the
    flat sequence, prepared once per forward for one backend (:mod:`.sdpa`, :mod:`.flex`, :mod:`.varlen`).

    ``attend(q, k, v, dropout, scale)`` takes one layer's ``[heads, T, D]`` (key/value heads may be fewer:
    grouped-query attention) and returns ``[T, heads, D]``.
    """

    backend: str = ""
    num_tokens: int

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
               scale: float | None) -> torch.Tensor:
        raise NotImplementedError
