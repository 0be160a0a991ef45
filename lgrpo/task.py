"""The task: what the trainer needs from the data / model / reward pipeline, and the preference task.

:class:`Task` is the protocol the trainer and eval take (prompts, typed :class:`~lgrpo.rewards.Rewards`,
the warm-up's targets). :class:`PreferenceTask` is the method's task: pairs of images and a prompt →
reasoner prompts; completions → format, accuracy and listener rewards. :func:`build` makes it, the policy,
the frozen reference and the listener from a :class:`~lgrpo.config.JobConfig` (``python -m lgrpo.train``);
:func:`build_eval_task` makes the policy and the task ``python -m lgrpo.eval`` judges. Imported by the CLI,
eval and the experiments; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from . import distributed as D
from .config import JobConfig
from .frozen import frozen_dtype, frozen_layout
from .group import PromptBatch, Rollout
from .lora import AdaptersOff
from .rewards import Rewards
from .rollout.hf import clean_generation_config


class Task(Protocol):
    """What the trainer needs from the data / model / reward pipeline."""

    tokenizer: object

    def num_prompts(self, split: str) -> int:
        """Number of prompts of a split ("train", "eval")."""

    def prompts(self, split: str, indices: list[int], swap: list[bool] | None = None) -> PromptBatch:
        """The prompts (left padded, images once each), with the task's bookkeeping in ``extra``."""

    def rewards(self, rollout: Rollout) -> Rewards:
        """Per completion [N]: the total and its components, and optionally the contradiction statistic
        and the answer (:class:`~lgrpo.rewards.Rewards`). Completion ``n`` continues ``rollout.prompts``
        row ``rollout.group[n]``."""

    def sft_targets(self, prompts: PromptBatch) -> list[str]:
        """The templated reasoning + answer for each prompt (supervised warm-up)."""


@dataclass
class Models:
    """The pieces ``build`` hands the trainer: the trainable policy and the frozen reference (if any).

    ``reference_scorer``: set when the reference is the listener's module (lgrpo.frozen): the listener's
    scorer, already placed (under FSDP2 the module's one root), which the KL pass then uses too."""

    policy: nn.Module
    reference: nn.Module | None
    base: AdaptersOff | None = None
    """A LoRA policy's base (lgrpo.lora): the policy with its adapters disabled, the KL reference when
    ``reference`` is None; the trainer binds it to its scorer."""
    reference_scorer: nn.Module | None = None
    """The reference's scorer when it is another role's module (lgrpo.frozen: shared with the listener)."""


# --- the preference task ----------------------------------------------------------------------------------


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

    def rewards(self, rollout: Rollout) -> Rewards:
        from .rewards import compute_rewards

        fmt = self.batcher.fmt
        parsed = [self._parse(t, fmt) for t in rollout.texts]
        scores = None
        if self.listener is not None:
            # The reasoner prompts with their images, each once: the listener's shared prefix.
            scores = self.listener.score_group(rollout.prompts, rollout.group, [p.reasoning for p in parsed])
        preferred = torch.as_tensor(rollout.completion_prompts("preferred")).cpu()
        return compute_rewards(parsed, preferred, scores, self.weights)

    def sft_targets(self, prompts: PromptBatch) -> list[str]:
        from .synthetic import reference_completion

        return [reference_completion(ex, self.batcher.fmt) for ex in prompts.extra["examples"]]


def datasets(cfg: JobConfig) -> dict:
    """The training split and, unless ``--data.eval none``, the held-out one."""
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


# --- building it from the config ---------------------------------------------------------------------------


def policy_weights_dtype(cfg: JobConfig) -> str:
    """The dtype the policy's weights are held (and its rollouts decoded) in: fp32 master weights, or the
    compute dtype; a LoRA policy's base is frozen in the compute dtype (its adapters: lgrpo.lora)."""
    return "float32" if cfg.model.master_weights == "float32" and not cfg.model.lora_rank else cfg.model.dtype


def build(cfg: JobConfig, dist: D.Dist):
    """Policy, frozen reference and listener, and the task; everything on this rank's device.
    Returns ``(task, Models, listener)``."""
    try:
        from .batching import VLBatcher
        from .listener import Listener
        from .lora import lora_base
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
    base = lora_base(cfg, policy) if cfg.model.lora_rank else None  # the reference and listener, adapters off
    fmt = PromptFormat(listener_strip_verdict=cfg.reward.listener_strip_verdict)
    batcher = VLBatcher.from_pretrained(name, fmt, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    clean_generation_config(policy, batcher.tokenizer)
    frozen = frozen_layout(cfg)
    fsdp = D.use_fsdp(cfg.parallel.fsdp)
    reference = (
        load_reference(cfg.model.reference or name, dtype=frozen_dtype(cfg), **common)
        if "reference" in frozen.roles and not frozen.shared
        else None
    )
    listener = None
    if "listener" in frozen.base_roles:
        listener = Listener(policy, batcher, micro_batch_size=cfg.reward.listener_batch_size, scorer=base)
    elif "listener" in frozen.roles:
        lm = load_listener(cfg.model.listener or name, dtype=frozen_dtype(cfg), **common)
        listener = Listener(lm, batcher, micro_batch_size=cfg.reward.listener_batch_size,
                            shared_prefix=cfg.loss.shared_prefix, prefix_attention=cfg.loss.prefix_attention)
        # Shared, this is the reference's placement too; a separate reference is the trainer's to place.
        if frozen.placement("listener", cfg, fsdp) == "shard":
            D.shard(lm, root=listener.scorer)  # the scorer reads the lm_head outside the HF forward
    weights = RewardWeights(cfg.reward.w_format, cfg.reward.w_accuracy, cfg.reward.w_listener)
    task = PreferenceTask(batcher, datasets(cfg), listener, weights)
    if frozen.shared:  # one module, one scorer (one FSDP2 root) for the KL pass and the listener's
        return task, Models(policy, listener.model, reference_scorer=listener.scorer, base=base), listener
    return task, Models(policy, reference, base=base), listener


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
