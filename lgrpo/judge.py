"""Using a trained judge: which of two images people prefer, and rankings of n images for one prompt.

```python
from lgrpo.judge import Judge
judge = Judge.from_pretrained("runs/NAME/final")           # or "tiny", or a Qwen2.5-VL folder
c = judge.compare("a red circle", "a.png", "b.png")         # paths, PIL images or ProcessedImage
c.choice, c.probs, c.reasoning                              # 1 (image a) or 2 (image b); (p_a, p_b); per order
r = judge.rank("a red circle", ["0.png", "1.png", "2.png", "3.png"])   # method="anchor" | "round_robin"
r.order, r.scores, r.comparisons                            # best first (0-based indices); per image; pairs judged
```

**One judgement** (one order of the two images): the judge writes its reasoning greedily,
``<think>…</think><answer>N</answer>`` (:func:`lgrpo.rollout.generate`), then its *calibrated probability*
of each image is read exactly as the listener reads a reasoner (SPEC §1): the same model, prefilled with
its own reasoning up to ``<answer>``, softmax over the logits of the two choice tokens at that next
position (:class:`lgrpo.listener.Listener`, i.e. ``lgrpo.ops.listener_confidence``). One ``generate`` for
all the rows of a batch and one listener forward for the same rows.

- A completion with a think block but no (valid) answer — cut off after ``</think>``, or a malformed
  answer — still gets its probability from the reasoning; ``answers`` then holds ``None`` for that order.
- A completion **without a think block** is read with an empty reasoning (``<think></think><answer>``):
  the judge's unreasoned answer distribution, still a probability from the model and not a hard 0/1;
  its ``reasoning`` is ``None`` so callers can tell.
- ``choice`` follows the probabilities (the image whose averaged probability is higher; image a on an
  exact tie), never a written answer alone; the written answers are kept in ``answers``.

**Both orders** (``both_orders=True``, the default): the pair is judged as (a, b) and as (b, a) and the
two probabilities of each image are averaged. A judge with a pure position bias — its log-odds for the
first image shifted by b whatever the images — gives ``p_a = (σ(d + b) + σ(d − b)) / 2``, which is above
1/2 exactly when d > 0: the bias cannot flip the choice, and swapping a and b swaps the result. Cost: two
generations and two listener rows per pair.

**Ranking** n images: scores are Bradley–Terry strengths read off the calibrated probabilities, the
log-odds ``L(i, j) = logit P(i preferred over j)`` (probabilities clamped to [1e-6, 1 − 1e-6]), shifted to
mean 0. Under a Bradley–Terry judge (``P(i > j) = σ(s_i − s_j)``) both methods return ``s − mean(s)``.

- ``method="anchor"`` (default), O(n) comparisons. A cheap first pass picks the anchor: ``probes`` images
  (default 3, evenly spaced over the list) are compared all against all, and the one whose summed
  log-odds is the median becomes the anchor, so that the other comparisons are made against a middling
  image, where the probabilities are informative rather than saturated. Then every other image is
  compared with the anchor (the probes already were); ``score_i = L(i, anchor)``, the anchor's 0, then
  centred. Comparisons: ``C(m, 2) + (n − m)`` with ``m = min(n, probes)`` — exactly **n** for the default
  (n ≥ 3; 1 for n = 2), in two rounds (two batched generates).
- ``method="round_robin"``: every pair once, ``score_i = (1/n) Σ_j L(i, j)``. ``n(n − 1)/2`` comparisons in
  one round. Noisier judges average out more, at quadratic cost: the reference the anchor is measured
  against (``eval-rank`` below).

A comparison is one pair judged; with ``both_orders`` it costs two generations (``generations`` in the
result). :meth:`Judge.rank_many` ranks several lists with the rounds of all lists batched together.

**Command line**:

```bash
python -m lgrpo.judge --model DIR|tiny --input rows.jsonl --output out.jsonl [--method anchor]
python -m lgrpo.judge eval-rank --model DIR|tiny --data ranked.jsonl [--methods anchor,round_robin]
```

Input rows ``{"prompt": ..., "images": [2..n paths]}`` (paths absolute or relative to the input file's
folder, or ``--image-root``). One output row per input row, in order, each with ``"row"`` (the input's
1-based line) and any ``"id"``: ``choice``/``probs``/``reasoning``/``answers`` for two images,
``order``/``scores``/``comparisons`` (0-based image indices, best first) for more, and ``error`` for a bad
row (invalid JSON, no prompt, fewer than 2 images, a missing or unreadable image), while the other rows
are still judged. Exit status 0 when every row was judged, 1 when some rows were bad, 2 for a usage error.
A progress bar is drawn only when stdout is a terminal.

``eval-rank`` reads ImageReward-style ranked lists (``{"prompt", "generations" | "images": [...],
"ranking" | "rank": [...]}``, rank 1 = best, JSON list or JSONL) and reports, per method, the mean over
lists of pairwise accuracy (pairs with different true ranks ordered right), Kendall τ-b and Spearman ρ
against the true ranking, and the comparisons used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .batching import ProcessedImage, VLBatcher
from .listener import Listener
from .prompts import parse_completion

METHODS = ("anchor", "round_robin")
PROB_CLAMP = 1e-6  # logit(1 - 1e-6) ≈ 13.8: a saturated comparison counts as a large, finite log-odds

ImageInput = Image.Image | ProcessedImage | str | os.PathLike


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """The verdict on one pair (image a, image b), in the caller's order.

    - ``choice``: 1 (image a) or 2 (image b), the higher of ``probs`` (a on an exact tie).
    - ``probs``: ``(p_a, p_b)``, summing to 1: the calibrated probabilities, averaged over the orders.
    - ``reasoning``: the judge's reasoning per order judged — (a, b) first, then (b, a) with both orders;
      ``None`` for an order whose completion had no think block.
    - ``answers``: the written answer per order, in the caller's terms (1 = a), ``None`` without one.
    - ``order_probs``: ``(p_a, p_b)`` per order before averaging (the position bias is their difference).
    - ``completions``: the raw completions per order.
    """

    choice: int
    probs: tuple[float, float]
    reasoning: tuple[str | None, ...]
    answers: tuple[int | None, ...]
    order_probs: tuple[tuple[float, float], ...]
    completions: tuple[str, ...]

    def to_json(self) -> dict:
        return {"choice": self.choice, "probs": list(self.probs), "reasoning": list(self.reasoning),
                "answers": list(self.answers)}


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
# The judge
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Judged:
    """One generation: images shown in one order. ``probs``/``answer`` in the *shown* order."""

    completion: str
    reasoning: str | None
    answer: int | None
    probs: tuple[float, float]


class Judge:
    """A trained reasoner used as an image-preference judge (see the module docstring).

    ``batch_size`` bounds the rows (one row = one pair in one order) per ``generate`` and per listener
    forward; ``max_new_tokens`` bounds each reasoning; ``temperature`` divides the choice logits when the
    probability is read (1 = the model's own distribution).
    """

    def __init__(self, model, batcher: VLBatcher, *, max_new_tokens: int = 512, batch_size: int = 32,
                 temperature: float = 1.0):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batcher = model, batcher
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.listener = Listener(model, batcher, micro_batch_size=batch_size, temperature=temperature)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "tiny", *, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, attn_implementation: str = "auto",
                        min_pixels: int | None = None, max_pixels: int | None = None, seed: int = 0,
                        **kwargs) -> Judge:
        """A frozen judge from ``"tiny"`` or a local folder (an exported run's ``final/``); never downloads.

        ``dtype``/``device``/``attn_implementation``/``seed`` go to :func:`lgrpo.model.load_model`,
        ``min_pixels``/``max_pixels`` to the image processor, the rest (``max_new_tokens``, ``batch_size``,
        ``temperature``) to the constructor.
        """
        from .model import load_model
        from .rollout import clean_generation_config

        model = load_model(name_or_path, trainable=False, dtype=dtype, device=device,
                           attn_implementation=attn_implementation, seed=seed)
        batcher = VLBatcher.from_pretrained(name_or_path, min_pixels=min_pixels, max_pixels=max_pixels)
        clean_generation_config(model, batcher.tokenizer)  # no inherited sampling/penalty settings
        return cls(model, batcher, **kwargs)

    # -- public API -----------------------------------------------------------------------------------

    def compare(self, prompt: str, image_a: ImageInput, image_b: ImageInput, *,
                both_orders: bool = True) -> Comparison:
        """Which of two images people prefer for ``prompt`` (see :class:`Comparison`)."""
        return self.compare_many([prompt], [image_a], [image_b], both_orders=both_orders)[0]

    def compare_many(self, prompts: Sequence[str], images_a: Sequence[ImageInput], images_b: Sequence[ImageInput],
                     *, both_orders: bool = True) -> list[Comparison]:
        """Many pairs at once: one ``generate`` (per ``batch_size`` rows) for all of them."""
        if not (len(prompts) == len(images_a) == len(images_b)):
            raise ValueError(f"got {len(prompts)} prompts, {len(images_a)} images_a and {len(images_b)} images_b")
        cache: dict[int, ProcessedImage] = {}
        a = [self._processed(img, f"images_a[{k}]", cache) for k, img in enumerate(images_a)]
        b = [self._processed(img, f"images_b[{k}]", cache) for k, img in enumerate(images_b)]
        return self._compare_processed(list(prompts), a, b, both_orders)

    def rank(self, prompt: str, images: Sequence[ImageInput], *, method: str = "anchor", both_orders: bool = True,
             probes: int = 3) -> Ranking:
        """Rank ``images`` for ``prompt``, best first (see :class:`Ranking` and the module docstring)."""
        return self.rank_many([prompt], [images], method=method, both_orders=both_orders, probes=probes)[0]

    def rank_many(self, prompts: Sequence[str], image_lists: Sequence[Sequence[ImageInput]], *,
                  method: str = "anchor", both_orders: bool = True, probes: int = 3) -> list[Ranking]:
        """Rank several lists; each round of every list goes into one batched comparison."""
        if len(prompts) != len(image_lists):
            raise ValueError(f"got {len(prompts)} prompts but {len(image_lists)} image lists")
        for k, images in enumerate(image_lists):
            if len(images) < 2:
                raise ValueError(f"image_lists[{k}]: ranking needs at least 2 images, got {len(images)}")
        schemes = [make_scheme(len(images), method, probes) for images in image_lists]
        cache: dict[int, ProcessedImage] = {}
        processed = [[self._processed(img, f"image_lists[{k}][{i}]", cache) for i, img in enumerate(images)]
                     for k, images in enumerate(image_lists)]

        def judge_pairs(asked):
            verdicts = self._compare_processed([prompts[k] for k, _, _ in asked],
                                               [processed[k][i] for k, i, _ in asked],
                                               [processed[k][j] for k, _, j in asked], both_orders)
            return [v.probs[0] for v in verdicts]

        return run_schemes(schemes, judge_pairs)

    # -- internals ------------------------------------------------------------------------------------

    def _processed(self, image: ImageInput, name: str, cache: dict) -> ProcessedImage:
        """Patchify each distinct image once (an image ranked among n appears in up to n − 1 pairs)."""
        if isinstance(image, ProcessedImage):
            return image
        key = id(image)
        if key not in cache:
            if isinstance(image, (str, os.PathLike)):
                from .data import open_image

                try:
                    pil = open_image(image)
                except OSError as err:
                    raise ValueError(f"{name}: cannot read image {image}: {err}") from err
            elif isinstance(image, Image.Image):
                pil = image
            else:
                raise ValueError(f"{name} must be a PIL image, a path or a ProcessedImage, "
                                 f"got {type(image).__name__}")
            cache[key] = (image, self.batcher.process_images([pil])[0])  # hold the object: its id stays unique
        return cache[key][1]

    def _compare_processed(self, prompts: list[str], a: list[ProcessedImage], b: list[ProcessedImage],
                           both_orders: bool) -> list[Comparison]:
        rows_prompts = prompts + (prompts if both_orders else [])
        rows_images = [[x, y] for x, y in zip(a, b)] + ([[y, x] for x, y in zip(a, b)] if both_orders else [])
        judged = self._judge_rows(rows_prompts, rows_images)
        n = len(prompts)
        out = []
        for k in range(n):
            views = [judged[k]] + ([judged[n + k]] if both_orders else [])
            # Back to the caller's order: in the swapped row, choice 1 is image b.
            order_probs = [views[0].probs] + [(v.probs[1], v.probs[0]) for v in views[1:]]
            answers = [views[0].answer] + [None if v.answer is None else 3 - v.answer for v in views[1:]]
            p_a = sum(p[0] for p in order_probs) / len(order_probs)
            p_b = sum(p[1] for p in order_probs) / len(order_probs)
            out.append(Comparison(choice=1 if p_a >= p_b else 2, probs=(p_a, p_b),
                                  reasoning=tuple(v.reasoning for v in views), answers=tuple(answers),
                                  order_probs=tuple(order_probs), completions=tuple(v.completion for v in views)))
        return out

    def _judge_rows(self, prompts: list[str], images: list[list[ProcessedImage]]) -> list[_Judged]:
        """Each row once as shown: its completion, then the calibrated probability from its reasoning."""
        fmt = self.batcher.fmt
        out: list[_Judged] = []
        for lo in range(0, len(prompts), self.batch_size):
            chunk_prompts, chunk_images = prompts[lo: lo + self.batch_size], images[lo: lo + self.batch_size]
            texts = self._generate(chunk_prompts, chunk_images)
            parsed = [parse_completion(t, fmt) for t in texts]
            # No think block: read the unreasoned distribution (empty think) rather than skip the row.
            scores = self.listener.score(chunk_prompts, chunk_images,
                                         [p.reasoning if p.reasoning is not None else "" for p in parsed])
            for t, p, probs in zip(texts, parsed, scores.probs.tolist()):
                out.append(_Judged(completion=t, reasoning=p.reasoning, answer=p.answer,
                                   probs=(float(probs[0]), float(probs[1]))))
        return out

    def _generate(self, prompts: list[str], images: list[list[ProcessedImage]]) -> list[str]:
        """Greedy completions of the reasoner prompts. The one place the judge calls the rollout engine."""
        from .rollout import generate

        batch = self.batcher.reasoner_batch(prompts, images).to(_device(self.model), _dtype(self.model))
        rollout = generate(self.model, self.batcher.tokenizer, batch.model_inputs(),
                           max_new_tokens=self.max_new_tokens, stop=self.batcher.fmt.answer_close, greedy=True)
        return rollout.texts


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


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


# ----------------------------------------------------------------------------------------------------
# Reading input rows
# ----------------------------------------------------------------------------------------------------

class RowError(ValueError):
    """A bad input row; the message names the row."""


@dataclass
class _Row:
    line: int
    prompt: str
    paths: list[Path]
    extra: dict
    images: list[ProcessedImage] | None = None


def _read_rows(path: Path) -> list[tuple[int, dict | RowError]]:
    """(1-based line or entry number, parsed object or the error) for a JSONL file or a JSON list."""
    from .data import DataError, _json_entries  # the converters' reader: JSON list or JSONL

    try:
        entries = list(_json_entries(path))
    except DataError as err:  # a JSON list that does not parse at all
        raise RowError(str(err)) from err
    rows = []
    for number, entry in entries:
        if isinstance(entry, DataError):
            rows.append((number, RowError(f"row {number}: {entry}")))
        elif not isinstance(entry, dict):
            rows.append((number, RowError(f"row {number}: expected a JSON object, got {type(entry).__name__}")))
        else:
            rows.append((number, entry))
    return rows


def _resolve(p: str, root: Path) -> Path:
    return Path(p) if os.path.isabs(p) else root / p


def _parse_row(number: int, entry: dict, root: Path, image_keys: Sequence[str]) -> _Row:
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError(f"row {number}: needs a non-empty \"prompt\" string")
    key = next((k for k in image_keys if k in entry), None)
    images = entry.get(key) if key else None
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise RowError(f"row {number}: needs a list of image paths under {' or '.join(map(repr, image_keys))}")
    if len(images) < 2:
        raise RowError(f"row {number}: needs at least 2 images, got {len(images)}")
    return _Row(number, prompt, [_resolve(p, root) for p in images], entry)


def _load_images(row: _Row, batcher: VLBatcher) -> None:
    from .data import open_image

    pils = []
    for k, path in enumerate(row.paths):
        if not path.is_file():
            raise RowError(f"row {row.line}: image {k} not found: {path}")
        try:
            pils.append(open_image(path))
        except OSError as err:
            raise RowError(f"row {row.line}: image {k} unreadable: {path}: {err}") from err
    try:
        row.images = batcher.process_images(pils)
    except ValueError as err:  # e.g. an extreme aspect ratio the image processor refuses
        raise RowError(f"row {row.line}: the image processor refused an image: {err}") from err


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="row", file=sys.stdout, disable=not (enabled and sys.stdout.isatty()))


# ----------------------------------------------------------------------------------------------------
# The command line: judge rows
# ----------------------------------------------------------------------------------------------------

def judge_file(judge: Judge, input_path: str | os.PathLike, output_path: str | os.PathLike, *,
               image_root: str | os.PathLike | None = None, method: str = "anchor", both_orders: bool = True,
               probes: int = 3, rows_per_batch: int = 16, progress: bool = True) -> tuple[int, int]:
    """Judge every row of ``input_path`` into ``output_path`` (module docstring). Returns (judged, bad)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    input_path, output_path = Path(input_path), Path(output_path)
    root = Path(image_root) if image_root is not None else input_path.resolve().parent
    entries = _read_rows(input_path)
    tmp = output_path.with_name(output_path.name + ".tmp")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    judged = bad = 0
    with open(tmp, "w", encoding="utf-8") as out, _progress(len(entries), progress) as bar:
        for lo in range(0, len(entries), rows_per_batch):
            results: list[dict] = []
            pairs: list[tuple[int, _Row]] = []
            lists: list[tuple[int, _Row]] = []
            for slot, (number, entry) in enumerate(entries[lo: lo + rows_per_batch]):
                results.append({"row": number})
                try:
                    if isinstance(entry, RowError):
                        raise entry
                    row = _parse_row(number, entry, root, ("images",))
                    _load_images(row, judge.batcher)
                except RowError as err:
                    results[slot]["error"] = str(err)
                    continue
                if "id" in entry:
                    results[slot]["id"] = entry["id"]
                (pairs if len(row.images) == 2 else lists).append((slot, row))
            if pairs:
                verdicts = judge._compare_processed([r.prompt for _, r in pairs], [r.images[0] for _, r in pairs],
                                                    [r.images[1] for _, r in pairs], both_orders)
                for (slot, _), v in zip(pairs, verdicts):
                    results[slot].update(v.to_json())
            if lists:
                rankings = judge.rank_many([r.prompt for _, r in lists], [r.images for _, r in lists],
                                           method=method, both_orders=both_orders, probes=probes)
                for (slot, _), r in zip(lists, rankings):
                    results[slot].update(r.to_json())
            for res in results:
                bad += "error" in res
                judged += "error" not in res
                out.write(json.dumps(res) + "\n")
            out.flush()
            bar.update(len(results))
    tmp.replace(output_path)
    return judged, bad


# ----------------------------------------------------------------------------------------------------
# The command line: ranking evaluation
# ----------------------------------------------------------------------------------------------------

def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def evaluate_ranking(judge: Judge, data_path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                     methods: Sequence[str] = METHODS, both_orders: bool = True, probes: int = 3,
                     limit: int | None = None, lists_per_batch: int = 8, progress: bool = True) -> dict:
    """Rank every list of an ImageReward-style file with each method; metrics against the true ranking.

    Images are decoded ``lists_per_batch`` lists at a time (a whole test set of patchified images would not
    fit in memory), and each batch is ranked by every method before the next is read.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be among {METHODS}, got {m!r}")
    if lists_per_batch < 1:
        raise ValueError(f"lists_per_batch must be >= 1, got {lists_per_batch}")
    data_path = Path(data_path)
    root = Path(image_root) if image_root is not None else data_path.resolve().parent
    parsed: list[tuple[_Row, list[float]]] = []
    bad: list[tuple[int, str]] = []  # (row, message): parse errors now, image errors batch by batch
    for number, entry in _read_rows(data_path):
        if limit is not None and len(parsed) >= limit:
            break
        try:
            if isinstance(entry, RowError):
                raise entry
            row = _parse_row(number, entry, root, ("generations", "images"))
            ranks = entry.get("ranking", entry.get("rank"))
            if not isinstance(ranks, list) or len(ranks) != len(row.paths) or \
                    not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranks):
                raise RowError(f"row {number}: needs a \"ranking\" (or \"rank\") list of {len(row.paths)} numbers")
        except RowError as err:
            bad.append((number, str(err)))
            continue
        parsed.append((row, [-float(r) for r in ranks]))  # rank 1 = best: higher truth = better
    lists: dict[str, list[dict]] = {m: [] for m in methods}
    sizes = []
    with _progress(len(parsed), progress) as bar:
        for lo in range(0, len(parsed), lists_per_batch):
            part = []
            for row, truth in parsed[lo: lo + lists_per_batch]:
                try:
                    _load_images(row, judge.batcher)
                except RowError as err:
                    bad.append((row.line, str(err)))
                    continue
                part.append((row, truth))
                sizes.append(len(truth))
            for method in methods if part else ():
                rankings = judge.rank_many([r.prompt for r, _ in part], [r.images for r, _ in part], method=method,
                                           both_orders=both_orders, probes=probes)
                for (row, truth), ranking in zip(part, rankings):
                    lists[method].append({"row": row.line, "n": len(truth), "comparisons": ranking.comparisons,
                                          "pairwise_accuracy": pairwise_accuracy(ranking.scores, truth),
                                          "kendall_tau": kendall_tau(ranking.scores, truth),
                                          "spearman_rho": spearman_rho(ranking.scores, truth),
                                          "order": ranking.order})
            for row, _ in part:
                row.images = None  # let the patches go before the next batch is read
            bar.update(min(lists_per_batch, len(parsed) - lo))
    per_method = {}
    for method, done in lists.items():
        comparisons = sum(x["comparisons"] for x in done)
        per_method[method] = {
            "pairwise_accuracy": _nanmean([x["pairwise_accuracy"] for x in done]),
            "kendall_tau": _nanmean([x["kendall_tau"] for x in done]),
            "spearman_rho": _nanmean([x["spearman_rho"] for x in done]),
            "comparisons": comparisons,
            "comparisons_per_list": comparisons / len(done) if done else float("nan"),
            "generations": comparisons * (2 if both_orders else 1),
            "lists": done,
        }
    return {"data": str(data_path), "n_lists": len(sizes), "images_min": min(sizes, default=0),
            "images_max": max(sizes, default=0), "both_orders": both_orders, "probes": probes,
            "methods": per_method, "bad": [message for _, message in sorted(bad)]}


def format_rank_report(report: dict, title: str = "ranking evaluation") -> str:
    methods = list(report["methods"])
    rows = [("pairwise accuracy", "pairwise_accuracy", "{:.3f}"), ("Kendall tau-b", "kendall_tau", "{:.3f}"),
            ("Spearman rho", "spearman_rho", "{:.3f}"), ("comparisons", "comparisons", "{:d}"),
            ("comparisons per list", "comparisons_per_list", "{:.1f}"), ("generations", "generations", "{:d}")]
    head = f"{title}: {report['n_lists']} lists of {report['images_min']}-{report['images_max']} images"
    if report["bad"]:
        head += f", {len(report['bad'])} bad rows skipped"
    lines = [head, f"{'':<24}" + "".join(f"{m:>14}" for m in methods), "-" * (24 + 14 * len(methods))]
    for label, key, fmt in rows:
        cells = []
        for m in methods:
            v = report["methods"][m][key]
            cells.append("n/a" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
        lines.append(f"{label:<24}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def _json_clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_clean(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="judge folder (an exported run's final/, a Qwen2.5-VL "
                                                   "folder) or 'tiny'")
    p.add_argument("--image-root", default=None, help="folder relative image paths are under (default: the "
                                                      "input file's folder)")
    p.add_argument("--single-order", action="store_true", help="judge each pair in the given order only (half "
                                                               "the cost; no position-bias cancelling)")
    p.add_argument("--probes", type=int, default=3, help="anchor method: images in the first pass (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="rows (pair x order) per generate (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: bf16 on GPU")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def _load_judge(args) -> Judge:
    return Judge.from_pretrained(args.model, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens)


def _main_judge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lgrpo.judge",
                                description="Judge pairs / rank lists of images (rows of {prompt, images}). "
                                            "'python -m lgrpo.judge eval-rank --help': the ranking evaluation.")
    p.add_argument("--input", required=True, help="JSONL rows {\"prompt\": ..., \"images\": [2..n paths]}")
    p.add_argument("--output", required=True, help="JSONL, one row per input row, in order")
    p.add_argument("--method", default="anchor", choices=METHODS, help="for rows with more than 2 images")
    p.add_argument("--rows-per-batch", type=int, default=16, help="input rows judged together (default 16)")
    _model_args(p)
    args = p.parse_args(argv)
    if not Path(args.input).is_file():
        print(f"error: --input {args.input}: no such file", file=sys.stderr)
        return 2
    judge = _load_judge(args)
    try:
        judged, bad = judge_file(judge, args.input, args.output, image_root=args.image_root, method=args.method,
                                 both_orders=not args.single_order, probes=args.probes,
                                 rows_per_batch=args.rows_per_batch, progress=not args.no_progress)
    except RowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{judged} rows judged, {bad} bad rows (see \"error\" in {args.output})", file=sys.stderr)
    return 1 if bad else 0


def _main_eval_rank(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lgrpo.judge eval-rank",
                                description="Ranking evaluation on ranked lists: pairwise accuracy, Kendall tau, "
                                            "Spearman rho and comparisons used, per method.")
    p.add_argument("--data", required=True, help="ImageReward-style JSON/JSONL: {prompt, generations|images, "
                                                 "ranking|rank}")
    p.add_argument("--methods", default="anchor,round_robin", help="comma-separated, among " + ", ".join(METHODS))
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many lists")
    p.add_argument("--out", default=None, help="JSON report (default: rank_report.json beside --data)")
    _model_args(p)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods must be among {', '.join(METHODS)}, got {args.methods!r}")
    if not Path(args.data).is_file():
        print(f"error: --data {args.data}: no such file", file=sys.stderr)
        return 2
    judge = _load_judge(args)
    try:
        report = evaluate_ranking(judge, args.data, image_root=args.image_root, methods=methods,
                                  both_orders=not args.single_order, probes=args.probes, limit=args.limit,
                                  progress=not args.no_progress)
    except RowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_rank_report(report, f"ranking evaluation of {args.model} on {args.data}"))
    for line in report["bad"]:
        print(f"  skipped: {line}")
    out = Path(args.out) if args.out else Path(args.data).resolve().parent / "rank_report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(_json_clean(report), indent=2) + "\n")
    tmp.replace(out)
    print(f"report: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval-rank":
        return _main_eval_rank(argv[1:])
    return _main_judge(argv)


if __name__ == "__main__":
    sys.exit(main())
