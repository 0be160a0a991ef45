"""Held-out evaluation: accuracy, contradiction rate, agree/disagree accuracy, position bias.

``python -m lgrpo.eval --model PATH --data MANIFEST [--listener PATH]`` prints a table and writes a
JSON report. The trainer calls :func:`evaluate` before and after training on the same footing.

Each pair is judged twice with greedy decoding: as presented, and with the two images swapped (the
label follows). A judge without position bias has the same accuracy both ways and picks the same
*image* (answer 1 one way, 2 the other way) — ``consistency`` is how often it does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from . import distributed as D
from .config import RolloutConfig
from .report import format_report, summarize, write_report
from .rollout import rollout_for


@torch.no_grad()
def judge(
    policy,
    task,
    split: str,
    indices: list[int],
    *,
    swap: bool,
    max_new_tokens: int,
    stop: str | None,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    fsdp_root: torch.nn.Module | None = None,
    engine: str = "engine",
    reduce_max=None,
) -> dict:
    """Greedy completions for ``indices`` (images swapped or not) and the task's per-row judgements.

    Under FSDP ``fsdp_root`` (the module ``fully_shard`` was applied to last, e.g. the trainer's
    scorer) is gathered around each ``generate`` (lgrpo/distributed.py, "gathered for the phase").
    ``engine``: "engine", "hf" or "vllm", as ``--rollout.engine`` (:func:`lgrpo.rollout.rollout_for`; with the
    engine ``reduce_max`` keeps ranks' decode loops equally long); the same tokens either way.
    """
    keys = ("accuracy", "format", "contradiction", "answer", "listener")  # the Rewards fields a report reads
    out: dict[str, list] = {k: [] for k in keys}
    texts = []
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    rollout_cfg = RolloutConfig(engine=engine, max_new_tokens=max_new_tokens, stop=stop or "")
    for lo in range(0, len(indices), batch_size):
        part = indices[lo : lo + batch_size]
        prompts = task.prompts(split, part, [swap] * len(part)).to(device)
        with ctx, D.gathered(fsdp_root if fsdp_root is not None else policy):
            rollouts = rollout_for(rollout_cfg, policy, task.tokenizer)
            rollout = rollouts.generate(prompts, 1, greedy=True, reduce_max=reduce_max)
        r = task.rewards(rollout)
        for k in keys:
            v = getattr(r, k)
            out[k].append(v.double().cpu() if v is not None else torch.full((len(part),), float("nan")))
        texts += rollout.texts
    res = {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}
    res["texts"] = texts
    return res


def evaluate(
    policy,
    task,
    *,
    split: str = "eval",
    limit: int | None = None,
    max_new_tokens: int = 512,
    stop: str | None = "</answer>",
    batch_size: int = 16,
    swap_check: bool = True,
    dist: D.Dist | None = None,
    autocast_dtype: torch.dtype | None = None,
    fsdp_root: torch.nn.Module | None = None,
    engine: str = "engine",
) -> dict:
    """Evaluate ``policy`` on a task split; every rank gets the whole report (rank 0 writes it).

    Collective under torchrun: the pairs are split into equal contiguous shares of ``ceil(n / world)``,
    the last shares padded with repeats of a pair, so every rank runs the same batches (and the same
    listener calls); the repeats are dropped and the shares gathered in order, so the report is the
    one a single process would write.
    """
    dist = dist or D.Dist()
    if engine not in ("engine", "hf", "vllm"):
        raise ValueError(f"engine must be 'engine', 'hf' or 'vllm' (the rollout engine, as --rollout.engine), "
                         f"got {engine!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = task.num_prompts(split)
    n = n if limit is None else min(n, limit)
    if n < 1:
        raise ValueError(f"nothing to evaluate: the {split!r} split holds {task.num_prompts(split)} pairs "
                         f"and limit is {limit}")
    share = -(-n // dist.world_size)
    mine = list(range(min(dist.rank * share, n), min((dist.rank + 1) * share, n)))
    padded = mine + [mine[-1] if mine else 0] * (share - len(mine))
    kw = dict(
        max_new_tokens=max_new_tokens,
        stop=stop,
        batch_size=batch_size,
        device=dist.device,
        autocast_dtype=autocast_dtype,
        fsdp_root=fsdp_root,
        engine=engine,
        reduce_max=D.all_reduce_max if dist.world_size > 1 else None,
    )
    passes = [False, True] if swap_check else [False]
    results = [_first_rows(judge(policy, task, split, padded, swap=s, **kw), len(mine)) for s in passes]
    shares = D.all_gather_objects(results)  # rank order = pair order
    merged = [_concat([rank_results[i] for rank_results in shares]) for i in range(len(passes))]
    plain_all, swapped_all = merged[0], (merged[1] if swap_check else None)
    report = summarize(plain_all, swapped_all)
    report["examples"] = [{"index": i, "completion": t} for i, t in enumerate(plain_all["texts"][:8])]
    return report


def _first_rows(res: dict, k: int) -> dict:
    return {key: v[:k] for key, v in res.items()}


def _concat(parts: list[dict]) -> dict:
    out = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key != "texts"}
    out["texts"] = [t for p in parts for t in p["texts"]]
    return out


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
