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
from .checkpoint import Checkpointer, latest_checkpoint
from .config import JobConfig
from .engine import engine_for
from .group import GroupBatch, PromptBatch, Rollout, encode_completions
from .interrupt import GracefulStop
from .kernels import group_advantages
from .metrics import MetricsLogger, Timer, peak_memory_gib, reset_peak_memory, show_progress_bar
from .optim import build_optimizer, build_scheduler
from .rewards import Rewards
from .rollout import generate
from .scoring import CompletionScorer
from .task import Models, Task


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; raised before the optimizer touched the weights."""


# --- data order -----------------------------------------------------------------------------------


class PromptOrder:
    """Global prompt order: a seeded permutation per epoch, consumed ``per_step`` prompts at a time.

    The order depends only on (seed, epoch), never on the number of ranks; the state is two ints.
    ``swap`` flags (image-position augmentation) are a seeded function of (seed, epoch, index), or
    all False with ``swap=False``.
    """

    def __init__(self, n: int, per_step: int, seed: int, swap: bool = True):
        if n < 1:
            raise ValueError("the training split holds no prompts")
        self.n, self.per_step, self.seed, self.swap = n, per_step, seed, swap
        self.epoch, self.offset = 0, 0

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> tuple[list[int], list[bool]]:
        idx, swaps = [], []
        while len(idx) < self.per_step:
            perm = self._perm(self.epoch)
            take = min(self.per_step - len(idx), self.n - self.offset)
            chunk = perm[self.offset : self.offset + take].tolist()
            g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch + 1)
            flips = torch.rand(self.n, generator=g) < 0.5
            idx += chunk
            swaps += [bool(flips[i]) and self.swap for i in chunk]
            self.offset += take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return idx, swaps

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n:
            raise ValueError(
                f"the checkpoint's data order was over {state['n']} prompts, the data now holds "
                f"{self.n}: resume with the same data (a bad row need not be removed: with --data.on_bad_row "
                f"skip it keeps its place, is replaced when drawn and listed in bad_rows.jsonl)"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]




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
        # autocast. Either way the trainable (master) weights keep their own dtype.
        params_fp32 = next(self.policy.parameters()).dtype == torch.float32
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
        if cfg.loss.beta > 0 and models.reference is None:
            raise ValueError("--loss.beta > 0 needs a reference model (or set --loss.beta 0)")
        if models.reference is not None and cfg.loss.beta > 0:
            models.reference.requires_grad_(False).eval()
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
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, dist)
        self.step = 0  # completed GRPO steps
        self.stopped_by: int | None = None  # the signal that stopped fit() early (lgrpo.interrupt), if any
        self.skipped_in_a_row = 0
        self.logger: MetricsLogger | None = None
        if cfg.rollout.engine == "vllm":  # started now: eval and every rollout reuse it (lgrpo.vllm_rollout)
            from .vllm_rollout import engine_for as vllm_engine_for

            vllm_engine_for(self.policy, task.tokenizer, max_new_tokens=cfg.rollout.max_new_tokens,
                            stop=cfg.rollout.stop or None, dtype=cfg.model.dtype, seed=cfg.train.seed,
                            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)
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
        """G completions of every prompt, sampled by the seeded sampler (lgrpo.engine, or lgrpo.rollout
        with --rollout.engine hf), or by vLLM with per-prompt seeds (--rollout.engine vllm)."""
        r = self.cfg.rollout
        sampling = dict(temperature=r.temperature, top_p=r.top_p, seed=self.cfg.train.seed, step=self.step,
                        prompt_ids=prompt_ids, batch_size=r.batch_size)
        with D.gathered(self.scorer):
            if r.engine == "vllm":
                from .vllm_rollout import generate as vllm_generate

                return vllm_generate(self.policy, self.task.tokenizer, prompts, self.G,
                                     max_new_tokens=r.max_new_tokens, stop=r.stop or None, **sampling)
            if r.engine == "engine":
                engine = engine_for(self.policy, self.task.tokenizer, max_new_tokens=r.max_new_tokens,
                                    stop=r.stop or None)
                # every rank runs the same number of forwards (they may all-gather under FSDP)
                sync = D.all_reduce_max if self.dist.world_size > 1 else None
                return engine.generate(prompts, self.G, reduce_max=sync, **sampling)
            return generate(self.policy, self.task.tokenizer, prompts, self.G, max_new_tokens=r.max_new_tokens,
                            stop=r.stop, static_cache=r.static_cache, **sampling)

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
        """Per-token log-probs [N, C] of the completions under ``scorer``'s model (no grad)."""
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=self.device)
        mb = self.cfg.loss.micro_batch_size
        for lo in range(0, len(rollout), mb):
            rows = torch.arange(lo, min(lo + mb, len(rollout)))
            part = rollout.select(rows).trim()
            self.prompt_tokens["reference"] += part.prompt_tokens(scorer.shared_prefix)
            out[rows, : part.completion_ids.shape[1]] = scorer(
                part, temperature=self.cfg.rollout.temperature
            ).float()
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
        if cfg.loss_type in ("dapo", "bnpo"):
            # bnpo's "per token over the batch" is dapo with the global token count as num_items.
            loss_kwargs.update(loss_type="dapo", num_items=global_tokens)
        elif cfg.loss_type == "dr_grpo":
            loss_kwargs.update(loss_type="dr_grpo", max_len=self.cfg.rollout.max_new_tokens)
        else:
            loss_kwargs.update(loss_type="grpo")

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
            if cfg.loss_type in ("grpo", "dr_grpo"):
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

        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        grad_norm = (
            D.full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True)) if grads else torch.zeros(())
        )
        loss_value, norm_value = float(sums[0]), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            self._non_finite(loss_value, norm_value)
        else:
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(
                    self.policy.parameters(), self.cfg.optim.grad_clip, grad_norm, foreach=True
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_in_a_row = 0
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
            grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
            norm = D.full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))
            if not (math.isfinite(loss_value) and math.isfinite(float(norm))):
                raise NonFiniteError(
                    f"warm-up step {len(losses) + 1}: non-finite loss ({loss_value}) or "
                    f"gradient norm ({float(norm)}); the weights were not updated"
                )
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.policy.parameters(), self.cfg.optim.grad_clip, norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
            if logger is not None:
                logger.update(1)
                logger.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            elif every and len(losses) % every == 0:
                print(f"warm-up {len(losses)}/{cfg.steps} loss {loss_value:.3f}", flush=True)
        if logger is not None:
            logger.close()
        del optimizer
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
        return {"data": self.order.state_dict(), "skipped_in_a_row": self.skipped_in_a_row}

    def save(self) -> Path:
        return self.checkpointer.save(
            self.step, self.policy, self.optimizer, self.scheduler, self.state_dict()
        )

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path``, or what ``checkpoint.resume`` names (``auto``: the newest checkpoint that verifies)."""
        verified = path is None
        if path is None:  # verified against its manifest; a damaged latest one falls back to an older one
            path = self.checkpointer.find(self.cfg.checkpoint.resume)
            if path is None:
                return False
        state = self.checkpointer.load(path, self.policy, self.optimizer, self.scheduler, verified=verified)
        self.step = state["step"]
        self.order.load_state_dict(state["data"])
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
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
                    self.stopped_by = stop.agreed(self.dist)
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
