"""One run of ``python -m lgrpo.train``, around the trainer: start-up, warm-up, held-out evaluations, the end.

- :func:`start_run`: the machine-dependent options resolved, the run folder locked and checked against its
  saved config, the model folders checked — nothing written to the folder yet;
- :func:`write_run_config`: once the models and the task are built, the config that will run is saved
  (a start that failed before that leaves no config behind, so the corrected command is not refused as
  "a run with another config");
- :func:`warm_up_or_restore`: the policy and its frozen copies brought to where GRPO starts;
- :class:`HeldOut`: the held-out report at each stage, printed and appended to ``eval.jsonl``;
- :func:`finish`: the export, the reports' JSON files and the summary line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import distributed as D
from . import preflight
from .checkpoint import CheckpointError, load_weights, save_weights, weights_info
from .config import ConfigError, JobConfig, save_config
from .export import export_pretrained
from .frozen import frozen_layout
from .heldout import evaluate
from .lora import has_adapters
from .plan import write_plan
from .report import format_report, write_report
from .run_lock import lock_run_folder
from .task import Models, policy_weights_dtype
from .trainer import Trainer

WARMUP_DIR = "warmup"  # the warmed-up policy's weights, saved once (lgrpo.checkpoint.save_weights)


# --- start-up ---------------------------------------------------------------------------------------------


def resolve_auto(cfg: JobConfig, dist: D.Dist) -> JobConfig:
    """Replace what "auto" and None stand for on this machine (in place), so that the log and the run's
    config.json name what actually ran: the attention backend and the image-size bounds."""
    from .model import load_image_processor, resolve_attn_implementation

    # One implementation serves every model; the policy's weights decide (flash-attn takes no fp32, and
    # fp32 master weights are decoded without autocast in the rollouts).
    cfg.model.attn_implementation = resolve_attn_implementation(cfg.model.attn_implementation, dist.device,
                                                                policy_weights_dtype(cfg))
    if cfg.loss.shared_prefix:
        cfg.loss.prefix_attention = resolve_prefix_attention(cfg.loss.prefix_attention, dist.device, cfg.model.dtype)
    try:
        size = load_image_processor(
            cfg.model.policy or "tiny", min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels
        ).size
    except ValueError as err:  # bounds that contradict each other or the model folder's
        given = " ".join(f"--data.{k} {v}" for k, v in (("min_pixels", cfg.data.min_pixels),
                                                        ("max_pixels", cfg.data.max_pixels)) if v is not None)
        raise ConfigError(f"{given}: {err} (a bound not given is the model folder's)") from None
    cfg.data.min_pixels, cfg.data.max_pixels = int(size["shortest_edge"]), int(size["longest_edge"])
    cfg.parallel.frozen = frozen_layout(cfg).mode  # one module for the reference and listener, or two
    return cfg


def resolve_prefix_attention(requested: str, device, dtype: str) -> str:
    """``auto`` resolved for this machine (varlen checked on the GPU first), and a choice that cannot run
    here refused at start-up rather than at the first update."""
    from .attention import resolve_backend

    device = torch.device(device)
    backend = resolve_backend(requested, device, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    if device.type == "cpu" and backend in ("flex", "varlen"):
        raise ValueError(f"--loss.prefix_attention {backend} cannot run the update on CPU "
                         f"({'torch has no CPU backward for FlexAttention' if backend == 'flex' else 'CUDA only'}); "
                         "use sdpa or auto")
    return backend


def run_folder(cfg: JobConfig) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.dir) / D.broadcast_object(name)


def start_run(cfg: JobConfig, dist: D.Dist) -> tuple[Path, list[str]]:
    """Check the model folders, resolve the machine-dependent options, check the run folder against its
    saved config (before anything slow: every rank reads, none writes). The folder is locked first: a
    second run started in it (a requeue while the old job runs) is refused. Returns the run folder and the
    config changes ``--run.allow_config_change`` allowed, for :func:`write_run_config`."""
    preflight.check_model_folders(cfg)
    resolve_auto(cfg, dist)
    run_dir = run_folder(cfg)
    lock_run_folder(run_dir, dist)  # before anything reads or writes the folder: one owner at a time
    changes = preflight.check_run(cfg, run_dir)
    D.barrier()
    if dist.is_main:
        for why in cfg.pointless():
            print(f"[warn] {why}", flush=True)
        print(
            f"run folder: {run_dir}  ({dist.world_size} rank(s), {dist.device}, attention "
            f"{cfg.model.attn_implementation}"
            f"{f' (shared prefix: {cfg.loss.prefix_attention})' if cfg.loss.shared_prefix else ''}, "
            f"images {cfg.data.min_pixels}..{cfg.data.max_pixels} pixels)",
            flush=True,
        )
        print(frozen_layout(cfg).describe(cfg, D.use_fsdp(cfg.parallel.fsdp)), flush=True)
    return run_dir, changes


def write_run_config(cfg: JobConfig, run_dir: Path, changes: list[str], dist: D.Dist) -> None:
    """Rank 0 saves the config that will run (the previous one kept aside if it changed)."""
    if not dist.is_main:
        return
    if changes:
        kept = preflight.keep_previous_config(run_dir)
        print(f"[config] {run_dir} continues with a changed config ({'; '.join(changes)}); the previous "
              f"one is kept as {kept.name}", flush=True)
    save_config(cfg, run_dir / "config.json")
    write_plan(cfg, run_dir, dist.world_size)


# --- before GRPO ------------------------------------------------------------------------------------------


def frozen_copies(cfg: JobConfig, models: Models, listener) -> list:
    """The frozen models that start as copies of the warmed-up policy: the KL reference and the listener,
    unless given as folders. For the tiny model, "the same base model, frozen" (SPEC §1) is the model that
    knows the format. A module that is both (lgrpo.frozen) is listed once: one copy to make; a LoRA policy's
    base serves instead (no copy: its warm-up merges, lgrpo.lora)."""
    copies = []
    for m, given in ((models.reference, cfg.model.reference), (listener.model if listener else None,
                                                               cfg.model.listener)):
        if m is not None and given is None and m is not models.policy and all(m is not c for c in copies):
            copies.append(m)
    return copies


def warm_up_or_restore(cfg: JobConfig, dist: D.Dist, trainer: Trainer, frozen: list, run_dir: Path,
                       held_out) -> dict:
    """Bring the policy and its frozen copies to where GRPO starts; returns the held-out reports made.

    Three cases: a fresh run warms up (or reloads a finished warm-up, if it stopped before its first
    checkpoint) and copies the result into the frozen models; a resumed run has the policy from its
    checkpoint but must rebuild the frozen copies from the saved warm-up weights. A LoRA policy's warm-up
    ends merged into its base (Trainer.warmup), which the warm-up folder holds: a resumed LoRA run reads
    its frozen base from there and its adapters from the checkpoint."""
    reports = {}
    warm_dir = run_dir / WARMUP_DIR
    if not trainer.resume():
        if cfg.sft.steps:
            info, _ = weights_info(warm_dir, dist)
            if info is not None and info.get("steps") == cfg.sft.steps:
                load_weights(warm_dir, [trainer.policy], verified=True)
                if dist.is_main:
                    print(f"[resume] warm-up weights from {warm_dir} ({info['steps']} steps); not redone",
                          flush=True)
            else:
                reports["initial"] = held_out("held-out, initial weights")
                losses = trainer.warmup()
                if dist.is_main:
                    print(f"warm-up: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
                # Saved once: a resumed run rebuilds the frozen copies from these weights.
                save_weights(warm_dir, trainer.policy, dist, {"steps": len(losses), "loss": losses[-1]})
            trainer.copy_policy_into(*frozen)
        reports["before"] = held_out("held-out, before GRPO")
    elif cfg.sft.steps and (frozen or has_adapters(trainer.policy)):
        try:
            if has_adapters(trainer.policy):  # the warmed-up base; the adapters came with the checkpoint
                load_weights(warm_dir, [trainer.policy], dist=dist, frozen_only=True)
            if frozen:
                load_weights(warm_dir, frozen, dist=dist)
        except CheckpointError as err:
            raise CheckpointError(
                f"cannot rebuild the KL reference / listener, which are copies of the warmed-up policy: {err}. "
                f"Start a new run (--run.name), or give them as folders (--model.reference, --model.listener)"
            ) from None
        if dist.is_main:
            print(f"[resume] reference/listener rebuilt from the warm-up weights in {warm_dir}", flush=True)
    return reports


# --- held-out evaluations ---------------------------------------------------------------------------------


class HeldOut:
    """``held_out(title)``: the held-out report of the policy now (None without an eval split), printed
    and appended to the run's ``eval.jsonl``; :meth:`periodic` is the trainer's ``on_step``."""

    def __init__(self, cfg: JobConfig, dist: D.Dist, trainer: Trainer, run_dir: Path):
        self.cfg, self.dist, self.trainer, self.run_dir = cfg, dist, trainer, run_dir

    def __call__(self, title: str) -> dict | None:
        cfg, trainer = self.cfg, self.trainer
        if "eval" not in trainer.task.splits:
            return None
        report = evaluate(
            trainer.policy,
            trainer.task,
            limit=cfg.data.eval_size,
            max_new_tokens=cfg.rollout.max_new_tokens,
            stop=cfg.rollout.stop or None,
            batch_size=max(cfg.loss.micro_batch_size, 8),
            dist=self.dist,
            autocast_dtype=trainer.scorer.autocast_dtype,
            fsdp_root=trainer.scorer,
            engine=cfg.rollout.engine,
        )
        if self.dist.is_main:
            print(format_report(report, title), flush=True)
            numbers = {k: v for k, v in report.items() if isinstance(v, (int, float))}
            with open(self.run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"stage": title, "step": trainer.step, **numbers}) + "\n")
        return report

    def periodic(self, tr: Trainer, _metrics: dict) -> None:
        every = self.cfg.train.eval_every
        if every and tr.step % every == 0 and tr.step < self.cfg.train.steps:  # the last step gets "after"
            self(f"held-out, step {tr.step}")


# --- the end ----------------------------------------------------------------------------------------------


def summary_line(reports: dict, seconds: float) -> str | None:
    """One line from the held-out reports, or None without both a "before" and an "after".

    With a warm-up it names the stage each number comes from: on the tiny model the warm-up, not GRPO,
    is where most of the held-out accuracy is learned, and the line must not hide that."""
    before, after = reports.get("before"), reports.get("after")
    if not (before and after):
        return None
    initial = reports.get("initial")
    start = f"{initial['accuracy']:.3f} initially, " if initial else ""
    warm = " after the warm-up" if initial else ""
    return (
        f"held-out accuracy {start}{before['accuracy']:.3f}{warm} -> {after['accuracy']:.3f} after GRPO, "
        f"contradiction rate {before['contradiction_rate']:.3f} -> {after['contradiction_rate']:.3f} "
        f"({seconds:.0f} s)"
    )


def finish(cfg: JobConfig, dist: D.Dist, trainer: Trainer, run_dir: Path, reports: dict, t0: float) -> None:
    """The exported policy (``--checkpoint.export``), the held-out reports as JSON and the summary line
    (its time counted from ``t0``, a ``time.perf_counter()``)."""
    task = trainer.task
    if cfg.checkpoint.export:
        out = export_pretrained(
            trainer.policy,
            run_dir / "final",
            dist,
            extra_savers=(task.tokenizer, getattr(task.batcher, "image_processor", None)),
            base_folder=cfg.model.policy,
        )
        if dist.is_main:
            print(f"exported policy: {out}", flush=True)
    if dist.is_main:
        for stage, rep in reports.items():
            if rep is not None:
                write_report(rep, run_dir / f"eval_{stage}.json")
        line = summary_line(reports, time.perf_counter() - t0)
        if line:
            print(line, flush=True)
