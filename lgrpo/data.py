"""Image-preference pairs: the canonical manifest, converters from public layouts, and iteration order.

Canonical manifest: JSONL, one pair per line::

    {"prompt": "a red circle", "image_1": "imgs/0001_1.png", "image_2": "/abs/0001_2.jpg", "preferred": 1,
     "id": "optional", "votes": [12, 3]}

Image paths are absolute or relative to the manifest's folder. ``preferred`` is 1 or 2.

Bad rows (not UTF-8, invalid JSON, empty prompt or one holding a special token such as ``<|image_pad|>``,
label not 1/2, missing or unreadable image, an image too large or too elongated) raise :class:`DataError`
naming the file and line by default; with ``skip_bad=True`` they are skipped and listed in a
:class:`DataReport`. For training, :class:`ManifestDataset` with ``on_bad_row="skip"`` replaces each bad
row by the next good one and reports it. Nothing is dropped silently.

Converters (``python -m lgrpo.data convert --from FORMAT SRC DST``):

- ``rapidata``: Parquet with embedded image bytes, as in Rapidata's human-preference sets on the Hugging
  Face hub: columns ``prompt``, ``image1``, ``image2`` (``{"bytes", "path"}`` structs or raw bytes) and
  the votes as ``votes_image1`` / ``votes_image2`` (the 700k set) or
  ``weighted_results_image1_<criterion>`` / ``weighted_results_image2_<criterion>`` (the newer sets;
  criterion ``preference`` by default). Images are written next to the manifest. Ties carry no
  preference: they are dropped and counted in the report.
- ``hpdv2``: HPDv2-style JSON (a list, or JSONL) of ``{"prompt", "file_path" | "image_path": [a, b],
  "human_preference": [1, 0] | [0, 1]}``; entries with more images and a ``rank`` list are expanded into
  pairs like ImageReward's.
- ``imagereward``: ImageReward-style ranked lists ``{"prompt", "generations": [...], "ranking": [...]}``
  (rank 1 = best; equal ranks give no pair), expanded into every ordered pair with different ranks.

Iteration: :class:`EpochSampler` gives a seeded permutation per epoch plus a per-item position swap, and
its state is two integers (epoch, index), so a trainer can resume exactly.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .extras import MissingExtra, require
from .images import image_problem, open_image  # noqa: F401 - open_image: the one way a manifest image opens

log = logging.getLogger(__name__)

FORMATS = ("rapidata", "hpdv2", "imagereward")
CHECK_LEVELS = ("exists", "header", "decode")
ON_BAD_ROW = ("skip", "stop")

# Qwen's control tokens (<|image_pad|>, <|vision_start|>, <|im_end|>, ...): the tokenizer turns them into
# single special ids even inside a prompt's text, where they break the image placeholders or the turn.
SPECIAL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class DataError(ValueError):
    """A bad row or unreadable source; the message names the file and line."""


# ----------------------------------------------------------------------------------------------------
# Examples and records
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Reading and writing the canonical manifest
# ----------------------------------------------------------------------------------------------------

def _check_row(row, base: Path) -> tuple[dict | None, str | None]:
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
                or not all(_is_number(v) and v >= 0 for v in votes)):
            return None, f"votes must be two non-negative numbers, got {votes!r}"
        votes = (votes[0], votes[1])
    rid = row.get("id", "")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return None, f"id must be a string or integer, got {rid!r}"
    return {"prompt": prompt, "image_1": paths[0], "image_2": paths[1], "preferred": preferred,
            "id": str(rid), "votes": votes}, None


def _scan_manifest(path: Path, check_images: str) -> Iterator[tuple[int, PairRecord | None, str | None]]:
    """``(line, record, reason)`` for every non-blank line; ``reason`` is None for a good row, and
    ``record`` is None when the row is not even a pair (bad JSON, missing fields)."""
    if check_images not in CHECK_LEVELS:
        raise ValueError(f"check_images must be one of {CHECK_LEVELS}, got {check_images!r}")
    base = path.resolve().parent
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad row, not a crash
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, None, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                continue
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                yield lineno, None, f"invalid JSON: {err.msg}"
                continue
            fields, reason = _check_row(row, base)
            if fields is None:
                yield lineno, None, reason
                continue
            record = PairRecord(**fields, source=path, line=lineno)
            yield lineno, record, None if check_images == "exists" else _image_problem(record, check_images)


def read_manifest(path: str | os.PathLike, *, skip_bad: bool = False, decode_images: bool = False,
                  check_images: str = "exists") -> tuple[list[PairRecord], DataReport]:
    """Read and check every row of a manifest.

    Checks: UTF-8, valid JSON object, non-empty prompt without special tokens, ``preferred`` in {1, 2},
    both image files exist; with ``check_images="header"`` their headers read as images of a usable
    size (:func:`lgrpo.images.image_problem`), with ``"decode"`` (or ``decode_images``) they decode
    whole. A bad row raises :class:`DataError` (``file:line: reason``) unless ``skip_bad``, in which
    case it is left out and listed in the returned report (and logged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    report = DataReport(str(path))
    records: list[PairRecord] = []
    for lineno, record, reason in _scan_manifest(path, "decode" if decode_images else check_images):
        report.rows += 1
        if reason is not None:
            bad = BadRow(str(path), lineno, reason)
            if not skip_bad:
                raise DataError(str(bad))
            report.bad.append(bad)
            continue
        records.append(record)
    report.kept = len(records)
    if report.bad:
        log.warning("%s (skip_bad=True: these rows are left out)", report)
    return records, report


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _image_problem(record: PairRecord, level: str) -> str | None:
    for key, p in (("image_1", record.image_1), ("image_2", record.image_2)):
        _, problem = image_problem(p, decode=level == "decode")
        if problem is not None:
            return f"{key} unreadable: {p}: {problem}"
    return None


def write_manifest(records: Iterable[PairRecord], path: str | os.PathLike) -> int:
    """Write records as a canonical JSONL manifest (atomically: temp file, then rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record.to_row(base), ensure_ascii=False) + "\n")
                n += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written manifest behind
        raise
    os.replace(tmp, path)
    return n


class ManifestDataset:
    """Indexable pairs from a manifest; ``ds[i]`` decodes the images of row ``i``.

    ``report`` says what was read. Image files are checked from their headers at start-up
    (``check_images``: ``exists``, ``header``, ``decode``). What happens to a bad row depends on
    ``on_bad_row``:

    - ``"stop"`` (default): a bad row found at start-up raises :class:`DataError` naming the file and
      line (with ``skip_bad``, it is left out and listed instead); one that fails to load later raises.
    - ``"skip"`` (training): every non-blank line keeps its index, so ``len`` and every index stay the
      same whatever rows turn out bad (a resumed run keeps its data order). A bad row — found at
      start-up, or failing to load when drawn — is reported once (log, and a JSON line in
      :meth:`log_bad_rows_to`'s file) and ``ds[i]`` returns the next good row after it in file order
      instead. The replacement depends only on the file, never on the rank or the batch: every rank
      still gets a pair for every index it draws, and 2 ranks see what 1 rank sees.
    """

    def __init__(self, path: str | os.PathLike, *, skip_bad: bool = False, decode_images: bool = False,
                 check_images: str = "header", on_bad_row: str = "stop"):
        if on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
        self.path = Path(path)
        self.on_bad_row = on_bad_row
        check = "decode" if decode_images else check_images
        self.bad: dict[int, str] = {}  # index -> reason, for on_bad_row="skip"
        self._log_file: Path | None = None
        self._logged: set[int] = set()
        self._rank = 0
        if on_bad_row == "stop":
            self.records, self.report = read_manifest(path, skip_bad=skip_bad, check_images=check)
        else:
            if not self.path.is_file():
                raise FileNotFoundError(f"manifest not found: {self.path}")
            self.report = DataReport(str(self.path))
            self.records = []
            for lineno, record, reason in _scan_manifest(self.path, check):
                if reason is not None:
                    self.bad[len(self.records)] = reason
                    self.report.bad.append(BadRow(str(self.path), lineno, reason))
                # A bad row keeps its slot: a placeholder when it is not even a pair.
                self.records.append(record or _Unusable(self.path, lineno))
            self.report.rows = len(self.records)
            self.report.kept = len(self.records) - len(self.bad)
            if self.bad:
                log.warning("%s (on_bad_row=skip: each is replaced by the next good row when drawn)",
                            self.report)
        if self.report.kept == 0:
            raise DataError(f"{self.path}: no usable rows ({self.report.summary()})")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PreferenceExample:
        if self.on_bad_row == "stop":
            return self.records[index].load()
        n = len(self.records)
        for k in range(n):
            i = (index + k) % n
            if i in self.bad:
                continue
            try:
                example = self.records[i].load()
            except DataError as err:
                self.bad[i] = str(err).removeprefix(f"{self.records[i].where}: ")
                continue
            for passed in range(k):  # every bad row passed over on the way, reported once
                self._report((index + passed) % n, i)
            return example
        raise DataError(f"{self.path}: every row is bad ({len(self.bad)} rows; see {self._log_file})")

    def mark_bad(self, index: int, reason: str) -> None:
        """A row found unusable by a check outside this module (e.g. too long for the model): with
        ``on_bad_row="stop"`` raise :class:`DataError` naming it, with ``"skip"`` report and replace it."""
        where = self.records[index].where
        if self.on_bad_row == "stop":
            raise DataError(f"{where}: {reason}")
        if index in self.bad:
            return
        self.bad[index] = reason
        self.report.bad.append(BadRow(str(self.path), self.records[index].line, reason))
        self.report.kept -= 1
        if self.report.kept == 0:
            raise DataError(f"{self.path}: no usable rows ({self.report.summary()})")
        self._report(index, None)

    def log_bad_rows_to(self, path: str | os.PathLike, *, rank: int = 0, write_known: bool = True) -> None:
        """Append each bad row, once, as a JSON line to ``path`` (e.g. a run's ``bad_rows.jsonl``).

        Rows already found (at start-up) are written now when ``write_known`` (give it to one rank only);
        rows listed in the file by an earlier run are not written again.
        """
        self._log_file, self._rank = Path(path), rank
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        if self._log_file.is_file():
            where = {r.where: i for i, r in enumerate(self.records)}
            for line in self._log_file.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self._logged.add(where[f"{row['file']}:{row['line']}"])
                except (ValueError, KeyError, TypeError):
                    continue
        if not write_known:
            self._logged.update(self.bad)
        for i in sorted(self.bad):
            self._report(i, None)

    def _report(self, index: int, replaced_by: int | None) -> None:
        """Log a bad row (once) and, if the log file is set, append it there."""
        if index not in self.bad or index in self._logged:
            return
        self._logged.add(index)
        record, reason = self.records[index], self.bad[index]
        by = self.records[replaced_by].where if replaced_by is not None else None
        log.warning("bad row %s: %s%s", record.where, reason, f"; replaced by {by}" if by else "")
        if self._log_file is not None:
            row = {"file": str(record.source), "line": record.line, "reason": reason, "replaced_by": by,
                   "rank": self._rank, "time": round(time.time(), 3)}
            with open(self._log_file, "a", encoding="utf-8") as f:  # one short append per row: atomic
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class _Unusable(_Located):
    """The slot of a manifest line that is not a pair at all (bad JSON, missing fields)."""

    source: Path
    line: int

    def load(self) -> PreferenceExample:
        raise DataError(f"{self.where}: not a usable row")


# ----------------------------------------------------------------------------------------------------
# Iteration order
# ----------------------------------------------------------------------------------------------------

class EpochSampler:
    """Deterministic, resumable order over ``n`` items: a seeded permutation per epoch.

    Each draw is ``(index, swap)``: ``swap`` says whether to present the pair in the other order
    (``example.swapped()``), drawn per item and epoch with probability 1/2 when ``swap_positions`` is on,
    so the policy cannot learn a position bias. The whole state is ``(epoch, position)``; the order for an
    epoch depends only on ``(seed, epoch)``.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, swap_positions: bool = False):
        if n <= 0:
            raise ValueError(f"EpochSampler needs n > 0 items, got {n}")
        self.n, self.seed, self.shuffle, self.swap_positions = n, seed, shuffle, swap_positions
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            swap = rng.random(self.n) < 0.5 if self.swap_positions else np.zeros(self.n, dtype=bool)
            self._cache = (epoch, perm, swap)
        return self._cache[1], self._cache[2]

    def take(self, k: int) -> list[tuple[int, bool]]:
        """The next ``k`` draws, crossing epoch boundaries as needed."""
        out = []
        while len(out) < k:
            perm, swap = self._order(self.epoch)
            stop = min(self.n, self.position + k - len(out))
            out += [(int(perm[i]), bool(swap[i])) for i in range(self.position, stop)]
            self.position = stop
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n or state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state is for n={state.get('n')}, seed={state.get('seed')}; "
                             f"this sampler has n={self.n}, seed={self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def take_examples(dataset, sampler: EpochSampler, k: int) -> list[PreferenceExample]:
    """The next ``k`` examples in the sampler's order, with position swaps applied."""
    return [dataset[i].swapped() if swap else dataset[i] for i, swap in sampler.take(k)]


# ----------------------------------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------------------------------

def convert(fmt: str, src: str | os.PathLike, dst: str | os.PathLike, *,
            image_root: str | os.PathLike | None = None, criterion: str = "preference",
            skip_bad: bool = False, limit: int | None = None) -> DataReport:
    """Convert ``src`` in layout ``fmt`` (one of :data:`FORMATS`) to the canonical manifest ``dst``.

    ``image_root``: folder that relative image paths in JSON sources are under (default: the JSON file's
    folder). Parquet images are written to ``<dst stem>_images/`` next to ``dst``. Every output row is
    checked like :func:`read_manifest` would; bad source rows raise (default) or are listed
    (``skip_bad``). ``limit`` stops after that many pairs written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    report = DataReport(str(src))
    if fmt == "rapidata":
        items = _rapidata_pairs(src, dst.parent / f"{dst.stem}_images", criterion, report)
    else:
        root = Path(image_root) if image_root is not None else (src if src.is_dir() else src.parent)
        items = _json_pairs(src, root, report, fmt)

    def records() -> Iterator[PairRecord]:
        for item in items:
            if limit is not None and report.kept >= limit:
                return
            if isinstance(item, BadRow):
                if not skip_bad:
                    raise DataError(str(item))
                report.bad.append(item)
                continue
            row = {"prompt": item.prompt, "image_1": str(item.image_1), "image_2": str(item.image_2),
                   "preferred": item.preferred, "id": item.id,
                   "votes": None if item.votes is None else list(item.votes)}
            fields, reason = _check_row({k: v for k, v in row.items() if v is not None}, Path("/"))
            if reason is not None:
                bad = BadRow(str(item.source), item.line, reason)
                if not skip_bad:
                    raise DataError(str(bad))
                report.bad.append(bad)
                continue
            report.kept += 1
            yield PairRecord(**fields, source=dst, line=report.kept)

    write_manifest(records(), dst)
    if report.bad:
        log.warning("%s", report)
    return report


# -- Parquet (Rapidata) ------------------------------------------------------------------------------

def _parquet_files(src: Path) -> list[Path]:
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files:
        raise DataError(f"{src}: no .parquet files")
    return files


def _vote_columns(names: Sequence[str], criterion: str) -> tuple[str, str]:
    for a, b in (("votes_image1", "votes_image2"),
                 (f"weighted_results_image1_{criterion}", f"weighted_results_image2_{criterion}")):
        if a in names and b in names:
            return a, b
    raise DataError(f"no vote columns: expected votes_image1/votes_image2 or "
                    f"weighted_results_image1_{criterion}/weighted_results_image2_{criterion}; "
                    f"the file has {list(names)}")


def _image_bytes(value) -> tuple[bytes | None, str | None]:
    """Bytes and original name from a Parquet image cell: HF ``{"bytes", "path"}`` struct or raw bytes."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    return None, None


def _rapidata_pairs(src: Path, image_dir: Path, criterion: str,
                    report: DataReport) -> Iterator[PairRecord | BadRow]:
    require("data", "reading Parquet")  # an optional dependency: only this converter needs it
    import pyarrow.parquet as pq
    image_dir.mkdir(parents=True, exist_ok=True)
    for file in _parquet_files(src):
        pf = pq.ParquetFile(file)
        names = pf.schema_arrow.names
        missing = [c for c in ("prompt", "image1", "image2") if c not in names]
        if missing:
            raise DataError(f"{file}: missing columns {missing}; the file has {names}")
        v1, v2 = _vote_columns(names, criterion)
        row_index = 0
        # Batches keep memory at a few rows of images, whatever the file size.
        for batch in pf.iter_batches(batch_size=64, columns=["prompt", "image1", "image2", v1, v2]):
            for row in batch.to_pylist():
                row_index += 1
                report.rows += 1
                yield from _rapidata_row(row, v1, v2, (str(file), row_index), image_dir, report,
                                         f"{file.stem}-{row_index:07d}")


def _rapidata_row(row, v1, v2, where, image_dir, report, rid) -> Iterator[PairRecord | BadRow]:
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        yield BadRow(*where, "empty or missing prompt")
        return
    votes = (row[v1], row[v2])
    if not all(_is_number(v) for v in votes):
        yield BadRow(*where, f"votes not numbers: {v1}={row[v1]!r}, {v2}={row[v2]!r}")
        return
    if votes[0] == votes[1]:
        report.dropped["tie"] = report.dropped.get("tie", 0) + 1
        return
    paths = []
    for key, slot in (("image1", 1), ("image2", 2)):
        data, name = _image_bytes(row[key])
        if not data:
            yield BadRow(*where, f"{key} has no image bytes")
            return
        try:
            with Image.open(io.BytesIO(data)) as img:  # header only: the format gives the file extension
                ext = {"JPEG": "jpg"}.get(img.format, (img.format or "").lower())
        except OSError as err:
            yield BadRow(*where, f"{key} bytes are not an image ({name or 'no name'}): {err}")
            return
        out = image_dir / f"{rid}_{slot}.{ext or 'bin'}"
        out.write_bytes(data)
        paths.append(out.resolve())
    yield PairRecord(prompt=row["prompt"], image_1=paths[0], image_2=paths[1],
                     preferred=1 if votes[0] > votes[1] else 2, id=rid, votes=(float(votes[0]), float(votes[1])),
                     source=Path(where[0]), line=where[1])


# -- JSON (HPDv2, ImageReward) -----------------------------------------------------------------------

def json_entries(src: Path) -> Iterator[tuple[int, object]]:
    """(1-based entry number, entry) from a JSON list or a JSONL file. For JSONL the number is the line."""
    with open(src, encoding="utf-8") as f:
        head = f.read(1 << 12).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(src.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{src}:{err.lineno}: invalid JSON: {err.msg}") from err
        yield from enumerate(data, start=1)
        return
    with open(src, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if text.strip():
                try:
                    yield lineno, json.loads(text)
                except json.JSONDecodeError as err:
                    yield lineno, DataError(f"invalid JSON: {err.msg}")


def _first(entry: dict, keys: Sequence[str]):
    for key in keys:
        if key in entry:
            return entry[key]
    return None


def _json_pairs(src: Path, root: Path, report: DataReport, fmt: str) -> Iterator[PairRecord | BadRow]:
    if src.is_dir():
        raise DataError(f"{src}: the {fmt} converter reads one JSON/JSONL file, got a folder")
    image_keys = ("file_path", "image_path", "images", "generations") if fmt == "hpdv2" else \
        ("generations", "image_path", "images", "file_path")
    for number, entry in json_entries(src):
        report.rows += 1
        where = (str(src), number)
        if isinstance(entry, DataError):
            yield BadRow(*where, str(entry))
            continue
        if not isinstance(entry, dict):
            yield BadRow(*where, f"entry must be an object, got {type(entry).__name__}")
            continue
        images = _first(entry, image_keys)
        paths_ok = isinstance(images, list) and len(images) >= 2
        if not (paths_ok and all(p and isinstance(p, str) for p in images)):
            yield BadRow(*where, f"needs a list of at least two image paths under one of {list(image_keys)}")
            continue
        paths = [Path(p) if os.path.isabs(p) else (root / p).resolve() for p in images]
        prompt = entry.get("prompt", entry.get("caption"))
        prompt = prompt if isinstance(prompt, str) else ""
        rid = str(entry.get("id", entry.get("ranking_id", number)))
        preference = entry.get("human_preference")
        if fmt == "hpdv2" and preference is not None and len(images) == 2:
            preferred = _pair_preference(preference)
            if preferred is None:
                yield BadRow(*where, "human_preference must mark one of two images, e.g. [1, 0]; "
                                     f"got {preference!r}")
                continue
            yield PairRecord(prompt, paths[0], paths[1], preferred, rid, None, Path(where[0]), where[1])
            continue
        ranks = _first(entry, ("ranking", "rank"))
        if not isinstance(ranks, list) or len(ranks) != len(images) or not all(_is_number(r) for r in ranks):
            yield BadRow(*where, "needs human_preference (two images) or a ranking/rank list of "
                                 f"{len(images)} numbers; got {ranks!r}")
            continue
        yield from _ranked_pairs(prompt, paths, ranks, rid, where, report)


def _pair_preference(value) -> int | None:
    """HPDv2 marks the preferred image of a pair with 1: ``[1, 0]`` -> 1, ``[0, 1]`` -> 2."""
    if isinstance(value, list) and len(value) == 2 and sorted(value) == [0, 1]:
        return 1 if value[0] == 1 else 2
    return None


def _ranked_pairs(prompt, paths, ranks, rid, where, report) -> Iterator[PairRecord]:
    """Every pair (i < j) with different ranks, the lower rank number preferred; ties dropped and counted."""
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            if ranks[i] == ranks[j]:
                report.dropped["tie"] = report.dropped.get("tie", 0) + 1
                continue
            preferred = 1 if ranks[i] < ranks[j] else 2
            yield PairRecord(prompt, paths[i], paths[j], preferred, f"{rid}:{i}-{j}", None, Path(where[0]), where[1])


# ----------------------------------------------------------------------------------------------------
# Validation and CLI
# ----------------------------------------------------------------------------------------------------

def validate(path: str | os.PathLike) -> DataReport:
    """Check every row of a manifest, decoding both images; returns the report listing every bad row."""
    _, report = read_manifest(path, skip_bad=True, decode_images=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lgrpo.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a public layout to the canonical JSONL manifest")
    conv.add_argument("--from", dest="fmt", required=True, choices=FORMATS)
    conv.add_argument("src", help="source file (Parquet: a file or a folder of *.parquet)")
    conv.add_argument("dst", help="manifest to write (.jsonl); Parquet images go to <dst stem>_images/")
    conv.add_argument("--image-root", default=None, help="folder relative image paths in JSON are under "
                                                         "(default: the JSON file's folder)")
    conv.add_argument("--criterion", default="preference",
                      help="Rapidata weighted_results_* criterion (default: preference)")
    conv.add_argument("--skip-bad", action="store_true", help="skip and list bad rows instead of stopping")
    conv.add_argument("--limit", type=int, default=None, help="stop after this many pairs")
    val = sub.add_parser("validate", help="check every row of a manifest (images decoded)")
    val.add_argument("manifest")
    args = parser.parse_args(argv)

    if args.command == "convert":
        try:
            report = convert(args.fmt, args.src, args.dst, image_root=args.image_root,
                             criterion=args.criterion, skip_bad=args.skip_bad, limit=args.limit)
        except (DataError, FileNotFoundError, MissingExtra) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(report)
        return 0

    try:
        report = validate(args.manifest)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for bad in report.bad:
        print(bad)
    print(report.summary(), file=sys.stderr)
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
