"""``python -m lgrpo.experiments.listener --out DIR``: does the listener reward do what the paper says?

The paper's claim (SPEC §1): GRPO with an accuracy reward leaves the reasoner's explanations contradicting
its answers; shaping the reward with a frozen listener's confidence lowers that contradiction rate and
improves out-of-distribution accuracy. This reproduces the comparison at small scale, on the tiny model
and the shortcut task (:mod:`lgrpo.experiments.shortcut`: reasoning that carries evidence, a spurious
frame that predicts the label on the training configurations only).

Arms, with the same seeds and the same budget (one warm-up per seed, shared by the GRPO arms):

- ``warmup``: the warmed-up policy, no GRPO;
- ``accuracy``: GRPO with ``R = r_fmt + 0.5 r_acc`` (the naive reasoner; the listener is still run, with
  weight 0, to measure contradictions);
- ``listener``: GRPO with the paper's reward ``R = r_fmt + 0.5 r_acc + 0.5 r_list``.

The listener is one frozen model for the whole experiment, warmed up on consistent reasoning only (split
``"listener"``). Not the paper's choice (the policy after its warm-up): here the warmed-up policy has
learned the shortcut itself, so reading a reasoning that says nothing it answers the framed image all
the same, and rewards the shortcut as much as the evidence (arm ``paper-listener`` runs that choice).

Outputs in ``--out``: ``results.json`` (per arm and seed: held-out and OOD accuracy, contradiction rate,
listener confidence in the truth, format rate, share of explained reasoning; the curves over GRPO steps;
the listener's own check), ``results.md`` (means ± standard errors), ``curves.png`` and ``training.png``.
``--jobs N`` runs the seeds side by side, one process each (``OUT/seed-S``), and merges them into ``OUT``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .. import distributed as D
from ..config import build_config
from ..extras import MissingExtra, require
from ..heldout import judge
from ..listener import Listener
from ..model import freeze
from ..prompts import parse_completion
from ..report import summarize
from ..rewards import RewardWeights
from ..synthetic import evidence_reasoning, restate_prompt
from ..task import build
from ..trainer import Trainer
from .shortcut import ShortcutPreferenceTask, ShortcutTask, describes_both_images

ARMS: dict[str, RewardWeights | None] = {
    "warmup": None,
    "accuracy": RewardWeights(fmt=1.0, acc=0.5, listener=0.0),
    "listener": RewardWeights(fmt=1.0, acc=0.5, listener=0.5),
    # The paper's listener: the policy's own weights after the warm-up, frozen. Not run by default.
    "paper-listener": RewardWeights(fmt=1.0, acc=0.5, listener=0.5),
}
DEFAULT_ARMS = ("warmup", "accuracy", "listener")
EVAL_SPLITS = ("heldout", "ood")
METRICS = ("accuracy", "contradiction_rate", "listener_confidence", "format_rate", "explained_share")
TRAIN_METRICS = {"reward": "reward", "accuracy": "accuracy", "listener": "reward/listener",
                 "contradiction": "contradiction", "format": "reward/format", "explained": "reward/explained"}


@dataclass
class ExperimentConfig:
    """The experiment's knobs; ``--quick`` replaces them with :data:`QUICK`."""

    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = DEFAULT_ARMS
    data_seed: int = 0
    """Seed of the task's configuration split and pairs: the same data for every training seed."""
    explained_share: float = 0.75
    """Share of the policy's warm-up demonstrations whose think block describes both images."""
    warmup_steps: int = 2000
    listener_steps: int = 800
    listener_seed: int = 1000
    grpo_steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 3e-4
    beta: float = 0.04
    max_new_tokens: int = 48
    train_size: int = 512
    eval_size: int = 48
    eval_every: int = 5
    eval_batch_size: int = 64

    def __post_init__(self):
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arm(s) {sorted(unknown)}; known: {list(ARMS)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for name in ("warmup_steps", "listener_steps", "grpo_steps", "eval_size", "eval_every", "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# Small enough for the test suite: every stage runs (listener and policy warm-ups, both GRPO arms, an
# evaluation after every step, the outputs), but the warm-ups are too short to teach even the format, so
# the numbers say nothing about the method; the test checks that every file is written and in range.
QUICK = dict(seeds=(0,), warmup_steps=12, listener_steps=6, grpo_steps=2, prompts_per_step=2,
             group_size=4, train_size=32, eval_size=4, eval_every=1, eval_batch_size=8, max_new_tokens=32)


# --- building the pieces ------------------------------------------------------------------------------


def job_config(ec: ExperimentConfig, seed: int, *, sft_steps: int, beta: float):
    """The trainer's configuration for one seed: the tiny preset with the experiment's sizes."""
    return build_config("tiny", {
        "data": {"eval": "none", "synthetic_train_size": ec.train_size},
        "rollout": {"group_size": ec.group_size, "max_new_tokens": ec.max_new_tokens},
        # build() loads no listener: the experiment attaches its own, shared by every seed and arm.
        "reward": {"w_listener": 0.0},
        "loss": {"beta": beta},
        "optim": {"lr": ec.lr},
        "sft": {"steps": sft_steps},
        "train": {"steps": ec.grpo_steps, "prompts_per_step": ec.prompts_per_step, "seed": seed},
        "checkpoint": {"interval": 0, "keep": 1, "export": False, "resume": "none"},
        "run": {"progress": False, "tensorboard": "off", "log_every": ec.eval_every},
    })


def train_listener(ec: ExperimentConfig, data: ShortcutTask, dist: D.Dist, folder: Path) -> Listener:
    """A fresh tiny model warmed up on consistent reasoning (split ``"listener"``), then frozen."""
    cfg = job_config(ec, ec.listener_seed, sft_steps=ec.listener_steps, beta=0.0)
    base, models, _ = build(cfg, dist)
    task = ShortcutPreferenceTask(base.batcher, {"train": data.dataset("listener", ec.train_size)})
    Trainer(cfg, dist, task, models, folder).warmup()
    return Listener(freeze(models.policy), base.batcher, micro_batch_size=cfg.reward.listener_batch_size)


@torch.no_grad()
def listener_check(listener: Listener, data: ShortcutTask, n: int) -> dict:
    """What the listener does with reasoning it never trained on (held-out configurations).

    - ``follows_evidence``: picks the image the descriptions say matches, over descriptions as the images
      are and swapped (so the images cannot be what it follows);
    - ``confidence_no_evidence``: its mean probability of the truth when the reasoning only restates the
      prompt (the memorised kind); 0.5 means it cannot tell, which is what the listener arm relies on.
    """
    examples = [data.example("heldout", i) for i in range(n)]
    prompts = [ex.prompt for ex in examples]
    images = [ex.images for ex in examples]
    right = [evidence_reasoning(ex) for ex in examples]
    wrong = [evidence_reasoning(replace(ex, captions=ex.captions[::-1])) for ex in examples]
    truth = torch.tensor([ex.preferred for ex in examples])
    said_right = listener.score(prompts, images, right).choice()
    said_wrong = listener.score(prompts, images, wrong).choice()
    lazy = listener.score(prompts, images, [restate_prompt(p) for p in prompts]).probs
    follows = torch.cat([said_right == truth, said_wrong == 3 - truth]).float().mean()
    return {
        "n": n,
        "follows_evidence": float(follows),
        "confidence_no_evidence": float(lazy.gather(1, (truth - 1)[:, None]).mean()),
        "picks_image_1_no_evidence": float((lazy[:, 0] > 0.5).float().mean()),
    }


# --- measuring ------------------------------------------------------------------------------------------


def measure(policy, task: ShortcutPreferenceTask, ec: ExperimentConfig, dist: D.Dist) -> dict:
    """Greedy completions on the held-out and OOD pairs: the table's metrics for each split."""
    out = {}
    for split in EVAL_SPLITS:
        rows = judge(policy, task, split, list(range(ec.eval_size)), swap=False, max_new_tokens=ec.max_new_tokens,
                     stop="</answer>", batch_size=ec.eval_batch_size, device=dist.device)
        report = summarize(rows, None)
        explained = torch.tensor([describes_both_images(parse_completion(t, task.batcher.fmt).reasoning)
                                  for t in rows["texts"]])
        report["explained_share"] = float(explained.float().mean())
        out[split] = {k: _clean(report[k]) for k in METRICS}
        # Where the accuracy comes from: completions that describe both images, and the others.
        for name, rows_of in (("explained", explained), ("not_explained", ~explained)):
            acc = rows["accuracy"][rows_of]
            out[split][f"accuracy_{name}"] = float(acc.mean()) if acc.numel() else None
    return out


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


# --- one seed ----------------------------------------------------------------------------------------------


def run_seed(seed: int, ec: ExperimentConfig, data: ShortcutTask, listener: Listener, dist: D.Dist,
             folder: Path, log=print) -> dict:
    """The warm-up of this seed, then each GRPO arm from the same warmed-up weights."""
    cfg = job_config(ec, seed, sft_steps=ec.warmup_steps, beta=ec.beta)
    base, models, _ = build(cfg, dist)
    splits = {"train": data.dataset("demos", ec.train_size),
              **{s: data.dataset(s, ec.eval_size) for s in EVAL_SPLITS}}
    task = ShortcutPreferenceTask(base.batcher, splits, listener)
    t0 = time.perf_counter()
    losses = Trainer(cfg, dist, task, models, folder / "warmup").warmup()
    warm = {k: v.detach().clone() for k, v in models.policy.state_dict().items()}
    start = measure(models.policy, task, ec, dist)
    # The paper's listener would be this policy, frozen: does it read the evidence, or the frame?
    own = Listener(freeze(copy.deepcopy(models.policy)), base.batcher, micro_batch_size=cfg.reward.listener_batch_size)
    as_listener = listener_check(own, data, ec.eval_size)
    log(f"seed {seed}: warm-up {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"({time.perf_counter() - t0:.0f} s); {_line(start)}; as a listener it follows the evidence "
        f"{as_listener['follows_evidence']:.2f}, confidence in the truth without evidence "
        f"{as_listener['confidence_no_evidence']:.2f}")
    out = {"warmup": {"final": start, "curve": [{"step": 0, **start}], "train_curve": [],
                      "warmup_loss": [losses[0], losses[-1]], "as_listener": as_listener,
                      "seconds": time.perf_counter() - t0}}
    task.splits["train"] = data.dataset("train", ec.train_size)  # GRPO's pairs: the shortcut always holds
    for arm in (a for a in ec.arms if a != "warmup"):
        t0 = time.perf_counter()
        models.policy.load_state_dict(warm)
        if models.reference is not None:
            models.reference.load_state_dict(warm)
        task.weights = ARMS[arm]
        task.listener = listener
        if arm == "paper-listener":
            task.listener = own
        out[arm] = run_arm(cfg, task, models, ec, dist, folder / arm, start)
        out[arm]["seconds"] = time.perf_counter() - t0
        log(f"seed {seed}: {arm}: {ec.grpo_steps} GRPO steps ({out[arm]['seconds']:.0f} s); "
            f"{_line(out[arm]['final'])}")
    task.listener = listener
    return out


def run_arm(cfg, task, models, ec: ExperimentConfig, dist: D.Dist, folder: Path, start: dict) -> dict:
    """GRPO from the warmed-up weights; held-out/OOD measured every ``eval_every`` steps and at the end."""
    trainer = Trainer(cfg, dist, task, models, folder)
    curve, train_curve = [{"step": 0, **start}], []

    def on_step(tr: Trainer, metrics: dict) -> None:
        train_curve.append({"step": tr.step, **{k: _clean(metrics.get(m)) for k, m in TRAIN_METRICS.items()}})
        if tr.step % ec.eval_every == 0 or tr.step == ec.grpo_steps:
            curve.append({"step": tr.step, **measure(tr.policy, task, ec, dist)})

    trainer.fit(on_step=on_step)
    return {"final": {s: curve[-1][s] for s in EVAL_SPLITS}, "curve": curve, "train_curve": train_curve}


def _line(m: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    h, o = m["heldout"], m["ood"]
    return (f"held-out acc {f(h['accuracy'])}, OOD acc {f(o['accuracy'])}, contradiction "
            f"{f(h['contradiction_rate'])}/{f(o['contradiction_rate'])}, explained {f(h['explained_share'])}")


# --- the program ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ExperimentConfig]:
    p = argparse.ArgumentParser(prog="python -m lgrpo.experiments.listener", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the PNG plots")
    p.add_argument("--merge", nargs="+", metavar="RUN_DIR", default=None,
                   help="combine the results of runs that differ only in --seeds into --out (nothing is trained)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, a few steps: checks that everything runs (the numbers mean nothing)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (default 1; 0 keeps torch's default, one per core, "
                        "which is ~10x slower when other programs share the cores)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run side by side, one process each, then merged into --out (default 1: in turn)")
    for f in fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("seeds", "arms"):
            p.add_argument(flag, nargs="+", type=int if f.name == "seeds" else str, default=None)
        else:
            p.add_argument(flag, type=type(f.default), default=None)
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    values = dict(QUICK) if args.quick else {}
    values.update({f.name: getattr(args, f.name) for f in fields(ExperimentConfig)
                   if getattr(args, f.name) is not None})
    for k in ("seeds", "arms"):
        if k in values:
            values[k] = tuple(values[k])
    return args, ExperimentConfig(**values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, ec = parse_args(argv)
    try:  # the plots are drawn at the end: say what is missing before the training, not after it
        require("experiment", "the listener experiment's plots")
    except MissingExtra as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.merge:
        paths = merge(args.out, args.merge)
        print("wrote " + ", ".join(str(p) for p in paths), flush=True)
        return 0
    if args.jobs > 1 and len(ec.seeds) > 1:
        return run_side_by_side(argv, ec.seeds, args.jobs, Path(args.out))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, ec)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def run(args: argparse.Namespace, ec: ExperimentConfig) -> int:
    """The experiment in this process: the listener, then each seed in turn."""
    from .report import write_outputs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist = D.init("cpu" if not torch.cuda.is_available() else "auto")
    t_start = time.perf_counter()
    data = ShortcutTask(ec.data_seed, explained_share=ec.explained_share)
    results = {"config": asdict(ec), "quick": args.quick, "arms": {a: {} for a in ec.arms}}
    with tempfile.TemporaryDirectory(prefix="lgrpo-experiment-") as tmp:
        t0 = time.perf_counter()
        listener = train_listener(ec, data, dist, Path(tmp) / "listener")
        results["listener"] = {**listener_check(listener, data, ec.eval_size), "seconds": time.perf_counter() - t0}
        print(f"listener: {ec.listener_steps} warm-up steps ({results['listener']['seconds']:.0f} s); follows "
              f"the evidence {results['listener']['follows_evidence']:.2f}, confidence in the truth without "
              f"evidence {results['listener']['confidence_no_evidence']:.2f}", flush=True)
        for seed in ec.seeds:
            per_arm = run_seed(seed, ec, data, listener, dist, Path(tmp) / f"seed{seed}",
                               log=lambda s: print(s, flush=True))
            for arm, res in per_arm.items():
                if arm in results["arms"]:
                    results["arms"][arm][str(seed)] = res
            results["seconds"] = time.perf_counter() - t_start
            paths = write_outputs(results, out)  # after every seed: a long run can be looked at midway
    print(f"{results['seconds']:.0f} s; wrote " + ", ".join(str(p) for p in paths), flush=True)
    D.close()
    return 0


# Why one thread per process: PyTorch's default (one per core) makes its threads wait on each other
# whenever other programs share the cores. Measured on 2 shared, busy CPU cores: a warm-up step took
# 2.6 s with 2 threads and 0.26 s with 1. Seeds side by side (--jobs) use the cores instead.


def run_side_by_side(argv: list[str], seeds: tuple[int, ...], jobs: int, out: Path) -> int:
    """Each seed in its own process (``--seeds s --out OUT/seed-s``), ``jobs`` at a time, then
    :func:`merge` into ``out``. Every process trains the same listener (same seed and steps, so the
    same weights: :func:`merge` checks that its measurements agree)."""
    import subprocess

    base = _without_options(argv, {"--seeds": True, "--out": True, "--jobs": True})
    out.mkdir(parents=True, exist_ok=True)
    parts = [out / f"seed-{s}" for s in seeds]
    pending = list(zip(seeds, parts))
    running: list[tuple[int, subprocess.Popen, object]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            seed, part = pending.pop(0)
            log = open(out / f"seed-{seed}.log", "w")  # noqa: SIM115 - closed when the process ends
            cmd = [sys.executable, "-m", "lgrpo.experiments.listener", *base, "--seeds", str(seed), "--out", str(part)]
            print(f"seed {seed}: {' '.join(cmd[1:])} > {log.name}", flush=True)
            running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1.0)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            seed, proc, _ = item
            print(f"seed {seed}: done (exit status {proc.returncode})", flush=True)
            if proc.returncode:
                failed.append(seed)
    if failed:
        print(f"seed(s) {failed} failed: see {out}/seed-N.log", file=sys.stderr, flush=True)
        return 1
    paths = merge(out, parts)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


def _without_options(argv: list[str], drop: dict[str, bool]) -> list[str]:
    """``argv`` without the options in ``drop`` (``--opt v...`` or ``--opt=v``; their values with them)."""
    kept, skipping = [], False
    for a in argv:
        name = a.split("=", 1)[0]
        if a.startswith("--"):
            skipping = name in drop and "=" not in a
            if name in drop:
                continue
        elif skipping:
            continue
        kept.append(a)
    return kept


def merge(out: str | Path, parts: list[str | Path]) -> list[Path]:
    """Combine the ``results.json`` of runs that differ only in their seeds (e.g. one process per seed,
    run side by side) into one set of outputs in ``out``."""
    from .report import write_outputs

    loaded = [json.loads((Path(p) / "results.json").read_text()) for p in parts]
    first = loaded[0]
    same = {k: v for k, v in first["config"].items() if k != "seeds"}
    for p, r in zip(parts, loaded):
        other = {k: v for k, v in r["config"].items() if k != "seeds"}
        if other != same:
            diff = sorted(k for k in same if same[k] != other.get(k))
            raise ValueError(f"{p}: its configuration differs from {parts[0]}'s in {diff}; only seeds may differ")
        if _listener_check(r) != _listener_check(first):  # each run trained its own listener
            raise ValueError(f"{p}: its listener measured {_listener_check(r)}, {parts[0]}'s "
                             f"{_listener_check(first)}: not the same listener")
    merged = {**first, "arms": {a: {} for a in first["arms"]}, "seconds": max(r["seconds"] for r in loaded)}
    for p, r in zip(parts, loaded):
        for arm, seeds in r["arms"].items():
            clash = set(seeds) & set(merged["arms"][arm])
            if clash:
                raise ValueError(f"{p}: seed(s) {sorted(clash)} of arm {arm} are in two of the runs")
            merged["arms"][arm].update(seeds)
    merged["config"] = {**first["config"], "seeds": sorted(int(s) for s in merged["arms"][first["config"]["arms"][0]])}
    merged["merged_from"] = [str(p) for p in parts]
    merged.pop("summary", None)
    return write_outputs(merged, Path(out))


def _listener_check(results: dict) -> dict:
    return {k: v for k, v in results.get("listener", {}).items() if k != "seconds"}


if __name__ == "__main__":
    sys.exit(main())

