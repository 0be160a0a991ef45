"""``python -m lgrpo.judge``: judge rows of a JSONL file, and ``eval-rank``: the ranking evaluation.

Both are described in :mod:`lgrpo.judge` (input and output rows, bad rows, exit status, the report).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..batching import ProcessedImage, VLBatcher
from .ranking import METHODS, kendall_tau, pairwise_accuracy, spearman_rho
from .verdicts import Judge

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
    from ..data import DataError, json_entries  # the one reader of a JSON list or JSONL file

    try:
        entries = list(json_entries(path))
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
    from ..data import SPECIAL_TOKEN_RE

    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError(f"row {number}: needs a non-empty \"prompt\" string")
    token = SPECIAL_TOKEN_RE.search(prompt)
    if token is not None:  # the rule training's manifests follow (lgrpo.data): a data bug, said per row
        raise RowError(f"row {number}: the prompt holds the control token {token.group()}; prompts must be "
                       "plain text (training refuses such rows too)")
    key = next((k for k in image_keys if k in entry), None)
    images = entry.get(key) if key else None
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise RowError(f"row {number}: needs a list of image paths under {' or '.join(map(repr, image_keys))}")
    if len(images) < 2:
        raise RowError(f"row {number}: needs at least 2 images, got {len(images)}")
    return _Row(number, prompt, [_resolve(p, root) for p in images], entry)


def _load_images(row: _Row, batcher: VLBatcher) -> None:
    from ..data import open_image

    pils = []
    for k, path in enumerate(row.paths):
        problem = _path_problem(path)
        if problem is not None:
            raise RowError(f"row {row.line}: image {k} {problem}: {path}")
        try:
            pils.append(open_image(path))
        except OSError as err:
            raise RowError(f"row {row.line}: image {k} unreadable: {path}: {err}") from err
    try:
        row.images = batcher.process_images(pils)
    except ValueError as err:  # e.g. an extreme aspect ratio the image processor refuses
        raise RowError(f"row {row.line}: the image processor refused an image: {err}") from err


def _path_problem(path: Path) -> str | None:
    """What is wrong with an image path, in words that say what to fix, or None when it is a file."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop"
        if err.errno == errno.ENOENT:
            return "is a broken symlink" if path.is_symlink() else "not found"
        return f"unreadable ({err.strerror})"
    if path.is_dir():
        return "is a directory, not an image file"
    if not path.is_file():
        return "is not a regular file"
    return None


def _length_problem(judge: Judge, row: _Row) -> str | None:
    """Training's length check (lgrpo.preflight.check_task) for this row: its prompt with the two largest
    of its images, plus the reasoning and the listener's margin, within the model's positions."""
    from ..preflight import LISTENER_MARGIN, max_positions
    from ..prompts import render_reasoner_prompt

    limit = max_positions(judge.model)
    if limit is None:
        return None
    b = judge.batcher
    text = len(b.text_ids(render_reasoner_prompt(b.tokenizer, row.prompt, b.fmt))) - 2  # 2 placeholders
    tokens = text + sum(sorted(img.num_tokens(b.merge_size) for img in row.images)[-2:])
    if tokens + judge.max_new_tokens + LISTENER_MARGIN <= limit:
        return None
    return (f"row {row.line}: the prompt is {tokens} tokens with its images; with --max-new-tokens "
            f"{judge.max_new_tokens} and the listener's {LISTENER_MARGIN} that is over the model's {limit} "
            "positions")


def _contained(rows: list[tuple[int, _Row]], run, results: list[dict]) -> None:
    """``run(rows)`` for the whole batch; when it fails, each row alone, so a failure costs only its rows
    (an out-of-memory batch, a row the model cannot take): those get an ``error``, the others a verdict."""
    try:
        outputs = run(rows)
    except Exception:  # noqa: BLE001 - any failure: retry the rows one by one to find whose it is
        outputs = []
        for one in rows:
            try:
                outputs += run([one])
            except Exception as err:  # noqa: BLE001
                results[one[0]]["error"] = f"row {one[1].line}: judging failed: {type(err).__name__}: {err}"
                outputs.append(None)
    for (slot, _), out in zip(rows, outputs):
        if out is not None:
            results[slot].update(out.to_json())


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
                if isinstance(entry, dict) and "id" in entry:  # error rows keep their id too
                    results[slot]["id"] = entry["id"]
                try:
                    if isinstance(entry, RowError):
                        raise entry
                    row = _parse_row(number, entry, root, ("images",))
                    _load_images(row, judge.batcher)
                    too_long = _length_problem(judge, row)
                    if too_long is not None:
                        raise RowError(too_long)
                except RowError as err:
                    results[slot]["error"] = str(err)
                    continue
                (pairs if len(row.images) == 2 else lists).append((slot, row))
            if pairs:
                _contained(pairs, lambda rows: judge._compare_processed(
                    [r.prompt for _, r in rows], [r.images[0] for _, r in rows], [r.images[1] for _, r in rows],
                    both_orders), results)
            if lists:
                _contained(lists, lambda rows: judge.rank_many(
                    [r.prompt for _, r in rows], [r.images for _, r in rows], method=method,
                    both_orders=both_orders, probes=probes), results)
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

