"""``python -m lgrpo.train``: parse the config → build → train → close.

No arguments: the tiny built-in Qwen2.5-VL on the synthetic colour/shape task — a supervised warm-up
on templated reasoning (the format, the image descriptions and the verdict), then GRPO with the
listener reward; held-out accuracy and contradiction rate at the start, after the warm-up and after
GRPO; checkpoints, metrics and the exported policy under ``runs/``.

``torchrun --nproc_per_node N -m lgrpo.train ...`` runs the same program on N ranks (FSDP2).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from . import distributed as D
from . import preflight
from .checkpoint import CheckpointError, load_weights, save_weights, weights_info
from .config import ConfigError, JobConfig, parse_args, save_config
from .data import DataError
from .eval import evaluate, format_report, write_report
from .export import export_pretrained
from .group import PromptBatch, Rollout
from .metrics import MetricsWriteError
from .rollout.hf import clean_generation_config
from .run_lock import lock_run_folder
from .seeding import seed_everything
from .trainer import Models, Trainer

# --- the task: prompts, rewards and warm-up targets from the model/data pipeline ----------------------


class PreferenceTask:
    """Pairs of images + prompt → reasoner prompts; completions → format/accuracy/listener rewards."""

    def __init__(self, batcher, splits: dict, listener=None, weights=None):
        from .prompts import parse_completion
        from .rewards import RewardWeights

        self.batcher, self.splits, self.listener = batcher, splits, listener
        self.tokenizer = batcher.tokenizer
        self.weights = weights or RewardWeights()
        self._parse = parse_completion

    def num_prompts(self, split: str) -> int:
        return len(self.splits[split])

    def prompts(self, split: str, indices: list[int], swap: list[bool] | None = None) -> PromptBatch:
        examples = [self.splits[split][i] for i in indices]
        if swap is not None:
            examples = [ex.swapped() if s else ex for ex, s in zip(examples, swap)]
        # Each pair's images are patchified once: the G completions of a group, the listener's forward and
        # every scoring pass point at this prompt row.
        batch = self.batcher.reasoner_batch([ex.prompt for ex in examples], [list(ex.images) for ex in examples])
        batch.extra.update(examples=examples, preferred=torch.tensor([ex.preferred for ex in examples]))
        return batch

    def rewards(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        from .rewards import compute_rewards

        fmt = self.batcher.fmt
        parsed = [self._parse(t, fmt) for t in rollout.texts]
        scores = None
        if self.listener is not None:
            # The reasoner prompts with their images, each once: the listener's shared prefix.
            scores = self.listener.score_group(rollout.prompts, rollout.group, [p.reasoning for p in parsed])
        preferred = torch.as_tensor(rollout.completion_prompts("preferred")).cpu()
        r = compute_rewards(parsed, preferred, scores, self.weights)
        comparable = (r.answer > 0) & (r.listener_choice > 0)
        contradiction = torch.where(comparable, r.contradiction.float(), torch.tensor(float("nan")))
        listener = r.listener if scores is not None else torch.full_like(r.listener, float("nan"))
        return {
            "total": r.total,
            "format": r.fmt,
            "accuracy": r.acc,
            "listener": listener,
            "contradiction": contradiction,
            "answer": r.answer,
        }

    def sft_targets(self, prompts: PromptBatch) -> list[str]:
        from .synthetic import reference_completion

        return [reference_completion(ex, self.batcher.fmt) for ex in prompts.extra["examples"]]


def _datasets(cfg: JobConfig) -> dict:
    from .data import ManifestDataset
    from .synthetic import SyntheticTask

    synthetic = SyntheticTask(seed=cfg.train.seed)
    splits = {}
    splits["train"] = (
        synthetic.dataset("train", cfg.data.synthetic_train_size)
        if cfg.data.train == "synthetic"
        else ManifestDataset(cfg.data.train, on_bad_row=cfg.data.on_bad_row)
    )
    if cfg.data.eval == "synthetic":
        splits["eval"] = synthetic.dataset("heldout", cfg.data.synthetic_eval_size)
    elif cfg.data.eval != "none":
        splits["eval"] = ManifestDataset(cfg.data.eval, on_bad_row=cfg.data.on_bad_row)
    return splits


def build(cfg: JobConfig, dist: D.Dist):
    """Policy, frozen reference and listener, and the task; everything on this rank's device."""
    try:
        from .batching import VLBatcher
        from .listener import Listener
        from .model import enable_activation_checkpointing, load_listener, load_policy, load_reference
        from .prompts import PromptFormat
        from .rewards import RewardWeights
    except ImportError as err:  # pragma: no cover - only before the model pipeline is installed
        raise SystemExit(
            f"lgrpo.train needs the model/data pipeline (lgrpo.model, lgrpo.batching, ...): {err}"
        ) from err

    name = cfg.model.policy or "tiny"
    master = policy_weights_dtype(cfg)
    common = dict(device=dist.device, attn_implementation=cfg.model.attn_implementation, seed=cfg.train.seed)
    policy = load_policy(name, dtype=master, **common)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    fmt = PromptFormat(listener_strip_verdict=cfg.reward.listener_strip_verdict)
    batcher = VLBatcher.from_pretrained(name, fmt, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    clean_generation_config(policy, batcher.tokenizer)
    reference = (
        load_reference(cfg.model.reference or name, dtype=cfg.model.dtype, **common)
        if cfg.loss.beta > 0
        else None
    )
    listener = None
    if cfg.reward.w_listener > 0:
        lm = load_listener(cfg.model.listener or name, dtype=cfg.model.dtype, **common)
        listener = Listener(lm, batcher, micro_batch_size=cfg.reward.listener_batch_size,
                            shared_prefix=cfg.loss.shared_prefix, prefix_attention=cfg.loss.prefix_attention)
        if D.use_fsdp(cfg.parallel.fsdp) and cfg.parallel.listener == "shard":
            D.shard(lm, root=listener.scorer)  # the scorer reads the lm_head outside the HF forward
    weights = RewardWeights(cfg.reward.w_format, cfg.reward.w_accuracy, cfg.reward.w_listener)
    task = PreferenceTask(batcher, _datasets(cfg), listener, weights)
    return task, Models(policy, reference), listener


def policy_weights_dtype(cfg: JobConfig) -> str:
    """The dtype the policy's weights are held (and its rollouts decoded) in: fp32 master weights, or the
    compute dtype."""
    return "float32" if cfg.model.master_weights == "float32" else cfg.model.dtype


def build_eval_task(model: str, data: str, listener: str | None, *, dtype: str | None, device: torch.device):
    """For ``python -m lgrpo.eval``: the policy to judge and a task over the held-out pairs."""
    from .batching import VLBatcher
    from .data import ManifestDataset
    from .listener import Listener
    from .model import load_listener, load_policy
    from .synthetic import SyntheticTask

    policy = load_policy(model, dtype=dtype, device=device).eval()
    batcher = VLBatcher.from_pretrained(model)
    clean_generation_config(policy, batcher.tokenizer)
    split = SyntheticTask().dataset("heldout", 64) if data == "synthetic" else ManifestDataset(data)
    lst = Listener(load_listener(listener, dtype=dtype, device=device), batcher) if listener else None
    return policy, PreferenceTask(batcher, {"eval": split}, lst)


# --- the program -----------------------------------------------------------------------------------------

WARMUP_DIR = "warmup"  # the warmed-up policy's weights, saved once (lgrpo.checkpoint.save_weights)


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
    size = load_image_processor(
        cfg.model.policy or "tiny", min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels
    ).size
    cfg.data.min_pixels, cfg.data.max_pixels = int(size["shortest_edge"]), int(size["longest_edge"])
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


def frozen_copies(cfg: JobConfig, models: Models, listener) -> list:
    """The frozen models that start as copies of the warmed-up policy: the KL reference and the listener,
    unless given as folders. For the tiny model, "the same base model, frozen" (SPEC §1) is the model that
    knows the format."""
    return [
        m
        for m, given in ((models.reference, cfg.model.reference), (listener.model if listener else None,
                                                                    cfg.model.listener))
        if m is not None and given is None
    ]


def start_run(cfg: JobConfig, dist: D.Dist) -> Path:
    """Resolve the machine-dependent options, check the run folder against its saved config (before
    anything slow: every rank reads, none writes), then rank 0 writes the config that will run. The
    folder is locked first: a second run started in it (a requeue while the old job runs) is refused."""
    resolve_auto(cfg, dist)
    run_dir = run_folder(cfg)
    lock_run_folder(run_dir, dist)  # before anything reads or writes the folder: one owner at a time
    changes = preflight.check_run(cfg, run_dir)
    D.barrier()
    if dist.is_main:
        for why in cfg.pointless():
            print(f"[warn] {why}", flush=True)
        if changes:
            kept = preflight.keep_previous_config(run_dir)
            print(f"[config] {run_dir} continues with a changed config ({'; '.join(changes)}); the previous "
                  f"one is kept as {kept.name}", flush=True)
        save_config(cfg, run_dir / "config.json")
        print(
            f"run folder: {run_dir}  ({dist.world_size} rank(s), {dist.device}, attention "
            f"{cfg.model.attn_implementation}"
            f"{f' (shared prefix: {cfg.loss.prefix_attention})' if cfg.loss.shared_prefix else ''}, "
            f"images {cfg.data.min_pixels}..{cfg.data.max_pixels} pixels)",
            flush=True,
        )
    return run_dir


def warm_up_or_restore(cfg: JobConfig, dist: D.Dist, trainer: Trainer, frozen: list, run_dir: Path,
                       held_out) -> dict:
    """Bring the policy and its frozen copies to where GRPO starts; returns the held-out reports made.

    Three cases: a fresh run warms up (or reloads a finished warm-up, if it stopped before its first
    checkpoint) and copies the result into the frozen models; a resumed run has the policy from its
    checkpoint but must rebuild the frozen copies from the saved warm-up weights."""
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
    elif cfg.sft.steps and frozen:
        try:
            load_weights(warm_dir, frozen, dist=dist)
        except CheckpointError as err:
            raise CheckpointError(
                f"cannot rebuild the KL reference / listener, which are copies of the warmed-up policy: {err}. "
                f"Start a new run (--run.name), or give them as folders (--model.reference, --model.listener)"
            ) from None
        if dist.is_main:
            print(f"[resume] reference/listener rebuilt from the warm-up weights in {warm_dir}", flush=True)
    return reports


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


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    dist = D.init(cfg.train.device, cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
    cfg.validate_world(dist.world_size)
    run_dir = start_run(cfg, dist)
    seed_everything(cfg.train.seed + dist.rank)
    t0 = time.perf_counter()
    task, models, listener = build(cfg, dist)
    preflight.check_task(cfg, task, models.policy, run_dir, dist)
    trainer = Trainer(cfg, dist, task, models, run_dir)

    def held_out(title: str) -> dict | None:
        if "eval" not in task.splits:
            return None
        report = evaluate(
            trainer.policy,
            task,
            limit=cfg.data.eval_size,
            max_new_tokens=cfg.rollout.max_new_tokens,
            stop=cfg.rollout.stop or None,
            batch_size=max(cfg.loss.micro_batch_size, 8),
            dist=dist,
            autocast_dtype=trainer.scorer.autocast_dtype,
            fsdp_root=trainer.scorer,
            engine=cfg.rollout.engine,
        )
        if dist.is_main:
            print(format_report(report, title), flush=True)
            numbers = {k: v for k, v in report.items() if isinstance(v, (int, float))}
            with open(run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"stage": title, "step": trainer.step, **numbers}) + "\n")
        return report

    reports = warm_up_or_restore(cfg, dist, trainer, frozen_copies(cfg, models, listener), run_dir, held_out)

    def periodic_eval(tr: Trainer, _metrics: dict) -> None:
        every = cfg.train.eval_every
        if every and tr.step % every == 0 and tr.step < cfg.train.steps:  # the last step gets "after"
            held_out(f"held-out, step {tr.step}")

    trainer.fit(on_step=periodic_eval)
    if trainer.stopped_by is not None:  # preempted or Ctrl-C: the checkpoint is saved, nothing else to do
        D.close()
        return 128 + trainer.stopped_by
    reports["after"] = held_out("held-out, after GRPO")
    if cfg.checkpoint.export:
        out = export_pretrained(
            trainer.policy,
            run_dir / "final",
            dist,
            extra_savers=(task.tokenizer, getattr(task.batcher, "image_processor", None)),
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
    D.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C outside the GRPO loop (or a second one inside it): no traceback
        print("\n[stop] interrupted: nothing saved since the last checkpoint", file=sys.stderr, flush=True)
        sys.exit(130)
    except (ConfigError, DataError, CheckpointError, MetricsWriteError) as err:  # the message says what to do
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(err, ConfigError) else 1)
