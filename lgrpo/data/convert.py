"""Converters from public layouts (Rapidata Parquet, HPDv2 and ImageReward JSON) to the canonical manifest.

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

Every output row passes :func:`lgrpo.data.schema.check_row`, as a manifest row read for training would.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from ..extras import require
from .manifest import write_manifest
from .schema import BadRow, DataError, DataReport, PairRecord, check_row, is_number

log = logging.getLogger(__name__)

FORMATS = ("rapidata", "hpdv2", "imagereward")


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
            fields, reason = check_row({k: v for k, v in row.items() if v is not None}, Path("/"))
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
    if not all(is_number(v) for v in votes):
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
        if not isinstance(ranks, list) or len(ranks) != len(images) or not all(is_number(r) for r in ranks):
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
