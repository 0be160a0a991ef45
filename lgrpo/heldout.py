"""Held-out judgements: greedy completions of each pair as presented and with its images swapped, the
task's per-row judgements, and the report over them (:mod:`lgrpo.report`). Used by the trainer's before /
after evaluations (:mod:`lgrpo.run`) and by ``python -m lgrpo.eval``; it imports neither.

Collective under torchrun: every rank runs the same batches (see :func:`evaluate`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from . import distributed as D
from .config import RolloutConfig
from .report import summarize
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
