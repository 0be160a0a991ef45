"""The GRPO trainer. ``Trainer.step`` reads top to bottom as the method:

    rollouts (G samples per prompt) → rewards (format, accuracy, listener) → group advantages
    → policy update with the fused loss (μ passes over minibatches, KL to the frozen reference)
    → metrics

Everything model- or data-specific comes through a :class:`~lgrpo.task.Task` (prompts, rewards, the supervised
warm-up's targets), so the same trainer runs the tiny built-in model, Qwen2.5-VL, and the test stand-ins.

Batch layout. A step takes ``train.prompts_per_step`` prompts over all ranks; rank r takes its
contiguous share and completes each prompt G times, so each group of G lives on one rank and
advantages need no communication. Minibatch m of a pass holds the samples ``g`` with
``g % minibatches == m`` of every prompt: the same global minibatch on any number of ranks. Every
loss is normalised by global counts (all-reduced tokens or sequences), so the gradient does not
depend on the number of ranks or micro-batches.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from . import distributed as D
from .checkpoint import Checkpointer, CheckpointError, ModelState, OptimizerState, latest_checkpoint
from .config import JobConfig
from .data import PromptOrder
from .group import GroupBatch, PromptBatch, Rollout, encode_completions
from .interrupt import GracefulStop, agree_max
from .kernels import PER_SEQUENCE, group_advantages, loss_options
from .lora import has_adapters, merge_adapters
from .metrics import MetricsLogger, MetricsWriteError, Timer, peak_memory_gib, reset_peak_memory, show_progress_bar
from .optim import build_optimizer, build_scheduler
from .rewards import Rewards
from .rollout import rollout_for
from .scoring import CompletionScorer
from .task import Models, Task


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; raised before the optimizer touched the weights."""




