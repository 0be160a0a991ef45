"""The frozen listener: how convincing is the reasoner's chain of thought, with its answer removed?

For each completion with a think block, the listener reads the same images and prompt, then an
assistant turn prefilled with the reasoning up to and including ``<answer>``. Its confidence in each
image is the softmax over the logits of the two choice tokens at the next position (SPEC §1),
computed by ``lgrpo.ops.listener_confidence``.

Cost: one forward per micro-batch of completions, each reasoner prompt and its images computed once per
forward for all the completions of its group (lgrpo.scoring's shared prefix: the listener reads the
same prompt as the reasoner); the lm_head runs at each completion's last position only, never over the
whole sequence.

Under FSDP (``--parallel.listener shard``) each forward is a series of all-gathers, and how many rows
have a think block differs between ranks: a sharded listener runs the largest chunk count of any rank,
the missing chunks as one dummy row each (lgrpo/distributed.py, "same count"). So ``score_group`` is a
collective then: every rank calls it the same number of times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import distributed as D
from . import ops
from .batching import ImageLike, VLBatcher
from .group import GroupBatch, PromptBatch, encode_completions
from .prompts import choice_token_ids
from .scoring import CompletionScorer


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
    """Scores reasonings with a frozen model. ``micro_batch_size`` bounds the completions per forward.

    ``shared_prefix``: each reasoner prompt (with its images) computed once per forward for all the
    completions of its group that the forward holds (lgrpo.scoring); false: repeated per completion.
    ``prefix_attention``: that forward's attention backend (lgrpo.attention).
    ``scorer`` wraps the model: under FSDP it is the root to shard (``D.shard(model, root=scorer)``).
    Given, it is used instead (a LoRA policy's adapters-off base, lgrpo.lora.AdaptersOff: its own shared
    prefix and attention settings are the policy's).
    """

    def __init__(self, model, batcher: VLBatcher, *, micro_batch_size: int | None = None,
                 temperature: float = 1.0, shared_prefix: bool = True, prefix_attention: str = "auto",
                 scorer=None):
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            # Its root hooks would gather the embeddings and lm_head only around model(...), which the
            # scorer never calls (it runs the backbone and reads the lm_head itself).
            raise ValueError("model is FSDP-sharded as its own root: build the Listener first, then "
                             "D.shard(model, root=listener.scorer)")
        self.model, self.batcher = model, batcher
        self.micro_batch_size, self.temperature = micro_batch_size, temperature
        self.scorer = scorer or CompletionScorer(model, fused=False, shared_prefix=shared_prefix,
                                                 prefix_attention=prefix_attention)
        self.candidate_ids = torch.tensor(choice_token_ids(batcher.tokenizer, batcher.fmt), dtype=torch.long)

    def prefill_ids(self, reasonings: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """The listener's assistant-turn prefill after the reasoner prompt, as completion ids ``[n, C]``
        and mask: ``<think>{reasoning}</think><answer>``. Tokenized apart from the prompt: the prompt ends
        with ``assistant\n``, a split Qwen's pre-tokenizer makes anyway (tested: the same ids as the
        rendered listener text)."""
        fmt = self.batcher.fmt
        texts = [f"{fmt.think_open}{r}{fmt.think_close}{fmt.answer_open}" for r in reasonings]
        return encode_completions(self.batcher.tokenizer, texts, None, device=device)

    @torch.no_grad()
    def score_group(self, prompts: PromptBatch, group: torch.Tensor,
                    reasonings: Sequence[str | None]) -> ListenerScores:
        """Confidence per completion: completion ``b`` continues reasoner prompt ``group[b]`` of ``prompts``
        (a rollout's prompts, each once); rows whose reasoning is ``None`` (no think block) are skipped."""
        n = len(reasonings)
        group = torch.as_tensor(group, dtype=torch.long)
        if group.shape != (n,):
            raise ValueError(f"group must hold one prompt row per reasoning ({n}), got shape {tuple(group.shape)}")
        probs = torch.zeros(n, 2)
        logp = torch.zeros(n, 2)
        rows = [b for b, r in enumerate(reasonings) if r is not None]
        device = _model_device(self.model)
        step = self.micro_batch_size or max(len(rows), 1)
        chunks = [torch.arange(i, min(i + step, len(rows))) for i in range(0, len(rows), step)]
        if D.is_sharded(self.model):
            missing = D.max_over_ranks(len(chunks)) - len(chunks)
            if missing and n == 0:
                raise ValueError("a sharded listener needs at least one row on every rank (its dummy "
                                 "forwards reuse a row's prompt and images)")
            chunks += [None] * missing  # dummy forwards: same all-gathers as the other ranks, no output
        if not chunks:
            return ListenerScores(probs=probs, logp=logp, scored=torch.zeros(n, dtype=torch.bool))
        # Completion j of the batch is row rows[j]; a dummy forward scores row 0's prompt, empty reasoning.
        ids, mask = self.prefill_ids([reasonings[b] for b in rows] + [""], device)
        batch = GroupBatch(prompts.to(device), ids, mask, group[rows + [0]].to(device))
        for chunk in chunks:
            part = batch.select(chunk if chunk is not None else [len(rows)]).trim()
            logits = self.scorer(part, last_logits=True)
            if chunk is None:
                continue
            p, lp = ops.listener_confidence(logits, None, self.candidate_ids.to(device), self.temperature)
            index = torch.tensor(rows)[chunk]
            probs[index], logp[index] = p.float().cpu(), lp.float().cpu()
        scored = torch.zeros(n, dtype=torch.bool)
        scored[rows] = True
        return ListenerScores(probs=probs, logp=logp, scored=scored)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]],
              reasonings: Sequence[str | None]) -> ListenerScores:
        """Confidence per row, each row with its own prompt text and images (PIL or already processed);
        rows whose reasoning is ``None`` are skipped, not run."""
        n = len(prompts)
        if not (len(images) == len(reasonings) == n):
            raise ValueError(f"got {n} prompts, {len(images)} image lists and {len(reasonings)} reasonings")
        if not n:
            return self.score_group(None, torch.zeros(0, dtype=torch.long), [])
        return self.score_group(self.batcher.reasoner_batch(prompts, images), torch.arange(n), reasonings)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device
