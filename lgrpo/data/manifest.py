"""The canonical manifest: reading and checking it (every bad row named by file and line), writing it
atomically, and :class:`ManifestDataset`, the indexable pairs training and evaluation draw from."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..images import image_problem
from .schema import BadRow, DataError, DataReport, PairRecord, PreferenceExample, _Located, check_row

log = logging.getLogger(__name__)

CHECK_LEVELS = ("exists", "header", "decode")
ON_BAD_ROW = ("skip", "stop")


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
            fields, reason = check_row(row, base)
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


def validate(path: str | os.PathLike) -> DataReport:
    """Check every row of a manifest, decoding both images; returns the report listing every bad row."""
    _, report = read_manifest(path, skip_bad=True, decode_images=True)
    return report
