"""Prompts and the completion format: what the reasoner reads, what it must write, what the listener reads.

The reasoner sees a system instruction and one user turn holding both images and the question; it must
answer ``<think>…</think><answer>N</answer>`` with N = 1 or 2 (SPEC §1; the tags are configurable).
The listener sees the same system and user turns, then an assistant turn prefilled with the reasoner's
chain of thought (answer removed) up to and including ``<answer>``: its next-token distribution over
``1`` / ``2`` is its confidence.

Every text here goes through the tokenizer's chat template, so a real model folder and the tiny built-in
tokenizers render the same ChatML layout. Each image becomes one placeholder (the family's:
``<|image_pad|>`` for the Qwen-VL lineage, :mod:`lgrpo.models`); :mod:`lgrpo.batching` expands it to the
image's token count.

**Text is text** (SPEC §1). Only the chat template adds control tokens (``<|im_start|>``, ``<|im_end|>``,
``<|vision_start|>``, ``<|image_pad|>``, ...). A prompt, a caption or a model's reasoning that spells one
is encoded as the characters it is made of (:func:`encode_text`, HF's ``split_special_tokens=True``), so
a policy cannot open a turn in its own listener's prompt. The renderers return a :class:`ChatText`, which
remembers which control tokens the template wrote; :meth:`ChatText.ids` encodes it by that rule. Every
path that tokenizes text (batcher, listener prefill, warm-up targets, judge, TRL reward, the length
checks) goes through these two functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .models.qwen_vl import END_MARKERS, IMAGE_PLACEHOLDER

DEFAULT_SYSTEM = (
    "You compare two images made from the same text prompt and decide which one people prefer. "
    "First think it through inside <think> </think>. "
    "Then write the number of the preferred image, 1 or 2, inside <answer> </answer>."
)
DEFAULT_QUESTION = 'The prompt was: "{prompt}". Which image do people prefer, image 1 or image 2?'

# A sentence that names image 1 or 2 and a verdict word, in either order: "image 1 matches the prompt.",
# "Therefore image 2 is better.", "The answer is image 1.", "I prefer picture 2."
_VERDICT_WORDS = r"(?:match(?:es)?|better|best|prefer\w*|wins?|choose|chosen|pick|answer|superior)"
_IMAGE_REF = r"(?:image|picture)\s*#?\s*[12]\b"
DEFAULT_VERDICT_PATTERN = rf"(?i)\b{_IMAGE_REF}.*\b{_VERDICT_WORDS}\b|\b{_VERDICT_WORDS}\b.*\b{_IMAGE_REF}"


@dataclass(frozen=True)
class PromptFormat:
    """The prompt wording and the completion tags. Defaults follow SPEC §1.

    ``question`` must contain ``{prompt}``. The two ``choices`` are what goes inside the answer tags
    for image 1 and image 2; each must encode to a single token after ``answer_open``
    (checked by :func:`choice_token_ids`).

    ``listener_strip_verdict`` (off by default): the listener reads the reasoning without its last
    sentence when that sentence matches ``verdict_pattern`` (:func:`strip_verdict`). A reasoning that
    ends by naming its choice ("image 1 matches the prompt.") lets the listener copy the verdict instead
    of weighing the evidence before it; stripping the verdict makes the listener reward measure the
    evidence.
    """

    system: str = DEFAULT_SYSTEM
    question: str = DEFAULT_QUESTION
    image_labels: tuple[str, str] = ("Image 1:", "Image 2:")
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    choices: tuple[str, str] = ("1", "2")
    listener_strip_verdict: bool = False
    verdict_pattern: str = DEFAULT_VERDICT_PATTERN

    def __post_init__(self):
        if "{prompt}" not in self.question:
            raise ValueError(f"PromptFormat.question must contain '{{prompt}}', got {self.question!r}")
        tags = (self.think_open, self.think_close, self.answer_open, self.answer_close)
        if any(not t for t in tags) or len(set(tags)) != 4:
            raise ValueError(f"PromptFormat tags must be four distinct non-empty strings, got {tags}")
        if len(self.choices) != 2 or len(set(self.choices)) != 2 or not all(self.choices):
            raise ValueError(f"PromptFormat.choices must be two distinct non-empty strings, "
                             f"got {self.choices}")
        try:
            re.compile(self.verdict_pattern)
        except re.error as err:
            raise ValueError(f"PromptFormat.verdict_pattern is not a valid regular expression: {err}") from None

    def completion(self, think: str, answer: int) -> str:
        """A well-formed completion: ``<think>{think}</think><answer>{choice}</answer>``."""
        if answer not in (1, 2):
            raise ValueError(f"answer must be 1 or 2, got {answer!r}")
        return f"{self.think_open}{think}{self.think_close}{self.answer_open}{self.choices[answer - 1]}" \
               f"{self.answer_close}"


DEFAULT_FORMAT = PromptFormat()


# ----------------------------------------------------------------------------------------------------
# Encoding: the one place text becomes token ids
# ----------------------------------------------------------------------------------------------------

def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of ordinary text: a special token spelled in it (``<|im_end|>``) is encoded as its characters.

    The rule for everything a user or a model wrote. Text with no special token in it encodes exactly as
    before (the tokenizer splits at special tokens before its pre-tokenizer runs, so nothing merges
    across them either way)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def control_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special added tokens (``<|im_start|>``, ``<|image_pad|>``, ...) and their ids."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}  # a tokenizer without added tokens has none
    return {t.content: i for i, t in added.items() if t.special}


class ChatText(str):
    """A rendered prompt that knows which of its control tokens the chat template wrote.

    A ``str`` (print it, compare it, count placeholders in it), plus ``pieces``: ``(string, is_control)``
    in order. Adding a plain ``str`` on either side appends or prepends it as *text*, so
    ``render_reasoner_prompt(...) + reasoning`` stays safe. :meth:`ids` encodes control pieces as their
    single ids and text pieces with :func:`encode_text`.
    """

    pieces: tuple[tuple[str, bool], ...]

    def __new__(cls, pieces: Sequence[tuple[str, bool]]):
        merged: list[tuple[str, bool]] = []
        for piece, control in pieces:
            if not piece:
                continue
            if merged and not control and not merged[-1][1]:
                merged[-1] = (merged[-1][0] + piece, False)  # adjacent text encodes as one run
            else:
                merged.append((piece, bool(control)))
        out = super().__new__(cls, "".join(p for p, _ in merged))
        out.pieces = tuple(merged)
        return out

    def __add__(self, other):
        if isinstance(other, ChatText):
            return ChatText(self.pieces + other.pieces)
        if isinstance(other, str):
            return ChatText(self.pieces + ((other, False),))
        return NotImplemented

    def __radd__(self, other):
        if isinstance(other, str):
            return ChatText(((other, False),) + self.pieces)
        return NotImplemented

    def __reduce__(self):  # pickles (DataLoader workers) keep the pieces
        return ChatText, (self.pieces,)

    def ids(self, tokenizer) -> list[int]:
        """Token ids: the template's control tokens live, every other character as text."""
        specials = control_tokens(tokenizer)
        out: list[int] = []
        for piece, control in self.pieces:
            out += [specials[piece]] if control else encode_text(tokenizer, piece)
        return out


