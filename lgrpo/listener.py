"""The frozen listener: how convincing is the reasoner's chain of thought, with its answer removed?

For each completion with a think block, the listener reads the same images and prompt, then an
assistant turn prefilled with the reasoning up to and including ``<answer>``. Its confidence in each
image is the softmax over the logits of the two choice tokens at the next position (SPEC §1),
computed by ``lgrpo.ops.listener_confidence``.

Cost: one forward per rollout batch (optionally in micro-batches), left-padded so every row's answer
position is the last one; the lm_head runs at that position only (``logits_to_keep=1``), never over
the whole sequence.

Under FSDP (``--parallel.listener shard``) each forward is a series of all-gathers, and how many rows
have a think block differs between ranks: a sharded listener runs the largest chunk count of any rank,
the missing chunks as one dummy row each (lgrpo/distributed.py, "same count"). So ``score`` is a
collective then: every rank calls it the same number of times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import distributed as D
from . import ops
from .batching import ImageLike, VLBatcher
from .prompts import choice_token_ids


@dataclass
class ListenerScores:
    """``probs``/``logp`` ``[B, 2]`` fp32 on CPU (columns: image 1, image 2); rows not ``scored`` hold zeros.

    ``probs`` is the softmax over the two choice logits; ``logp`` the full-vocabulary log-probabilities
    of the two choice tokens (how much mass the listener puts on answering at all).
    """

    probs: torch.Tensor
    logp: torch.Tensor
    scored: torch.Tensor

    def choice(self) -> torch.Tensor:
        """The listener's argmax choice per row: 1 or 2, and 0 where not scored. ``[B]`` long."""
        return torch.where(self.scored, self.probs.argmax(-1) + 1, 0)


class Listener:
    """Scores reasonings with a frozen model. ``micro_batch_size`` bounds the rows per forward."""

    def __init__(self, model, batcher: VLBatcher, *, micro_batch_size: int | None = None,
                 temperature: float = 1.0):
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model, self.batcher = model, batcher
        self.micro_batch_size, self.temperature = micro_batch_size, temperature
        self.candidate_ids = torch.tensor(choice_token_ids(batcher.tokenizer, batcher.fmt), dtype=torch.long)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]],
              reasonings: Sequence[str | None]) -> ListenerScores:
        """Confidence per row; rows whose reasoning is ``None`` (no think block) are skipped, not run.

        ``images[b]`` are row b's two images (PIL or already processed, e.g. shared by a GRPO group).
        """
        n = len(prompts)
        if not (len(images) == len(reasonings) == n):
            raise ValueError(f"got {n} prompts, {len(images)} image lists and {len(reasonings)} reasonings")
        probs = torch.zeros(n, 2)
        logp = torch.zeros(n, 2)
        rows = [b for b, r in enumerate(reasonings) if r is not None]
        step = self.micro_batch_size or max(len(rows), 1)
        chunks = [rows[i: i + step] for i in range(0, len(rows), step)]
        if D.is_sharded(self.model):
            missing = D.max_over_ranks(len(chunks)) - len(chunks)
            if missing and n == 0:
                raise ValueError("a sharded listener needs at least one row on every rank (its dummy "
                                 "forwards reuse a row's prompt and images)")
            chunks += [None] * missing  # dummy forwards: same all-gathers as the other ranks, no output
        device = _model_device(self.model)
        dtype = _vision_dtype(self.model)
        for chunk in chunks:
            rows_in = chunk if chunk is not None else [0]
            texts = [reasonings[b] for b in chunk] if chunk is not None else [""]
            batch = self.batcher.listener_batch([prompts[b] for b in rows_in], [images[b] for b in rows_in],
                                                texts).to(device, dtype)
            logits = self.model(**batch.model_inputs(), logits_to_keep=1, use_cache=False).logits
            if chunk is None:
                continue
            p, lp = ops.listener_confidence(logits[:, -1], None, self.candidate_ids.to(device),
                                            self.temperature)
            index = torch.tensor(chunk)
            probs[index], logp[index] = p.float().cpu(), lp.float().cpu()
        scored = torch.zeros(n, dtype=torch.bool)
        scored[rows] = True
        return ListenerScores(probs=probs, logp=logp, scored=scored)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _vision_dtype(model) -> torch.dtype:
    # pixel_values must match the vision tower's weights (bf16 on GPU).
    return next(model.parameters()).dtype
