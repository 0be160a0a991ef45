"""Per-completion rewards (SPEC §1): format, accuracy, listener, their weighted sum, and contradictions.

- ``r_fmt`` ∈ {0, 1}: the completion matches ``<think>…</think><answer>N</answer>`` exactly once, nothing
  after it (:func:`lgrpo.prompts.parse_completion`).
- ``r_acc`` ∈ {0, 1}: the answer equals the human-preferred image.
- ``r_list`` ∈ [0, 1]: the listener's probability of the preferred image given the reasoning with the
  answer removed; 0 without a (non-empty) think block.
- ``R = w_fmt·r_fmt + w_acc·r_acc + w_list·r_list``, default weights (1.0, 0.5, 0.5).
- contradiction: the listener's argmax differs from the reasoner's answer (only where both exist).

Typical use in a rollout step::

    parsed = [parse_completion(t, fmt) for t in texts]
    scores = listener.score(prompts, images, [p.reasoning for p in parsed])
    out = compute_rewards(parsed, preferred, scores)          # out.total -> group advantages
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .listener import ListenerScores
from .prompts import ParsedCompletion


@dataclass(frozen=True)
class RewardWeights:
    fmt: float = 1.0
    acc: float = 0.5
    listener: float = 0.5

    def __post_init__(self):
        for name in ("fmt", "acc", "listener"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RewardWeights.{name} must be a finite number, got {value!r}")


@dataclass
class Rewards:
    """All ``[B]`` fp32 on CPU unless noted.

    ``answer``/``listener_choice`` are long, 1 or 2, 0 where absent; ``contradiction`` is bool and
    False where undefined (no answer or no listener score); ``metrics`` summarises the batch.
    """

    total: torch.Tensor
    fmt: torch.Tensor
    acc: torch.Tensor
    listener: torch.Tensor
    answer: torch.Tensor
    listener_choice: torch.Tensor
    contradiction: torch.Tensor
    metrics: dict[str, float]


def compute_rewards(parsed: Sequence[ParsedCompletion], preferred: Sequence[int] | torch.Tensor,
                    listener: ListenerScores | None = None,
                    weights: RewardWeights = RewardWeights()) -> Rewards:
    """Rewards for B completions. ``preferred[b]`` ∈ {1, 2} is the human label *as presented* (after any
    position swap). ``listener=None`` (listener off) gives ``r_list = 0`` and no contradiction statistics.

    Metrics (floats; NaN where a subset is empty): ``reward``, ``r_fmt``, ``r_acc``, ``r_list`` (means),
    ``answered`` (fraction with an answer), ``listener_scored`` (fraction scored), ``contradiction_rate``
    (among rows with an answer and a listener score), ``acc_agree`` / ``acc_disagree`` (reasoner accuracy
    where the listener agrees / disagrees), ``n_agree`` / ``n_disagree``.
    """
    n = len(parsed)
    preferred = torch.as_tensor(preferred, dtype=torch.long).flatten().cpu()
    if preferred.numel() != n:
        raise ValueError(f"got {n} completions but {preferred.numel()} labels")
    if n and not bool(((preferred == 1) | (preferred == 2)).all()):
        raise ValueError(f"preferred labels must be 1 or 2, got {sorted(set(preferred.tolist()))}")
    if listener is not None and listener.probs.shape != (n, 2):
        raise ValueError(f"listener scores must be [B={n}, 2], got {tuple(listener.probs.shape)}")

    r_fmt = torch.tensor([float(p.format_ok) for p in parsed])
    answer = torch.tensor([p.answer or 0 for p in parsed], dtype=torch.long)
    r_acc = (answer == preferred).float()
    has_reasoning = torch.tensor([p.reasoning is not None for p in parsed], dtype=torch.bool)
    if listener is not None:
        probs, scored = listener.probs.float().cpu(), listener.scored.cpu() & has_reasoning
        p_preferred = probs.gather(1, (preferred - 1).unsqueeze(1)).squeeze(1)
        r_list = torch.where(scored, p_preferred, 0.0)
        choice = torch.where(scored, listener.choice().cpu(), 0)
    else:
        r_list = torch.zeros(n)
        scored = torch.zeros(n, dtype=torch.bool)
        choice = torch.zeros(n, dtype=torch.long)
    total = weights.fmt * r_fmt + weights.acc * r_acc + weights.listener * r_list
    comparable = scored & (answer > 0)
    contradiction = comparable & (choice != answer)
    agree = comparable & ~contradiction

    metrics = {
        "reward": _mean(total), "r_fmt": _mean(r_fmt), "r_acc": _mean(r_acc), "r_list": _mean(r_list),
        "answered": _mean((answer > 0).float()), "listener_scored": _mean(scored.float()),
        "contradiction_rate": _mean(contradiction[comparable].float()),
        "acc_agree": _mean(r_acc[agree]), "acc_disagree": _mean(r_acc[contradiction]),
        "n_agree": float(agree.sum()), "n_disagree": float(contradiction.sum()),
    }
    return Rewards(total=total, fmt=r_fmt, acc=r_acc, listener=r_list, answer=answer, listener_choice=choice,
                   contradiction=contradiction, metrics=metrics)


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")
