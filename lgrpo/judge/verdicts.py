"""The judge itself: greedy reasoning, then the calibrated probability of each image (see :mod:`lgrpo.judge`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..batching import ProcessedImage, VLBatcher
from ..listener import Listener
from ..prompts import parse_completion
from .ranking import Ranking, make_scheme, run_schemes

ImageInput = Image.Image | ProcessedImage | str | os.PathLike


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
        from ..model import load_model
        from ..rollout.hf import clean_generation_config

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
                from ..data import open_image

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
        from ..config import RolloutConfig
        from ..rollout import rollout_for

        batch = self.batcher.reasoner_batch(prompts, images).to(_device(self.model), _dtype(self.model))
        # transformers' generate: the judge runs a frozen model once per batch, not a training loop
        path = RolloutConfig(engine="hf", max_new_tokens=self.max_new_tokens, stop=self.batcher.fmt.answer_close)
        return rollout_for(path, self.model, self.batcher.tokenizer).generate(batch, greedy=True).texts


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype

