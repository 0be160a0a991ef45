"""A deterministic synthetic preference task for the default run and the tests.

Prompt: ``"a red circle"``. Two small rendered images: one shows exactly that (colour and shape), the
other differs in colour, shape or both. The preferred image is the matching one; its position (1 or 2) is
drawn per example.

Splits are over *pair configurations* (target, distractor): the held-out split's configurations never
appear in training, so held-out accuracy is not memorisation of seen pairs. Everything is a pure function
of ``(seed, split, index)``: the same call gives the same images on any machine.

Each example also carries captions (what each image shows), from which :func:`reference_reasoning`
writes the templated chain of thought the trainer's supervised warm-up uses so the format exists::

    <think>the prompt asks for a red circle. image 1 shows a red circle. image 2 shows a blue square.
    image 1 matches the prompt.</think><answer>1</answer>
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .data import PairRecord, PreferenceExample, write_manifest
from .prompts import DEFAULT_FORMAT, PromptFormat

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SPLITS = ("train", "heldout")
BACKGROUND = (235, 235, 235)
FRAME = (25, 25, 25)
FRAME_WIDTH = 3  # pixels; the shapes (radius 0.32 of the side, jitter <= 4) never reach the frame


def describe(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def render(colour: str, shape: str, size: tuple[int, int] = (56, 56),
           offset: tuple[int, int] = (0, 0), *, frame: bool = False) -> Image.Image:
    """One shape of one colour on a light background, centred then shifted by ``offset`` pixels.

    ``frame=True`` draws a dark border around the image: a visual cue that says nothing about the shape
    (the spurious cue of :mod:`lgrpo.experiments.shortcut`). The default task never draws it.
    """
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {colour!r}/{shape!r}; "
                         f"colours {list(COLOURS)}, shapes {SHAPES}")
    w, h = size
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = 0.32 * min(w, h)
    cx, cy = w / 2 + offset[0], h / 2 + offset[1]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    if frame:
        draw.rectangle([0, 0, w - 1, h - 1], outline=FRAME, width=FRAME_WIDTH)
    return img


Item = tuple[str, str]  # (colour, shape)


def draw_pair(target: Item, distractor: Item, rng: random.Random, *, image_size: tuple[int, int] = (56, 56),
              jitter: int = 4, framed: str | None = None) -> tuple[tuple[Image.Image, Image.Image],
                                                                    tuple[str, str], int]:
    """Render one pair: ``(images, captions, preferred)``, the target at a random position (1 or 2).

    ``framed``: None (no frame), ``"preferred"`` or ``"other"``: which image carries the frame. The draws
    from ``rng`` are the same whatever ``framed`` is, so a framed pair is the unframed pair plus a frame.
    """
    if framed not in (None, "preferred", "other"):
        raise ValueError(f"framed must be None, 'preferred' or 'other', got {framed!r}")
    preferred = rng.choice((1, 2))
    offsets = [(rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) for _ in range(2)]
    frames = (framed == "preferred", framed == "other")
    images = [render(*c, image_size, o, frame=f) for c, o, f in zip((target, distractor), offsets, frames)]
    captions = [describe(*target), describe(*distractor)]
    if preferred == 2:
        images.reverse()
        captions.reverse()
    return (images[0], images[1]), (captions[0], captions[1]), preferred


class SyntheticTask:
    """The task's examples for one seed. ``dataset(split, size)`` gives an indexable split.

    ``heldout_fraction`` of the (target, distractor) configurations form the held-out split.
    ``image_size`` is (width, height); 56×56 gives 4 visual tokens per image after Qwen2.5-VL's 2×2 merge.
    """

    def __init__(self, seed: int = 0, *, image_size: tuple[int, int] = (56, 56),
                 heldout_fraction: float = 0.2, jitter: int = 4):
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.seed, self.image_size, self.jitter = seed, tuple(image_size), jitter
        items = list(itertools.product(COLOURS, SHAPES))
        configs = [(t, d) for t in items for d in items if t != d]
        random.Random(f"lgrpo-synthetic-split-{seed}").shuffle(configs)
        n_heldout = max(1, round(heldout_fraction * len(configs)))
        self._configs = {"heldout": configs[:n_heldout], "train": configs[n_heldout:]}

    def configurations(self, split: str) -> list[tuple[tuple[str, str], tuple[str, str]]]:
        """The (target, distractor) pairs of a split; disjoint between splits."""
        self._check_split(split)
        return list(self._configs[split])

    def example(self, split: str, index: int) -> PreferenceExample:
        """Example ``index`` of ``split`` (any non-negative integer; configurations cycle)."""
        self._check_split(split)
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        configs = self._configs[split]
        target, distractor = configs[index % len(configs)]
        rng = random.Random(f"lgrpo-synthetic-{self.seed}-{split}-{index}")
        images, captions, preferred = draw_pair(target, distractor, rng, image_size=self.image_size,
                                                jitter=self.jitter)
        return PreferenceExample(prompt=describe(*target), images=images, preferred=preferred,
                                 id=f"synthetic-{split}-{index}", captions=captions)

    def dataset(self, split: str, size: int) -> SyntheticDataset:
        return SyntheticDataset(self, split, size)

    def write(self, folder: str | Path, split: str, size: int) -> Path:
        """Write ``size`` examples as PNG files plus a canonical manifest ``<folder>/<split>.jsonl``."""
        folder = Path(folder)
        image_dir = folder / f"{split}_images"
        image_dir.mkdir(parents=True, exist_ok=True)
        manifest = folder / f"{split}.jsonl"

        def records():
            for i in range(size):
                ex = self.example(split, i)
                paths = [image_dir / f"{i:06d}_{k}.png" for k in (1, 2)]
                for img, p in zip(ex.images, paths):
                    img.save(p)
                yield PairRecord(ex.prompt, paths[0].resolve(), paths[1].resolve(), ex.preferred, ex.id, None,
                                 manifest, i + 1)

        write_manifest(records(), manifest)
        return manifest

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


class SyntheticDataset:
    """``size`` examples of one split, indexable like :class:`lgrpo.data.ManifestDataset`."""

    def __init__(self, task: SyntheticTask, split: str, size: int):
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        task._check_split(split)
        self.task, self.split, self.size = task, split, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> PreferenceExample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        return self.task.example(self.split, index)


def restate_prompt(prompt: str) -> str:
    """The first sentence of the templated reasoning: ``the prompt asks for a red circle.``"""
    return f"the prompt asks for {prompt}."


def evidence_reasoning(example: PreferenceExample) -> str:
    """The prompt and what each image shows, and nothing else: no verdict sentence.

    ``the prompt asks for a red circle. image 1 shows a red circle. image 2 shows a blue square.``
    """
    if example.captions is None:
        raise ValueError("the templated reasoning needs an example with captions (a synthetic example)")
    c1, c2 = example.captions
    return f"{restate_prompt(example.prompt)} image 1 shows {c1}. image 2 shows {c2}."


def reference_reasoning(example: PreferenceExample) -> str:
    """The templated chain of thought for a synthetic example (the think text, without tags): the
    evidence (:func:`evidence_reasoning`) then the verdict sentence ``image k matches the prompt.``"""
    return f"{evidence_reasoning(example)} image {example.preferred} matches the prompt."


def reference_completion(example: PreferenceExample, fmt: PromptFormat = DEFAULT_FORMAT) -> str:
    """The full well-formed completion for the warm-up: think block, then the correct answer."""
    return fmt.completion(reference_reasoning(example), example.preferred)
