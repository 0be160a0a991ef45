"""Held-out evaluation: accuracy, contradiction rate, agree/disagree accuracy, position bias.

``python -m lgrpo.eval --model PATH --data MANIFEST [--listener PATH]`` prints a table and writes a
JSON report. The trainer runs the same :func:`lgrpo.heldout.evaluate` before and after training.

Each pair is judged twice with greedy decoding: as presented, and with the two images swapped (the
label follows). A judge without position bias has the same accuracy both ways and picks the same
*image* (answer 1 one way, 2 the other way) — ``consistency`` is how often it does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from . import distributed as D
from .heldout import evaluate
from .report import format_report, write_report

# --- the command line -----------------------------------------------------------------------------------


def _checked_out_path(parser: argparse.ArgumentParser, args) -> Path:
    """Check the counts and that the report can be written; ``parser.error`` (exit 2) names the option."""
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    out = Path(args.out) if args.out else (
        Path(args.model) / "eval_report.json" if Path(args.model).is_dir() else Path("eval_report.json"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".write-test-"):
            pass
    except OSError as err:
        parser.error(f"--out {out}: cannot write the report there ({err})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lgrpo.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="policy folder (an exported run's final/), or 'tiny'")
    p.add_argument("--data", required=True, help="manifest (JSONL) of held-out pairs, or 'synthetic'")
    p.add_argument("--listener", default=None, help="listener folder (default: none: no listener statistics)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many pairs")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-swap", action="store_true", help="skip the images-swapped pass")
    p.add_argument("--engine", default="engine", choices=("engine", "hf", "vllm"),
                   help="rollout engine of the greedy completions (as --rollout.engine)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: bf16 on GPU")
    p.add_argument("--out", default=None, help="JSON report path (default: eval_report.json beside --model)")
    args = p.parse_args(argv)
    out = _checked_out_path(p, args)  # before any model loads: a bad argument fails in a second

    from .task import build_eval_task  # the model/data pipeline

    dist = D.init()
    policy, task = build_eval_task(args.model, args.data, args.listener, dtype=args.dtype, device=dist.device)
    report = evaluate(
        policy,
        task,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        swap_check=not args.no_swap,
        dist=dist,
        engine=args.engine,
    )
    if dist.is_main:
        print(format_report(report, f"evaluation of {args.model} on {args.data}"))
        print(f"report: {write_report(report, out)}")
    D.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
