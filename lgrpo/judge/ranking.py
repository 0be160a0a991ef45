"""Ranking n images from pair probabilities: the anchor and round-robin schemes, and ranking metrics.

Nothing here touches a model: a scheme asks for ``P(i preferred over j)`` round by round
(:func:`run_schemes`), so the same code ranks with the judge (:meth:`lgrpo.judge.Judge.rank_many`), a stub
or a cached table (:func:`rank_with`). The schemes and their cost are described in :mod:`lgrpo.judge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

METHODS = ("anchor", "round_robin")
PROB_CLAMP = 1e-6  # logit(1 - 1e-6) ≈ 13.8: a saturated comparison counts as a large, finite log-odds


@dataclass(frozen=True)
class Ranking:
    """A ranking of n images (indices are 0-based positions in the caller's list).

    - ``order``: image indices, best first.
    - ``scores``: per image, in the caller's order: Bradley–Terry log-strength, mean 0 (higher = better).
    - ``comparisons``: pairs judged. ``pairs``: each judged ``(i, j, P(i preferred over j))``.
    - ``method``; ``anchor``: the anchor's index (``None`` for round robin).
    """

    order: list[int]
    scores: list[float]
    comparisons: int
    method: str
    anchor: int | None
    pairs: list[tuple[int, int, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"order": self.order, "scores": self.scores, "comparisons": self.comparisons, "method": self.method}
        if self.anchor is not None:
            out["anchor"] = self.anchor
        return out


# ----------------------------------------------------------------------------------------------------
# Ranking schemes (no model: they ask for pair probabilities round by round)
# ----------------------------------------------------------------------------------------------------

# A scheme is a generator: it yields one round of pairs (i, j), receives P(i preferred over j) for each,
# and finally returns a Ranking. Written this way, several lists' rounds can share one batched generate.
Scheme = Generator[list[tuple[int, int]], list[float], Ranking]


def _log_odds(p: float) -> float:
    p = min(max(float(p), PROB_CLAMP), 1.0 - PROB_CLAMP)
    return math.log(p) - math.log1p(-p)


def _finish(n: int, raw: list[float], method: str, anchor: int | None, pairs: list) -> Ranking:
    mean = sum(raw) / n
    scores = [s - mean for s in raw]
    order = sorted(range(n), key=lambda i: (-scores[i], i))  # ties: the earlier image first
    return Ranking(order=order, scores=scores, comparisons=len(pairs), method=method, anchor=anchor, pairs=pairs)


def probe_indices(n: int, probes: int) -> list[int]:
    """``min(n, probes)`` indices spread evenly over ``range(n)``, first and last included."""
    m = min(n, probes)
    if m == 1:
        return [0]
    return [k * (n - 1) // (m - 1) for k in range(m)]  # strictly increasing: the spacing is >= 1


def anchor_scheme(n: int, probes: int = 3) -> Scheme:
    """The anchor scheme (module docstring): ``C(m, 2) + n − m`` comparisons, ``m = min(n, probes)``."""
    _check_n(n)
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    judged: list[tuple[int, int, float]] = []
    log_odds: dict[tuple[int, int], float] = {}

    def record(round_pairs, probs):
        for (i, j), p in zip(round_pairs, probs):
            judged.append((i, j, float(p)))
            log_odds[i, j] = _log_odds(p)
            log_odds[j, i] = -log_odds[i, j]

    probe = probe_indices(n, probes)
    first = [(probe[a], probe[b]) for a in range(len(probe)) for b in range(a + 1, len(probe))]
    if first:
        record(first, (yield first))
    strength = {i: sum(log_odds[i, j] for j in probe if j != i) for i in probe}
    by_strength = sorted(probe, key=lambda i: (strength[i], i))
    anchor = by_strength[(len(by_strength) - 1) // 2]  # the median (the lower one for an even count)
    second = [(i, anchor) for i in range(n) if i != anchor and (i, anchor) not in log_odds]
    if second:
        record(second, (yield second))
    raw = [0.0 if i == anchor else log_odds[i, anchor] for i in range(n)]
    return _finish(n, raw, "anchor", anchor, judged)


def round_robin_scheme(n: int) -> Scheme:
    """Every pair once, one round: ``n(n − 1)/2`` comparisons; ``score_i = mean_j L(i, j)`` (L(i, i) = 0)."""
    _check_n(n)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    probs = yield pairs
    raw = [0.0] * n
    for (i, j), p in zip(pairs, probs):
        lo = _log_odds(p)
        raw[i] += lo / n
        raw[j] -= lo / n
    return _finish(n, raw, "round_robin", None, [(i, j, float(p)) for (i, j), p in zip(pairs, probs)])


def make_scheme(n: int, method: str = "anchor", probes: int = 3) -> Scheme:
    if method == "anchor":
        return anchor_scheme(n, probes)
    if method == "round_robin":
        return round_robin_scheme(n)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def run_schemes(schemes: Sequence[Scheme],
                judge_pairs: Callable[[list[tuple[int, int, int]]], Sequence[float]]) -> list[Ranking]:
    """Drive several schemes in lockstep: each round, every scheme's pairs go to ONE ``judge_pairs`` call.

    ``judge_pairs`` receives ``(scheme index, i, j)`` triples and returns ``P(i preferred over j)`` for each.
    """
    results: list[Ranking | None] = [None] * len(schemes)
    pending: dict[int, list[tuple[int, int]]] = {}

    def advance(k: int, value) -> None:
        try:
            pending[k] = schemes[k].send(value)
        except StopIteration as stop:
            results[k] = stop.value

    for k in range(len(schemes)):
        advance(k, None)
    while pending:
        asked = [(k, i, j) for k, pairs in pending.items() for i, j in pairs]
        probs = list(judge_pairs(asked))
        if len(probs) != len(asked):
            raise RuntimeError(f"judge_pairs returned {len(probs)} probabilities for {len(asked)} pairs")
        answers, at = {}, 0
        for k, pairs in pending.items():
            answers[k], at = probs[at: at + len(pairs)], at + len(pairs)
        pending = {}
        for k, value in answers.items():
            advance(k, value)
    return results  # type: ignore[return-value]


def rank_with(n: int, pair_prob: Callable[[int, int], float], method: str = "anchor", probes: int = 3) -> Ranking:
    """Rank ``n`` items given any ``pair_prob(i, j) = P(i preferred over j)`` (a stub, a cached table...)."""
    return run_schemes([make_scheme(n, method, probes)], lambda asked: [pair_prob(i, j) for _, i, j in asked])[0]


def _check_n(n: int) -> None:
    if n < 2:
        raise ValueError(f"ranking needs at least 2 images, got {n}")


# ----------------------------------------------------------------------------------------------------
# Ranking metrics
# ----------------------------------------------------------------------------------------------------

def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def pairwise_accuracy(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Share of pairs with different ``truth`` (higher = better) that ``scores`` order the same way; a tie in
    ``scores`` counts 1/2. NaN when every truth value is equal."""
    _check_same_length(scores, truth)
    right = total = 0.0
    for i in range(len(truth)):
        for j in range(i + 1, len(truth)):
            t = _sign(truth[i] - truth[j])
            if t == 0:
                continue
            s = _sign(scores[i] - scores[j])
            total += 1
            right += 1.0 if s == t else (0.5 if s == 0 else 0.0)
    return right / total if total else float("nan")


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b (ties in either list handled as in scipy.stats.kendalltau); NaN when one list is constant."""
    _check_same_length(x, y)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            sx, sy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            if sx == 0 and sy == 0:
                continue
            if sx == 0:
                ties_x += 1
            elif sy == 0:
                ties_y += 1
            elif sx == sy:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else float("nan")


def _average_ranks(x: Sequence[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson correlation of the average ranks; NaN when one list is constant."""
    _check_same_length(x, y)
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")


def _check_same_length(x, y) -> None:
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two lists of the same length >= 2, got {len(x)} and {len(y)}")