_SENTINEL = "\ue000{}\ue001"  # private-use characters: no template writes them, no special token holds them


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> ChatText:
    """``apply_chat_template`` as a :class:`ChatText`: the control tokens in the result are the template's.

    Each text item is rendered as a sentinel first, so every control token found in that rendering was
    written by the template; the texts are then put back as text pieces."""
    texts: list[str] = []
    masked = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
            content = _SENTINEL.format(len(texts) - 1)
        else:
            items = []
            for item in content:
                if item.get("type") == "text":
                    texts.append(item["text"])
                    item = {**item, "text": _SENTINEL.format(len(texts) - 1)}
                items.append(item)
            content = items
        masked.append({**message, "content": content})
    rendered = tokenizer.apply_chat_template(masked, tokenize=False, add_generation_prompt=add_generation_prompt)
    found = [int(k) for k in re.findall("\ue000(\\d+)\ue001", rendered)]
    if sorted(found) != list(range(len(texts))):
        raise ValueError("the tokenizer's chat template does not render each text item once, unchanged; "
                         "lgrpo needs that to tell the template's control tokens from the text")
    specials = control_tokens(tokenizer)
    pieces: list[tuple[str, bool]] = []
    if specials:
        pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
        parts = re.split(pattern, rendered)
    else:
        parts = [rendered]
    for k, part in enumerate(parts):
        if k % 2:  # a captured control token
            pieces.append((part, True))
            continue
        last = 0
        for m in re.finditer("\ue000(\\d+)\ue001", part):
            pieces += [(part[last:m.start()], False), (texts[int(m.group(1))], False)]
            last = m.end()
        pieces.append((part[last:], False))
    return ChatText(pieces)


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------

