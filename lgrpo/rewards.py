"""Per-completion rewards (SPEC §1): format, accuracy, listener, their weighted sum, and contradictions.

- ``r_fmt`` ∈ {0, 1}: the completion matches ``<think>…</think><answer>N</answer>`` exactly once, nothing
  after it (:func:`lgrpo.prompts.parse_completion`).
- ``r_acc`` ∈ {0, 1}: the answer equals the human-preferred image.
- ``r_list`` ∈ [0, 1]: the listener's probability of the preferred image given the reasoning with the
  answer removed; 0 without a (non-empty) think block.
- ``R = w_fmt·r_fmt + w_acc·r_acc + w_list·r_list``, default weights (1.0, 0.5, 0.5).
- contradiction: the listener's argmax differs from the reasoner's answer (only where both exist):
  :func:`contradiction`, the one definition every contradiction rate averages.

Typical use in a rollout step::

    parsed = [parse_completion(t, fmt) for t in texts]
    scores = listener.score(prompts, images, [p.reasoning for p in parsed])
    out = compute_rewards(parsed, preferred, scores)          # out.total -> group advantages
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    """A task's rewards for N completions, each ``[N]`` on CPU: what the trainer and eval read.

    ``total`` is what the group advantages are computed from; ``format``, ``accuracy`` and ``listener`` are
    its components (fp32; ``listener`` NaN where no listener ran). ``contradiction``: 1 where the listener's
    choice differs from the answer, 0 where they agree, NaN where either is missing (:func:`contradiction`).
    ``answer`` and ``listener_choice``: long, 1 or 2, 0 where absent. ``extra``: further per-completion
    statistics a task logs (not part of ``total``). A task may leave the optional ones None.
    """

    total: torch.Tensor
    format: torch.Tensor
    accuracy: torch.Tensor
    listener: torch.Tensor
    contradiction: torch.Tensor | None = None
    answer: torch.Tensor | None = None
    listener_choice: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def logged(self) -> dict[str, torch.Tensor]:
        """The per-completion statistics under the names ``metrics.jsonl`` and the step line use: the total
        is "reward", components "reward/<name>"; "accuracy" repeats "reward/accuracy" under the name the
        step line and the experiments read; "contradiction" is there even when the task has none (NaN)."""
        nan = torch.full_like(self.total, float("nan"), dtype=torch.float32)
        return {
            "reward": self.total,
            "reward/format": self.format,
            "reward/accuracy": self.accuracy,
            "reward/listener": self.listener,
            **{f"reward/{k}": v for k, v in self.extra.items()},
            "accuracy": self.accuracy,
            "contradiction": self.contradiction if self.contradiction is not None else nan,
        }


def contradiction(answer: torch.Tensor, listener_choice: torch.Tensor) -> torch.Tensor:
    """Per completion: 1.0 where the listener's choice differs from the reasoner's answer, 0.0 where they
    agree, NaN where either is absent (0) — the one definition the trainer's and eval's rates average."""
    comparable = (answer > 0) & (listener_choice > 0)
    return torch.where(comparable, (listener_choice != answer).float(), float("nan"))


def compute_rewards(parsed: Sequence[ParsedCompletion], preferred: Sequence[int] | torch.Tensor,
                    listener: ListenerScores | None = None,
                    weights: RewardWeights = RewardWeights()) -> Rewards:
    """Rewards for B completions. ``preferred[b]`` ∈ {1, 2} is the human label *as presented* (after any
    position swap). ``listener=None`` (listener off): ``r_list`` is 0 in the total, NaN in ``listener``,
    and no contradiction is defined.
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
        choice = torch.zeros(n, dtype=torch.long)
    total = weights.fmt * r_fmt + weights.acc * r_acc + weights.listener * r_list
    return Rewards(total=total, format=r_fmt, accuracy=r_acc,
                   listener=r_list if listener is not None else torch.full((n,), float("nan")),
                   contradiction=contradiction(answer, choice), answer=answer, listener_choice=choice)
