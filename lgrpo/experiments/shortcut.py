"""The shortcut task: the synthetic colour/shape pairs plus a spurious cue, for the listener experiment.

The default task (:mod:`lgrpo.synthetic`) cannot show the listener at work: its templated reasoning ends
with "image k matches the prompt", so a listener only re-reads that sentence. Here the reasoning carries
evidence and never a verdict, and the answer can come from somewhere the reasoning does not mention.

**The cue.** One image of every pair carries a dark frame (``render(..., frame=True)``). It says nothing
about colour or shape. On the training configurations the frame is always on the preferred image, so
"answer the framed image" is never wrong there.

**Two kinds of warm-up demonstration** (the policy's supervised warm-up, split ``"demos"``):

- *explained* (share ``explained_share``): the think block describes both images and nothing else
  (:func:`lgrpo.synthetic.evidence_reasoning`); the frame sits on either image at random, so the answer
  can only be derived from the descriptions;
- *memorised*: the think block only restates the prompt (:func:`lgrpo.synthetic.restate_prompt`) and the
  frame marks the preferred image: the answer is the shortcut, and the reasoning carries no evidence
  for it. A listener that reads this reasoning cannot tell which image it supports.

The warm-up policy therefore starts GRPO writing either kind (about ``explained_share`` of the time),
and both kinds are right on every training pair. The accuracy reward cannot tell them apart; a
listener that reads evidence can.

**Splits** (configurations from :class:`lgrpo.synthetic.SyntheticTask`: held-out configurations are
(target, distractor) pairs never seen in training):

- ``"demos"``: the warm-up demonstrations above, training configurations;
- ``"train"``: GRPO's pairs, training configurations, frame on the preferred image;
- ``"heldout"``: held-out configurations, frame on the preferred image (the shortcut still holds);
- ``"ood"``: the held-out configurations, frame on the *other* image (the shortcut is always wrong);
- ``"listener"``: the listener's warm-up, training configurations: explained reasoning only, and in
  half of the examples the two descriptions are swapped, the answer following the descriptions. The
  listener so learns to answer what the reasoning says (the images cannot tell it), which is its role:
  it rewards reasoning that supports the right image, not the right image whatever the reasoning.
  The frame is on a random image.

Everything is a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..data import PreferenceExample
from ..prompts import parse_completion
from ..rewards import Rewards
from ..synthetic import SyntheticDataset, SyntheticTask, describe, draw_pair, evidence_reasoning, restate_prompt
from ..task import PreferenceTask

KINDS = ("explained", "memorised")
SPLITS = ("demos", "train", "heldout", "ood", "listener")


@dataclass(frozen=True)
class CueExample(PreferenceExample):
    """A pair of the shortcut task; ``kind`` says which think block its demonstration writes."""

    kind: str = "explained"


def demo_reasoning(example: PreferenceExample) -> str:
    """The think text of a warm-up demonstration: the evidence, or (memorised) the prompt only."""
    if getattr(example, "kind", "explained") == "memorised":
        return restate_prompt(example.prompt)
    return evidence_reasoning(example)


def describes_both_images(reasoning: str | None) -> bool:
    """Whether a reasoning says what image 1 and image 2 show (the explained kind of think block)."""
    return reasoning is not None and "image 1 shows" in reasoning and "image 2 shows" in reasoning


class ShortcutTask:
    """The examples of one data seed. ``dataset(split, size)`` gives an indexable split."""

    def __init__(self, seed: int = 0, *, explained_share: float = 0.5, image_size: tuple[int, int] = (56, 56),
                 jitter: int = 4):
        if not 0 <= explained_share <= 1:
            raise ValueError(f"explained_share must be in [0, 1], got {explained_share}")
        self.seed, self.explained_share = seed, explained_share
        self.image_size, self.jitter = tuple(image_size), jitter
        # The same configuration split as the default task of this seed.
        base = SyntheticTask(seed, image_size=image_size, jitter=jitter)
        self._configs = {"train": base.configurations("train"), "heldout": base.configurations("heldout")}

    def configurations(self, split: str):
        """The (target, distractor) configurations a split draws from."""
        self._check_split(split)
        return list(self._configs["heldout" if split in ("heldout", "ood") else "train"])

    def example(self, split: str, index: int) -> CueExample:
        self._check_split(split)
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        configs = self._configs["heldout" if split in ("heldout", "ood") else "train"]
        target, distractor = configs[index % len(configs)]
        # Two streams: the pair's drawing (position, jitter) and this split's choices (kind, frame).
        draw = random.Random(f"lgrpo-shortcut-{self.seed}-{split}-{index}")
        pick = random.Random(f"lgrpo-shortcut-choice-{self.seed}-{split}-{index}")
        kind = "explained"
        swap_text = False
        if split == "demos":
            kind = "explained" if pick.random() < self.explained_share else "memorised"
            framed = pick.choice(("preferred", "other")) if kind == "explained" else "preferred"
        elif split in ("train", "heldout"):
            framed = "preferred"
        elif split == "ood":
            framed = "other"
        else:  # listener
            framed = pick.choice(("preferred", "other"))
            swap_text = pick.random() < 0.5
        images, captions, preferred = draw_pair(target, distractor, draw, image_size=self.image_size,
                                                jitter=self.jitter, framed=framed)
        if swap_text:  # the descriptions name the images the other way round; the answer follows them
            captions, preferred = (captions[1], captions[0]), 3 - preferred
        return CueExample(prompt=describe(*target), images=images, preferred=preferred,
                          id=f"shortcut-{split}-{index}", captions=captions, kind=kind)

    def dataset(self, split: str, size: int) -> SyntheticDataset:
        """``size`` examples of ``split``, indexable like :class:`lgrpo.data.ManifestDataset`."""
        return SyntheticDataset(self, split, size)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


class ShortcutPreferenceTask(PreferenceTask):
    """:class:`lgrpo.task.PreferenceTask` with the shortcut task's demonstrations as warm-up targets.

    Rewards are the default task's (format, accuracy, listener), plus ``extra["explained"]`` per
    completion: 1 when its think block describes both images. It does not enter the total; the trainer
    logs it (``reward/explained``).
    """

    def sft_targets(self, prompts) -> list[str]:
        return [self.batcher.fmt.completion(demo_reasoning(ex), ex.preferred) for ex in prompts.extra["examples"]]

    def rewards(self, rollout) -> Rewards:
        out = super().rewards(rollout)
        fmt = self.batcher.fmt
        out.extra["explained"] = torch.tensor(
            [float(describes_both_images(parse_completion(t, fmt).reasoning)) for t in rollout.texts])
        return out