def reasoner_messages(prompt: str, fmt: PromptFormat = DEFAULT_FORMAT) -> list[dict]:
    """Chat messages for one pair: system instruction, then a user turn with both images and the question."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    user = [
        {"type": "text", "text": fmt.image_labels[0]},
        {"type": "image"},
        {"type": "text", "text": fmt.image_labels[1]},
        {"type": "image"},
        {"type": "text", "text": fmt.question.format(prompt=prompt.strip())},
    ]
    return [
        {"role": "system", "content": [{"type": "text", "text": fmt.system}]},
        {"role": "user", "content": user},
    ]


def render_reasoner_prompt(tokenizer, prompt: str, fmt: PromptFormat = DEFAULT_FORMAT) -> ChatText:
    """The reasoner's input text, ending with the opened assistant turn; one placeholder per image.

    The placeholders counted are the template's: a prompt that spells ``<|image_pad|>`` is text."""
    text = render_chat(tokenizer, reasoner_messages(prompt, fmt), add_generation_prompt=True)
    n = sum(piece == IMAGE_PLACEHOLDER for piece, control in text.pieces if control)
    if n != 2:
        # A template that ignores {"type": "image"} items would silently drop the images.
        raise ValueError(f"the tokenizer's chat template rendered {n} {IMAGE_PLACEHOLDER} placeholders for "
                         "two images; it must render Qwen2-VL image items as "
                         "<|vision_start|><|image_pad|><|vision_end|>")
    return text


def render_listener_prompt(tokenizer, prompt: str, reasoning: str,
                           fmt: PromptFormat = DEFAULT_FORMAT) -> ChatText:
    """The listener's input: the reasoner prompt plus the assistant turn prefilled up to ``<answer>``.

    ``reasoning`` is the reasoner's think text with the answer removed
    (:attr:`ParsedCompletion.reasoning`); with ``fmt.listener_strip_verdict`` its trailing verdict
    sentence is removed first (:func:`strip_verdict`). The next token after the returned text is where
    the listener's choice is read.
    """
    if fmt.listener_strip_verdict:
        reasoning = strip_verdict(reasoning, fmt.verdict_pattern)
    # ChatText + str: the reasoning is appended as text, whatever it spells.
    return (render_reasoner_prompt(tokenizer, prompt, fmt)
            + f"{fmt.think_open}{reasoning}{fmt.think_close}{fmt.answer_open}")


def strip_verdict(reasoning: str, pattern: str = DEFAULT_VERDICT_PATTERN) -> str:
    """``reasoning`` without its last sentence when that sentence is a verdict (``re.search(pattern)``).

    Sentences end at ``.``, ``!`` or ``?`` followed by whitespace, or at a line break (so "2.5" is one
    word). Only the last sentence is looked at; a reasoning that is one verdict sentence becomes ``""``.
    """
    if not isinstance(reasoning, str):
        raise TypeError(f"reasoning must be a str, got {type(reasoning).__name__}")
    body = reasoning.rstrip()
    cuts = [m.end() for m in re.finditer(r"[.!?]+\s+|\n+", body)]
    start = cuts[-1] if cuts else 0
    if re.search(pattern, body[start:]):
        return body[:start].rstrip()
    return reasoning


