"""``python -m lgrpo.data``: ``convert --from FORMAT SRC DST`` and ``validate MANIFEST``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..extras import MissingExtra
from .convert import FORMATS, convert
from .manifest import validate
from .schema import DataError

DESCRIPTION = "Image-preference pairs: the canonical manifest, converters from public layouts, and iteration order."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lgrpo.data", description=DESCRIPTION)
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
