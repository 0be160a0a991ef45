"""What a preference pair is: the example the trainer sees, a manifest row and its check, bad-row reports.

A manifest row is ``{"prompt", "image_1", "image_2", "preferred", "id"?, "votes"?}`` (lgrpo.data's
docstring); :func:`check_row` is the one rule a row must pass, for the manifest reader and the converters.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from ..images import open_image

# Qwen's control tokens (<|image_pad|>, <|vision_start|>, <|im_end|>, ...): the tokenizer turns them into
# single special ids even inside a prompt's text, where they break the image placeholders or the turn.
SPECIAL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class DataError(ValueError):
    """A bad row or unreadable source; the message names the file and line."""



@dataclass(frozen=True)
class PreferenceExample:
    """One training/eval item: a prompt, two decoded RGB images, and which one people prefer.

    ``captions`` (what each image shows) exists only for the synthetic task, where it feeds the
    templated reasoning used by the supervised warm-up.
    """

    prompt: str
    images: tuple[Image.Image, Image.Image]
    preferred: int
    id: str = ""
    captions: tuple[str, str] | None = None

    def swapped(self) -> PreferenceExample:
        """The same pair with the images in the other order; the label (and captions) follow."""
        return replace(self, images=(self.images[1], self.images[0]), preferred=3 - self.preferred,
                       captions=None if self.captions is None else (self.captions[1], self.captions[0]))


class _Located:
    """``where``: ``file:line`` of a manifest row, for messages (``source`` and ``line`` are its fields)."""

    source: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class PairRecord(_Located):
    """One pair, images not decoded: a manifest row (checked), or a converter's pair before its check.
    ``line`` is 1-based in ``source`` (the manifest, or the converted file)."""

    prompt: str
    image_1: Path
    image_2: Path
    preferred: int
    id: str
    votes: tuple[float, float] | None
    source: Path
    line: int

    def load(self) -> PreferenceExample:
        """Decode both images (RGB). Raises :class:`DataError` naming the file and line on failure."""
        images = []
        for path in (self.image_1, self.image_2):
            try:
                images.append(open_image(path))
            except Exception as err:  # noqa: BLE001 - Pillow's plugins raise OSError, ValueError, SyntaxError...
                raise DataError(f"{self.where}: cannot read image {path}: {err}") from err
        return PreferenceExample(self.prompt, (images[0], images[1]), self.preferred, self.id)

    def to_row(self, manifest_dir: Path) -> dict:
        """The JSON row, with image paths relative to ``manifest_dir`` when they lie under it."""
        row = {"prompt": self.prompt, "image_1": _relative(self.image_1, manifest_dir),
               "image_2": _relative(self.image_2, manifest_dir), "preferred": self.preferred}
        if self.id:
            row["id"] = self.id
        if self.votes is not None:
            row["votes"] = list(self.votes)
        return row


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class DataReport:
    """What reading or converting a source did: rows seen, kept, bad (listed), and dropped by rule."""

    source: str
    rows: int = 0
    kept: int = 0
    bad: list[BadRow] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.rows} rows, {self.kept} kept, {len(self.bad)} bad"]
        parts += [f"{n} dropped ({why})" for why, n in sorted(self.dropped.items())]
        return ", ".join(parts)

    def __str__(self) -> str:
        return "\n".join([self.summary(), *(f"  {b}" for b in self.bad)])




def _relative(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix() if Path(path).is_relative_to(base) else str(path)
    except ValueError:  # different drives on Windows
        return str(path)


def check_row(row, base: Path) -> tuple[dict | None, str | None]:
    """Validate one parsed row; returns (normalised fields, None) or (None, reason)."""
    if not isinstance(row, dict):
        return None, f"row must be a JSON object, got {type(row).__name__}"
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return None, "empty or missing prompt"
    token = SPECIAL_TOKEN_RE.search(prompt)
    if token is not None:
        return None, (f"the prompt holds the special token {token.group()}: the tokenizer would read it as "
                      f"a control token (an image placeholder, a turn boundary), not as text")
    preferred = row.get("preferred")
    if isinstance(preferred, bool) or preferred not in (1, 2):
        return None, f"preferred must be 1 or 2, got {preferred!r}"
    paths = []
    for key in ("image_1", "image_2"):
        value = row.get(key)
        if not isinstance(value, str) or not value:
            return None, f"{key} missing or not a path string"
        path = Path(value) if os.path.isabs(value) else base / value
        if not path.is_file():
            return None, f"{key} not found: {path}"
        paths.append(path)
    votes = row.get("votes")
    if votes is not None:
        if (not isinstance(votes, list) or len(votes) != 2
                or not all(is_number(v) and v >= 0 for v in votes)):
            return None, f"votes must be two non-negative numbers, got {votes!r}"
        votes = (votes[0], votes[1])
    rid = row.get("id", "")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return None, f"id must be a string or integer, got {rid!r}"
    return {"prompt": prompt, "image_1": paths[0], "image_2": paths[1], "preferred": preferred,
            "id": str(rid), "votes": votes}, None


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