def choice_token_ids(tokenizer, fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[int, int]:
    """Token ids of the two choices as they follow ``answer_open`` (for Qwen2.5-VL: ``1`` and ``2``).

    Raises ``ValueError`` when a choice does not encode to exactly one token appended to the encoding of
    ``answer_open``: the listener reads one next-token distribution, so each choice must be one token.
    """
    prefix = encode_text(tokenizer, fmt.answer_open)
    ids = []
    for choice in fmt.choices:
        full = encode_text(tokenizer, fmt.answer_open + choice)
        if len(full) != len(prefix) + 1 or full[: len(prefix)] != prefix:
            raise ValueError(f"choice {choice!r} after {fmt.answer_open!r} does not encode to one extra "
                             f"token ({prefix} -> {full}): the listener needs single-token choices")
        ids.append(full[-1])
    if ids[0] == ids[1]:
        raise ValueError(f"choices {fmt.choices} encode to the same token id {ids[0]}")
    return ids[0], ids[1]


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The token ids that end a completion: the one stop set for rollouts, masks, eval and the warm-up.

    The tokenizer's EOS plus Qwen's two end markers when the vocabulary has them
    (:data:`lgrpo.models.qwen_vl.END_MARKERS`: ``<|im_end|>`` ends an assistant turn, ``<|endoftext|>`` a
    document). A model that writes
    either has finished; anything after it is never sampled, scored or shown to the listener. Empty
    for a tokenizer with none of them: completions then run to ``max_new_tokens`` (the benchmarks'
    fixed workload).
    """
    eos = tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    vocab = tokenizer.get_vocab()  # membership, not convert_tokens_to_ids: that maps a miss to unk
    ids |= {vocab[t] for t in END_MARKERS if t in vocab}
    return tuple(sorted(ids))


# ----------------------------------------------------------------------------------------------------
# Parsing completions
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedCompletion:
    """What a completion says, judged against the format.

    - ``format_ok``: exactly one think block (non-empty), then exactly one answer block holding a choice,
      only whitespace between and after them (SPEC §1 ``r_fmt``).
    - ``answer``: 1 or 2 when there is exactly one answer block and it holds a choice, else ``None``;
      defined even when other parts of the format are wrong (e.g. text after the answer).
    - ``reasoning``: the text the listener reads: the first complete think block with any answer tags or
      blocks inside it removed, stripped; ``None`` without a complete, non-empty think block.
    - ``reason``: ``"ok"`` or why the format failed (for logs and tests).
    """

    format_ok: bool
    answer: int | None
    reasoning: str | None
    reason: str


def parse_completion(text: str, fmt: PromptFormat = DEFAULT_FORMAT) -> ParsedCompletion:
    """Parse one decoded completion (special tokens such as ``<|im_end|>`` already stripped)."""
    if not isinstance(text, str):
        raise TypeError(f"completion must be a str, got {type(text).__name__}")
    to, tc, ao, ac = (re.escape(t) for t in _tags(fmt))

    answer_blocks = re.findall(f"{ao}(.*?){ac}", text, flags=re.DOTALL)
    answer = None
    if len(answer_blocks) == 1 and text.count(fmt.answer_open) == 1 and text.count(fmt.answer_close) == 1:
        content = answer_blocks[0].strip()
        if content in fmt.choices:
            answer = fmt.choices.index(content) + 1

    think = re.search(f"{to}(.*?){tc}", text, flags=re.DOTALL)
    reasoning = None
    if think is not None:
        inner = re.sub(f"{ao}.*?{ac}", " ", think.group(1), flags=re.DOTALL)
        for tag in (fmt.answer_open, fmt.answer_close):
            inner = inner.replace(tag, " ")
        reasoning = inner.strip() or None

    reason = _format_problem(text, fmt, answer_blocks, answer, think)
    return ParsedCompletion(format_ok=reason == "ok", answer=answer, reasoning=reasoning, reason=reason)


def _tags(fmt: PromptFormat) -> tuple[str, str, str, str]:
    return fmt.think_open, fmt.think_close, fmt.answer_open, fmt.answer_close


def _format_problem(text, fmt, answer_blocks, answer, think) -> str:
    counts = {tag: text.count(tag) for tag in _tags(fmt)}
    if counts[fmt.think_open] == 0 or counts[fmt.think_close] == 0:
        return "missing think block"
    if counts[fmt.think_open] > 1 or counts[fmt.think_close] > 1:
        return "more than one think block"
    if counts[fmt.answer_open] == 0 or counts[fmt.answer_close] == 0:
        return "missing answer block"
    if counts[fmt.answer_open] > 1 or counts[fmt.answer_close] > 1 or len(answer_blocks) > 1:
        return "more than one answer block"
    if answer is None:
        return f"answer is not one of {list(fmt.choices)}"
    if think is None or not think.group(1).strip():
        return "empty think block"
    layout = re.fullmatch(
        rf"\s*{re.escape(fmt.think_open)}.*?{re.escape(fmt.think_close)}\s*"
        rf"{re.escape(fmt.answer_open)}.*?{re.escape(fmt.answer_close)}(.*)",
        text, flags=re.DOTALL)
    if layout is None:
        return "text outside the blocks or blocks out of order"
    if layout.group(1).strip():
        return "text after the answer"
    return "ok"