# --- the trainer -------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: JobConfig, dist: D.Dist, task: Task, models: Models, run_dir: str | Path):
        self.cfg, self.dist, self.task = cfg, dist, task
        self.run_dir = Path(run_dir)
        self.device = dist.device
        self.G = cfg.rollout.group_size
        cfg.validate_world(dist.world_size)

        compute = torch.bfloat16 if cfg.model.dtype == "bfloat16" else None
        self.fsdp = D.use_fsdp(cfg.parallel.fsdp)
        self.policy = models.policy
        # Mixed precision: under FSDP2 the params are gathered in the compute dtype; without it,
        # autocast. Either way the trainable (master) weights keep their own dtype (a LoRA policy's: its
        # adapters; its frozen base is held in the compute dtype).
        params_fp32 = next(p for p in self.policy.parameters() if p.requires_grad).dtype == torch.float32
        self.scorer = CompletionScorer(
            self.policy,
            fused=cfg.loss.fused,
            chunk_size=cfg.loss.chunk_size,
            autocast_dtype=compute if (compute and params_fp32 and not self.fsdp) else None,
            shared_prefix=cfg.loss.shared_prefix,
            prefix_attention=cfg.loss.prefix_attention,
        )
        if self.fsdp:
            D.shard(self.policy, root=self.scorer, mixed_precision=compute if params_fp32 else None)
        self.ref_scorer = None
        if models.base is not None:  # LoRA: the policy with its adapters off, through this scorer (lgrpo.lora)
            models.base.bind(self.scorer)
            if cfg.loss.beta > 0 and models.reference is None:
                self.ref_scorer = models.base
        if cfg.loss.beta > 0 and models.reference is None and self.ref_scorer is None:
            raise ValueError("--loss.beta > 0 needs a reference model (or set --loss.beta 0)")
        if models.reference is not None and cfg.loss.beta > 0:
            models.reference.requires_grad_(False).eval()
            if models.reference_scorer is not None:
                # The listener's module and scorer (lgrpo.frozen), placed by the build. Both are in the
                # compute dtype, so its settings (no autocast) are the ones a scorer of its own would get.
                self.ref_scorer = models.reference_scorer
            else:
                ref_fp32 = next(models.reference.parameters()).dtype == torch.float32
                self.ref_scorer = CompletionScorer(
                    models.reference,
                    fused=cfg.loss.fused,
                    autocast_dtype=compute if (compute and ref_fp32) else None,
                    shared_prefix=cfg.loss.shared_prefix,
                    prefix_attention=cfg.loss.prefix_attention,
                )
                if self.fsdp and cfg.parallel.reference == "shard":
                    D.shard(models.reference, root=self.ref_scorer, mixed_precision=None)

        self.updates_per_step = cfg.loss.epochs * cfg.loss.minibatches
        self.optimizer = build_optimizer(self.policy, cfg.optim)
        self.scheduler = build_scheduler(
            self.optimizer, max(cfg.train.steps * self.updates_per_step, 1), cfg.optim
        )
        self.order = PromptOrder(
            task.num_prompts("train"), cfg.train.prompts_per_step, cfg.train.seed, cfg.data.swap_augment
        )
        self.step = 0  # completed GRPO steps
        self.stopped_by: int | None = None  # the signal that stopped fit() early (lgrpo.interrupt), if any
        self.skipped_in_a_row = 0
        # What a checkpoint holds: each entry's state_dict() is saved, its load_state_dict() called on resume.
        # A LoRA policy's checkpoint holds its adapters only: the base is the policy folder's or the warm-up's.
        states = {"model": ModelState(self.policy, trainable_only=has_adapters(self.policy)),
                  "optimizer": OptimizerState(self.policy, self.optimizer),
                  "scheduler": self.scheduler, "trainer": self}
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, dist, states)
        self.logger: MetricsLogger | None = None
        if cfg.rollout.engine == "vllm":  # started now, with the run's dtype and seed: eval and every rollout reuse it
            rollout_for(cfg.rollout, self.policy, task.tokenizer, dtype=cfg.model.dtype, seed=cfg.train.seed)
        # Prompt tokens this rank's scoring forwards computed in the current step, per phase: each prompt
        # once per micro-batch with the shared prefix, once per completion without.
        self.prompt_tokens = {"reference": 0, "update": 0}

    # -- the method, top to bottom --------------------------------------------------------------------

    def train_step(self) -> dict:
        """One GRPO step; returns the step's metrics (reduced over ranks)."""
        cfg = self.cfg
        timer = Timer(self.device)
        reset_peak_memory(self.device)
        self.prompt_tokens = {"reference": 0, "update": 0}

        prompts, prompt_ids = self.next_prompts()
        with timer.phase("rollout"):
            rollout = self.rollouts(prompts, prompt_ids)
        with timer.phase("reward"):
            rewards = self.task.rewards(rollout)
        advantages = group_advantages(rewards.total.float().to(self.device), self.G, cfg.loss.advantage_scale)
        update = self.policy_update(rollout, advantages, timer)
        return self.step_metrics(rollout, rewards, advantages, update, timer)

    def next_prompts(self) -> tuple[PromptBatch, torch.Tensor]:
        """This rank's share of the step's global prompts, and their global positions in the step."""
        indices, swaps = self.order.next()
        per_rank = len(indices) // self.dist.world_size
        lo = self.dist.rank * per_rank
        mine = slice(lo, lo + per_rank)
        batch = self.task.prompts("train", indices[mine], swaps[mine])
        return batch.to(self.device), torch.arange(lo, lo + per_rank)

    @torch.no_grad()
    def rollouts(self, prompts: PromptBatch, prompt_ids: torch.Tensor) -> Rollout:
        """G completions of every prompt, sampled by the seeded sampler (the rollout engine, or transformers'
        generate with --rollout.engine hf), or by vLLM with per-prompt seeds (--rollout.engine vllm)."""
        r = self.cfg.rollout
        # every rank runs the same number of forwards (they may all-gather under FSDP)
        sync = D.all_reduce_max if self.dist.world_size > 1 else None
        with D.gathered(self.scorer):
            return rollout_for(r, self.policy, self.task.tokenizer).generate(
                prompts, self.G, temperature=r.temperature, top_p=r.top_p, seed=self.cfg.train.seed, step=self.step,
                prompt_ids=prompt_ids, batch_size=r.batch_size, reduce_max=sync)

    def policy_update(self, rollout: Rollout, advantages: torch.Tensor, timer: Timer) -> dict:
        """μ passes over the minibatches; each minibatch is one optimizer step."""
        cfg = self.cfg.loss
        with timer.phase("reference"):
            ref_logp = self.logprobs(self.ref_scorer, rollout) if self.ref_scorer is not None else None
            # Off-policy minibatches (μ > 1 or several minibatches) need the behaviour policy's log-probs,
            # captured before the first update; on-policy, the loss uses logp.detach() (ratio 1).
            old_logp = self.logprobs(self.scorer, rollout) if cfg.off_policy else None
        sample = torch.arange(len(rollout)) % self.G
        totals: dict[str, float] = {}
        with timer.phase("update"):
            for _ in range(cfg.epochs):
                for m in range(cfg.minibatches):
                    rows = torch.nonzero(sample % cfg.minibatches == m).squeeze(-1)
                    stats = self.optimizer_step(rollout, rows, advantages, old_logp, ref_logp)
                    for k, v in stats.items():
                        totals[k] = totals.get(k, 0.0) + v
        passes = cfg.epochs * cfg.minibatches
        out = {
            k: v / passes for k, v in totals.items() if k not in ("tok_sum", "clip_sum", "ent_sum", "kl_sum")
        }
        tokens = max(totals.get("tok_sum", 0.0), 1.0)
        out.update(
            clip_frac=totals.get("clip_sum", 0.0) / tokens,
            entropy=totals.get("ent_sum", 0.0) / tokens,
            kl=totals.get("kl_sum", 0.0) / tokens,
            update_tokens=totals.get("tok_sum", 0.0),
        )
        return out

    @torch.no_grad()
    def logprobs(self, scorer: CompletionScorer, rollout: Rollout) -> torch.Tensor:
        """Per-token log-probs [N, C] of the completions under ``scorer``'s model (no grad). In eval mode:
        the behaviour policy is what sampled the rollouts, without dropout (a LoRA adapter's
        ``--model.lora_dropout``; the Qwen-VL models' own dropout is 0)."""
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=self.device)
        mb = self.cfg.loss.micro_batch_size
        was_training = self.policy.training
        self.policy.eval()
        try:
            for lo in range(0, len(rollout), mb):
                rows = torch.arange(lo, min(lo + mb, len(rollout)))
                part = rollout.select(rows).trim()
                self.prompt_tokens["reference"] += part.prompt_tokens(scorer.shared_prefix)
                out[rows, : part.completion_ids.shape[1]] = scorer(
                    part, temperature=self.cfg.rollout.temperature
                ).float()
        finally:
            self.policy.train(was_training)
        return out

    def optimizer_step(
        self,
        rollout: Rollout,
        rows: torch.Tensor,
        advantages: torch.Tensor,
        old_logp: torch.Tensor | None,
        ref_logp: torch.Tensor | None,
    ) -> dict:
        """Forward/backward over micro-batches of ``rows``, then one AdamW step (unless non-finite)."""
        cfg, world = self.cfg.loss, self.dist.world_size
        counts = torch.tensor(
            [float(rollout.completion_mask[rows].sum()), float(len(rows))], device=self.device
        )
        global_tokens, global_seqs = D.all_reduce_sum(counts).tolist()
        loss_kwargs = dict(
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            delta=cfg.delta,
            beta=cfg.beta,
            importance_level=cfg.importance_level,
        )
        # normalised by the step's global counts: tokens over every rank, dr_grpo's length the rollout's cap
        loss_kwargs.update(
            loss_options(cfg.loss_type, num_items=global_tokens, max_len=self.cfg.rollout.max_new_tokens)
        )

        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, tokens, clipped, entropy, kl
        for lo in range(0, len(rows), cfg.micro_batch_size):
            sub = rows[lo : lo + cfg.micro_batch_size]
            part = rollout.select(sub).trim()
            self.prompt_tokens["update"] += part.prompt_tokens(self.scorer.shared_prefix)
            mask, width = part.completion_mask, part.completion_ids.shape[1]
            kwargs = dict(loss_kwargs, advantages=advantages[sub.to(self.device)])
            if old_logp is not None:
                kwargs["old_logp"] = old_logp[sub, :width]
            if ref_logp is not None and cfg.beta > 0:
                kwargs["ref_logp"] = ref_logp[sub, :width]
            loss, logp, entropy, kl, clipped = self.scorer(
                part, temperature=self.cfg.rollout.temperature, loss=kwargs
            )
            if cfg.loss_type in PER_SEQUENCE:
                loss = loss * (len(sub) / global_seqs)  # per-sequence means: weight by the share of sequences
            # FSDP2 averages gradients over ranks; the loss above is already a share of the global loss.
            (loss * world).backward()
            m = mask.float()
            sums += torch.stack(
                [
                    loss.detach().double(),
                    m.sum().double(),
                    (clipped.float() * m).sum().double(),
                    (entropy * m).sum().double(),
                    (kl * m).sum().double(),
                ]
            )
        D.all_reduce_sum(sums)

        loss_value = float(sums[0])
        norm_value, stepped = self.gradient_step(self.optimizer, loss_value)
        if stepped:
            self.skipped_in_a_row = 0
        else:
            self._non_finite(loss_value, norm_value)
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # a skipped update: the schedule still follows the step count
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return {
            "loss": loss_value,
            "grad_norm": norm_value,
            "lr": lr,
            "tok_sum": float(sums[1]),
            "clip_sum": float(sums[2]),
            "ent_sum": float(sums[3]),
            "kl_sum": float(sums[4]),
        }

    def gradient_step(self, optimizer: torch.optim.Optimizer, loss: float) -> tuple[float, bool]:
        """After the backward passes, for the update and the warm-up alike: the global gradient norm, then,
        when it and ``loss`` are finite, clipping to ``optim.grad_clip`` and one ``optimizer`` step.

        Returns the norm and whether the step was taken. The gradients are dropped either way, so a
        non-finite step leaves the weights (and the optimizer's moments) as they were."""
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        norm = D.full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True)) if grads else torch.zeros(())
        finite = math.isfinite(loss) and math.isfinite(float(norm))
        if finite:
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(
                    self.policy.parameters(), self.cfg.optim.grad_clip, norm, foreach=True
                )
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm), finite

    def _non_finite(self, loss: float, grad_norm: float) -> None:
        """Stop (default) or skip: either way the weights were not touched."""
        step = self.step + 1
        last = latest_checkpoint(self.checkpointer.folder)
        msg = (
            f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); the optimizer did not "
            f"touch the weights. Last complete checkpoint: {last or 'none'}"
        )
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(msg)
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.cfg.train.max_skips:
            raise NonFiniteError(msg + f" ({self.skipped_in_a_row} steps in a row: stopping)")
        if self.dist.is_main:
            print(f"[skip] {msg}", flush=True)

    def step_metrics(
        self, rollout: Rollout, rewards: Rewards, advantages: torch.Tensor, update: dict, timer: Timer
    ) -> dict:
        """Reward components, lengths, timings and throughput, reduced over ranks."""
        logged = {k: v.float().to(self.device) for k, v in rewards.logged().items()}
        lengths = rollout.lengths.float().to(self.device)
        total = rewards.total.float().to(self.device)
        groups = total.view(-1, self.G)
        vals = [v.nansum() for v in logged.values()]
        counts = [(~torch.isnan(v)).sum().float() for v in logged.values()]
        extra = torch.stack(
            [
                lengths.sum(),
                lengths.square().sum(),
                torch.tensor(float(len(rollout)), device=self.device),
                rollout.truncated.float().sum().to(self.device),
                (groups == groups[:, :1]).all(-1).float().sum(),
                total.square().sum(),
                torch.tensor(float(self.prompt_tokens["reference"]), device=self.device),
                torch.tensor(float(self.prompt_tokens["update"]), device=self.device),
            ]
        )
        flat = D.all_reduce_sum(torch.cat([torch.stack(vals + counts).double(), extra.double()]))
        k = len(logged)
        # NaN entries (e.g. contradiction where no answer was given) are left out of their mean.
        means = {
            name: float(flat[i] / max(float(flat[k + i]), 1)) if float(flat[k + i]) else float("nan")
            for i, name in enumerate(logged)
        }
        len_sum, len_sq, n_rows, n_trunc, flat_groups, r_sq, prompt_ref, prompt_upd = flat[2 * k :].tolist()
        mean_len = len_sum / n_rows
        reward_mean = means["reward"]
        secs = timer.seconds
        step_time = sum(secs.values())
        update_tokens = update.pop("update_tokens")
        metrics = {
            **means,
            "reward_std": math.sqrt(max(r_sq / n_rows - reward_mean**2, 0.0)),
            **update,
            "completion_len": mean_len,
            "completion_len_std": math.sqrt(max(len_sq / n_rows - mean_len**2, 0.0)),
            "truncated_frac": n_trunc / n_rows,
            "flat_group_frac": flat_groups / (n_rows / self.G),
            "time/rollout": secs.get("rollout", 0.0),
            "time/reward": secs.get("reward", 0.0),
            "time/reference": secs.get("reference", 0.0),
            "time/update": secs.get("update", 0.0),
            "time/step": step_time,
            "prompt_tokens/reference": prompt_ref,
            "prompt_tokens/update": prompt_upd,
            "tokens_per_s/rollout": len_sum / max(secs.get("rollout", 0.0), 1e-9),
            # Tokens through forward+backward: the completions and the prompt tokens actually computed.
            "tokens_per_s/update": (update_tokens + prompt_upd) / max(secs.get("update", 0.0), 1e-9),
            "peak_mem_gib": float(
                D.all_reduce_max(torch.tensor(peak_memory_gib(self.device), device=self.device))
            ),
        }
        return metrics

    # -- the supervised warm-up -------------------------------------------------------------------------

    def warmup(self) -> list[float]:
        """Teacher forcing on the task's templated reasoning, so the output format exists before GRPO
        (and, on the synthetic task, the model learns to describe both images, which the answer needs).

        A random or tiny policy never writes ``<think>…</think><answer>k</answer>`` by chance, so every
        group would get the same (zero) format reward and GRPO would have nothing to learn from.
        Uses its own constant-lr AdamW (not checkpointed: a resumed run starts from GRPO weights).
        A LoRA policy trains its adapters, then merges them into its base and draws fresh ones
        (lgrpo.lora.merge_adapters): its reference and listener, the base, become the warmed-up policy.
        On N ranks: the same batches and normaliser as one process, the gradients equal to float32
        rounding, the weights close but not bit-identical (lgrpo.distributed: what equals what).
        """
        cfg = self.cfg.sft
        if cfg.steps == 0:
            return []
        optimizer = build_optimizer(self.policy, self.cfg.optim, lr=cfg.lr)
        order = PromptOrder(
            self.task.num_prompts("train"), cfg.batch_size, self.cfg.train.seed + 1, self.cfg.data.swap_augment
        )
        logger = None
        # Piped output gets a line every tenth of the warm-up instead of a bar (lgrpo.metrics).
        every = max(cfg.steps // 10, 1) if self.dist.is_main and self.cfg.run.progress else 0
        if every and show_progress_bar(True):
            from tqdm.auto import tqdm

            logger, every = tqdm(total=cfg.steps, desc="sft warm-up", dynamic_ncols=True), 0
        losses = []
        for _ in range(cfg.steps):
            indices, swaps = order.next()
            per_rank = len(indices) // self.dist.world_size
            mine = slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
            prompts = self.task.prompts("train", indices[mine], swaps[mine]).to(self.device)
            ids, mask = encode_completions(self.task.tokenizer, self.task.sft_targets(prompts),
                                           self.task.tokenizer.eos_token_id, device=self.device)
            batch = GroupBatch.grouped(prompts, ids, mask, 1)
            global_tokens = float(D.all_reduce_sum(mask.sum().double()))
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            mb = self.cfg.loss.micro_batch_size
            for lo in range(0, ids.shape[0], mb):
                rows = torch.arange(lo, min(lo + mb, ids.shape[0]))
                part = batch.select(rows).trim()
                sub_mask = part.completion_mask
                logp = self.scorer(part)
                loss = -(logp * sub_mask).sum() / global_tokens
                (loss * self.dist.world_size).backward()
                total += loss.detach().double()
            loss_value = float(D.all_reduce_sum(total))
            norm, stepped = self.gradient_step(optimizer, loss_value)
            if not stepped:
                raise NonFiniteError(
                    f"warm-up step {len(losses) + 1}: non-finite loss ({loss_value}) or "
                    f"gradient norm ({norm}); the weights were not updated"
                )
            losses.append(loss_value)
            if logger is not None:
                logger.update(1)
                logger.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            elif every and len(losses) % every == 0:
                print(f"warm-up {len(losses)}/{cfg.steps} loss {loss_value:.3f}", flush=True)
        if logger is not None:
            logger.close()
        del optimizer
        if has_adapters(self.policy):  # the warmed-up policy becomes the base: reference and listener (lgrpo.lora)
            merge_adapters(self.policy, seed=self.cfg.train.seed + 1)  # fresh adapters: another draw than the start's
        return losses

    def copy_policy_into(self, *frozen: nn.Module) -> None:
        """Load the policy's current weights into frozen models (plain or FSDP-sharded; any dtype)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )

        if not frozen:
            return
        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True))
        for m in frozen:
            # a copy each: set_model_state_dict writes into the dict it is given (a sharded model's DTensors),
            # so a replicated listener after a sharded reference was handed DTensors and refused them
            set_model_state_dict(m, dict(full), options=StateDictOptions(full_state_dict=True))

    # -- the loop -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The trainer's own part of a checkpoint (JSON): completed steps, data position, skips in a row."""
        return {"step": self.step, "data": self.order.state_dict(), "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.order.load_state_dict(state["data"])
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)

    def save(self) -> Path:
        return self.checkpointer.save(self.step)

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path``, or what ``checkpoint.resume`` names (``auto``: the newest checkpoint that verifies)."""
        verified = path is None
        if path is None:  # verified against its manifest; a damaged latest one falls back to an older one
            path = self.checkpointer.find(self.cfg.checkpoint.resume)
            if path is None:
                return False
        self.checkpointer.load(path, verified=verified)  # every registered state, this trainer's included
        if self.dist.is_main:
            print(f"[resume] from {path} at step {self.step}", flush=True)
        return True

    def fit(self, on_step=None) -> list[dict]:
        """Run to ``train.steps``: log every step, checkpoint every ``checkpoint.interval`` and at the end.

        On SIGTERM, SIGUSR1 or Ctrl-C (lgrpo.interrupt) the step in progress is finished, a checkpoint
        is saved and fit returns early with ``stopped_by`` set to the signal number.
        """
        cfg = self.cfg
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.dist.is_main,
            tensorboard=cfg.run.tensorboard,
            progress=cfg.run.progress,
            total_steps=cfg.train.steps,
            log_every=cfg.run.log_every,
            initial_step=self.step,
        )
        history = []
        try:
            with GracefulStop() as stop:
                while self.step < cfg.train.steps:
                    metrics = self.train_step()
                    self.step += 1
                    history.append(metrics)
                    self.logger.log(self.step, metrics)
                    if self.step % cfg.run.log_every == 0:
                        self.logger.write(format_step(self.step, cfg.train.steps, metrics))
                    # One all-reduce for both: a signal on any rank, and rank 0's metrics write failing.
                    signum, metrics_lost = agree_max(self.dist, stop.signum or 0, int(self.logger.failed))
                    self.stopped_by = signum or None
                    if metrics_lost:
                        self._stop_for_metrics()
                    interval = cfg.checkpoint.interval
                    saved = (interval and self.step % interval == 0) or self.step == cfg.train.steps
                    if saved or self.stopped_by is not None:
                        self._save_at_boundary()
                    if self.stopped_by is None and on_step is not None:
                        on_step(self, metrics)
                        # A signal during on_step (the periodic eval) stops here, not one full step later.
                        # Every rank ran on_step, so every rank asks the same number of times.
                        self.stopped_by = stop.agreed(self.dist)
                        if self.stopped_by is not None and not saved:
                            self._save_at_boundary()
                    if self.stopped_by is not None:
                        break
        finally:
            self.logger.close()
        return history

    def _stop_for_metrics(self) -> None:
        """metrics.jsonl could not be written on rank 0: save this step first (every rank), then stop."""
        what = self.logger.failure if self.dist.is_main else "rank 0 could not write metrics.jsonl"
        try:
            path = self.save()
        except CheckpointError as err:
            raise MetricsWriteError(f"{what}; the checkpoint of step {self.step} could not be saved either "
                                    f"({err})") from None
        raise MetricsWriteError(f"{what}. Step {self.step} is saved in {path} (its metrics row is printed "
                                f"above): free space there and run the same command again to resume")

    def _save_at_boundary(self) -> None:
        path = self.save()
        if self.stopped_by is not None and self.dist.is_main:
            print(f"[stop] saved step {self.step} to {path}; run the same command again to resume", flush=True)


def format_step(step: int, total: int, m: dict) -> str:
    def f(key, fmt=".3f"):
        v = m.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

    return (
        f"step {step}/{total} reward {f('reward')} fmt {f('reward/format', '.2f')} "
        f"acc {f('accuracy', '.2f')} "
        f"list {f('reward/listener', '.2f')} contra {f('contradiction', '.2f')} loss {f('loss', '.4f')} "
        f"kl {f('kl', '.4f')} clip {f('clip_frac', '.3f')} len {f('completion_len', '.1f')} "
        f"| rollout {f('time/rollout', '.1f')}s update {f('time/update', '.1f')}s"
    )
