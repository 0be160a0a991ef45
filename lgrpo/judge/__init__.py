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
``<think>…</think><answer>N</answer>`` (:func:`lgrpo.rollout.hf.generate`), then its *calibrated probability*
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

Layout: :mod:`.verdicts` (the :class:`Judge`), :mod:`.ranking` (the schemes and the metrics, no model),
:mod:`.cli` (both commands).
"""

from .cli import evaluate_ranking, judge_file, main
from .ranking import (
    METHODS,
    Ranking,
    anchor_scheme,
    kendall_tau,
    make_scheme,
    pairwise_accuracy,
    rank_with,
    round_robin_scheme,
    run_schemes,
    spearman_rho,
)
from .verdicts import Comparison, Judge

__all__ = [
    "METHODS", "Comparison", "Judge", "Ranking", "anchor_scheme", "evaluate_ranking", "judge_file",
    "kendall_tau", "main", "make_scheme", "pairwise_accuracy", "rank_with", "round_robin_scheme", "run_schemes",
    "spearman_rho",
]
