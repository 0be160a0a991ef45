"""The training configuration: nested dataclasses, presets, CLI overrides, and the resolved file.

Every field has a docstring under it; ``python -m lgrpo.train --help`` prints them. Overrides are
``--section.field value`` (or ``--section.field=value``), applied on top of a preset
(``--preset qwen2.5-vl-3b``) or on top of a saved resolved config (``--config runs/x/config.json``).
Validation lives in each section's ``__post_init__`` and names the offending ``--section.field``, so
a typo or an impossible combination fails before any model is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the ``--section.field``."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"--{name}: {msg}")


def _one_of(value: Any, choices: tuple, name: str) -> None:
    _check(value in choices, name, f"must be one of {choices}, got {value!r}")


@dataclass
class ModelConfig:
    policy: str | None = None
    """Local Hugging Face folder of the policy (the reasoner). None: the tiny built-in Qwen2.5-VL."""

    reference: str | None = None
    """Folder of the frozen KL reference. None: the policy's initial weights (frozen copy)."""

    listener: str | None = None
    """Folder of the frozen listener. None: the policy's initial weights (frozen copy), as in the paper."""

    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16 (bf16 for real models on GPUs)."""

    attn_implementation: str = "auto"
    """Attention backend of the policy, the reference and the listener: auto (flash_attention_2 when
    flash_attn imports and the device is CUDA, else sdpa), sdpa, eager or flash_attention_2. The run's
    log and config.json name the one that ran."""

    master_weights: str = "float32"
    """Dtype of the trainable policy weights and optimizer state: float32 (compute in model.dtype through
    FSDP2 mixed precision or autocast), or "compute" (weights in model.dtype: half the memory, but lr 1e-6
    updates partly round away in bf16)."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory on long completions)."""

    lora_rank: int = 0
    """LoRA adapters of this rank train instead of the whole policy (lgrpo.lora; needs peft:
    pip install 'lgrpo[lora]'). The base stays frozen in model.dtype, and the KL reference and the listener
    (when no other folder is given) are the policy with its adapters disabled: no frozen copies. 0: off."""

    lora_alpha: float | None = None
    """LoRA's alpha: the adapters' output is scaled by lora_alpha / lora_rank (None: lora_rank, a scale of 1)."""

    lora_dropout: float = 0.0
    """Dropout on the adapters' input in the training passes."""

    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """The Linear layers that get adapters, comma-separated: plain names are the language model's (by the
    end of their module name); lm_head the output projection; visual.NAME (e.g. visual.qkv) the vision
    tower's. Everything not named stays frozen."""

    def __post_init__(self) -> None:
        _one_of(self.dtype, ("float32", "bfloat16"), "model.dtype")
        _check(self.lora_rank >= 0, "model.lora_rank", f"must be >= 0 (0: off), got {self.lora_rank}")
        _check(self.lora_alpha is None or self.lora_alpha > 0, "model.lora_alpha",
               f"must be > 0 or none, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank:
            from .extras import MissingExtra
            from .lora import parse_targets, require_peft  # torch, once LoRA is asked for

            try:
                parse_targets(self.lora_targets)
                require_peft()
            except (ValueError, MissingExtra) as err:
                name = "model.lora_rank" if isinstance(err, MissingExtra) else "model.lora_targets"
                raise ConfigError(f"--{name}: {err}") from None
        _one_of(self.master_weights, ("float32", "compute"), "model.master_weights")
        _one_of(
            self.attn_implementation, ("auto", "sdpa", "eager", "flash_attention_2"), "model.attn_implementation"
        )


@dataclass
class DataConfig:
    train: str = "synthetic"
    """Training prompts: a manifest path (see lgrpo.data), or "synthetic" (the built-in colour/shape task)."""

    eval: str = "synthetic"
    """Held-out prompts for the before/after evaluation: a manifest path, "synthetic", or "none"."""

    synthetic_train_size: int = 512
    """Number of synthetic training pairs (only with data.train = synthetic)."""

    synthetic_eval_size: int = 64
    """Number of synthetic held-out pairs (only with data.eval = synthetic)."""

    eval_size: int | None = None
    """Evaluate on at most this many held-out pairs (None: all)."""

    swap_augment: bool = True
    """Randomly swap the two images (and the label) of each training pair, in GRPO and the warm-up:
    counters position bias. false: every pair in its manifest order."""

    min_pixels: int | None = None
    """Smallest area (pixels) an image is resized to before patchifying (None: the model folder's
    preprocessor_config.json). The value used is written to the run's config.json."""

    max_pixels: int | None = None
    """Largest area (pixels) an image is resized to: the main cost knob, each 28x28 area (Qwen2/2.5-VL;
    32x32 for Qwen3-VL) is one visual token (None: the folder's value, for Qwen2.5-VL 12845056, i.e. ~1.3k
    tokens for a 1024x1024 image; e.g. 262144 caps a Qwen2.5-VL image at 334 tokens). The value used is
    written to the run's config.json."""

    on_bad_row: str = "skip"
    """A manifest row that cannot be used (unreadable or truncated image, an image too large or too
    elongated, a prompt holding a special token, too long for the model): skip (replace it by the next good
    row and list it in the run's bad_rows.jsonl) or stop (fail, naming the file and line). Rows found at
    start-up are checked from the image headers; the rest are found when first drawn."""

    def __post_init__(self) -> None:
        _check(
            bool(self.train) and self.train != "none", "data.train", "needs a manifest path or 'synthetic'"
        )
        _check(
            self.synthetic_train_size >= 1,
            "data.synthetic_train_size",
            f"must be >= 1, got {self.synthetic_train_size}",
        )
        _check(
            self.synthetic_eval_size >= 1,
            "data.synthetic_eval_size",
            f"must be >= 1, got {self.synthetic_eval_size}",
        )
        _check(
            self.eval_size is None or self.eval_size >= 1,
            "data.eval_size",
            f"must be >= 1, got {self.eval_size}",
        )
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"data.{name}", f"must be >= 1 or none, got {value}")
        _check(
            self.min_pixels is None or self.max_pixels is None or self.min_pixels <= self.max_pixels,
            "data.min_pixels",
            f"({self.min_pixels}) must be <= data.max_pixels ({self.max_pixels})",
        )
        _one_of(self.on_bad_row, ("skip", "stop"), "data.on_bad_row")


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: completions sampled per prompt; advantages are normalised within each group."""

    temperature: float = 1.0
    """Sampling temperature; the loss uses the same temperature so old/new log-probs match the sampler."""

    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: sample from the full distribution, as GRPO's ratio assumes)."""

    max_new_tokens: int = 512
    """Maximum completion length; generation also stops at the stop string or EOS."""

    stop: str = "</answer>"
    """Generation stops once a completion contains this string (kept in the completion)."""

    batch_size: int | None = None
    """Completions per generate() call on each rank (None: all of the rank's G x prompts at once)."""

    static_cache: bool = False
    """hf engine only: preallocated KV cache; on CUDA, transformers then compiles the decode step (about a
    minute the first time, and again for a longer cache or another batch size; keep batch_size fixed).
    Same tokens as without. Not yet measured by this project (SPEC §4: 1690 vs 337 tok/s, plain HF)."""

    engine: str = "engine"
    """Rollouts (and greedy evaluation) through lgrpo.rollout.engine (prefill once per prompt, KV fork, decode
    step on the device, CUDA graphs on a GPU) or "hf" (transformers generate, lgrpo.rollout.hf), or "vllm"
    (an in-process vLLM engine beside the policy, lgrpo.rollout.vllm; needs the vllm extra). Greedy:
    the same tokens; sampled: the same distribution (different draws unless top_p < 1; vLLM's are its own)."""

    vllm_gpu_memory_utilization: float = 0.3
    """vllm engine on CUDA only: the fraction of GPU memory vLLM may take (its weights + KV cache); the rest
    stays for training."""

    def __post_init__(self) -> None:
        _check(
            self.group_size >= 2,
            "rollout.group_size",
            f"must be >= 2 (advantages are relative within a group), got {self.group_size}",
        )
        _check(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(
            self.batch_size is None or self.batch_size >= 1,
            "rollout.batch_size",
            f"must be >= 1, got {self.batch_size}",
        )
        _one_of(self.engine, ("engine", "hf", "vllm"), "rollout.engine")
        if self.engine == "vllm":
            from .extras import advice

            missing_vllm = advice("vllm", "--rollout.engine vllm")
            _check(missing_vllm is None, "rollout.engine", missing_vllm or "")
        _check(0 < self.vllm_gpu_memory_utilization < 1, "rollout.vllm_gpu_memory_utilization",
               f"must be in (0, 1), got {self.vllm_gpu_memory_utilization}")


@dataclass
class RewardConfig:
    w_format: float = 1.0
    """Weight of r_fmt (exactly one think block and one answer block holding 1 or 2)."""

    w_accuracy: float = 0.5
    """Weight of r_acc (the answer equals the human-preferred image)."""

    w_listener: float = 0.5
    """Weight of r_list (the frozen listener's confidence in the correct image). 0 disables the listener."""

    listener_batch_size: int = 16
    """Completions the listener scores per forward pass."""

    listener_strip_verdict: bool = False
    """The listener reads the reasoning without a trailing verdict sentence ("... image 2 is better."), so
    its confidence measures the evidence, not a copied verdict (lgrpo.prompts.strip_verdict)."""

    def __post_init__(self) -> None:
        for name in ("w_format", "w_accuracy", "w_listener"):
            _check(getattr(self, name) >= 0, f"reward.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(
            self.listener_batch_size >= 1,
            "reward.listener_batch_size",
            f"must be >= 1, got {self.listener_batch_size}",
        )


LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
# lgrpo.attention.CHOICES, spelled out so the config imports no torch (a test holds them equal).
PREFIX_ATTENTION = ("auto", "sdpa", "flex", "varlen")


@dataclass
class LossConfig:
    eps_low: float = 0.2
    """Lower clip range: the ratio is clipped to [1 - eps_low, 1 + eps_high]."""

    eps_high: float = 0.2
    """Upper clip range (DAPO's clip-higher uses a larger value, e.g. 0.28)."""

    delta: float | None = None
    """Two-sided clipping: cap the unclipped ratio at delta (>= 1); None disables it."""

    beta: float = 0.04
    """KL (k3) coefficient to the frozen reference; 0 skips the reference forward entirely."""

    loss_type: str = "dapo"
    """Aggregation: grpo (per-sequence mean), bnpo/dapo (per-token over the global batch), dr_grpo."""

    importance_level: str = "token"
    """Importance ratio per token (GRPO) or per sequence (GSPO)."""

    advantage_scale: str = "group"
    """Advantage normalisation: group std, batch std, or none (mean-centred only)."""

    epochs: int = 1
    """mu: passes over each batch of rollouts. > 1 captures the behaviour log-probs first."""

    minibatches: int = 1
    """Optimizer steps per pass: the rollout batch is split into this many minibatches."""

    micro_batch_size: int = 8
    """Completions per forward/backward on each rank (gradient accumulation below a minibatch)."""

    fused: bool = True
    """linear_grpo_loss on the final hidden states (never the full logits); False: grpo_loss on logits."""

    chunk_size: int | None = None
    """Row chunk of linear_grpo_loss (None: the kernel's default)."""

    shared_prefix: bool = True
    """Compute each prompt (and its images) once per micro-batch for all its completions, in the reference,
    old-log-prob and update passes and the listener (same numbers); false: the prompt repeated per completion."""

    prefix_attention: str = "auto"
    """The shared-prefix attention's kernels (same numbers): auto (FlashAttention varlen on a GPU in 16-bit,
    once it passes a start-up check against the reference; else sdpa), sdpa (two SDPA calls, any device),
    flex (compiled FlexAttention with a block mask; on CPU no gradients), varlen (FlashAttention varlen, CUDA)."""

    def __post_init__(self) -> None:
        _check(
            self.eps_low >= 0 and self.eps_low < 1, "loss.eps_low", f"must be in [0, 1), got {self.eps_low}"
        )
        _check(self.eps_high >= 0, "loss.eps_high", f"must be >= 0, got {self.eps_high}")
        _check(self.delta is None or self.delta >= 1, "loss.delta", f"must be >= 1 or none, got {self.delta}")
        _check(self.beta >= 0, "loss.beta", f"must be >= 0, got {self.beta}")
        _one_of(self.loss_type, LOSS_TYPES, "loss.loss_type")
        _one_of(self.importance_level, ("token", "sequence"), "loss.importance_level")
        _one_of(self.advantage_scale, ("group", "batch", "none"), "loss.advantage_scale")
        _one_of(self.prefix_attention, PREFIX_ATTENTION, "loss.prefix_attention")
        _check(self.epochs >= 1, "loss.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.minibatches >= 1, "loss.minibatches", f"must be >= 1, got {self.minibatches}")
        _check(
            self.micro_batch_size >= 1, "loss.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}"
        )
        _check(
            self.chunk_size is None or self.chunk_size >= 1,
            "loss.chunk_size",
            f"must be >= 1, got {self.chunk_size}",
        )

    @property
    def off_policy(self) -> bool:
        """True when some minibatch is updated after the weights have already moved this step."""
        return self.epochs > 1 or self.minibatches > 1


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate of AdamW."""

    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and norm weights)."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.999
    """AdamW beta2."""

    eps: float = 1e-8
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping; the norm is still logged)."""

    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: cosine (to min_lr_ratio x lr) or constant."""

    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""

    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of lr."""

    def __post_init__(self) -> None:
        # Adam moves each weight by about lr per step: above 1 no model trains (1e300 overflows).
        _check(0 < self.lr <= 1, "optim.lr", f"must be in (0, 1], got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _one_of(self.schedule, ("cosine", "constant"), "optim.schedule")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(
            0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        )


@dataclass
class SFTConfig:
    steps: int = 0
    """Supervised warm-up steps on templated reasoning before GRPO: the output format, and for the synthetic
    task the image descriptions the answer depends on. 0: none."""

    batch_size: int = 16
    """Examples per supervised step (global, split over ranks)."""

    lr: float = 1e-3
    """Learning rate of the warm-up (constant, AdamW)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "sft.steps", f"must be >= 0, got {self.steps}")
        _check(self.batch_size >= 1, "sft.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(0 < self.lr <= 1, "sft.lr", f"must be in (0, 1], got {self.lr}")


@dataclass
class TrainConfig:
    steps: int = 100
    """GRPO steps (one rollout batch each)."""

    prompts_per_step: int = 16
    """Prompts per step over all ranks; the global batch is prompts_per_step x group_size completions.
    Must divide by the number of ranks; the global batch never depends on it."""

    seed: int = 0
    """Seed of the data order, the model initialisation of the tiny model and the sampler."""

    on_nonfinite: str = "stop"
    """A non-finite loss or gradient norm: stop (raise, naming the step) or skip (drop the update, go on)."""

    max_skips: int = 3
    """With on_nonfinite = skip: stop after this many consecutive skipped steps."""

    eval_every: int = 0
    """Held-out evaluation every this many steps (0: only before and after training)."""

    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, or cuda."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "train.steps", f"must be >= 0, got {self.steps}")
        _check(
            self.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}"
        )
        _one_of(self.on_nonfinite, ("stop", "skip"), "train.on_nonfinite")
        _check(self.max_skips >= 1, "train.max_skips", f"must be >= 1, got {self.max_skips}")
        _check(self.eval_every >= 0, "train.eval_every", f"must be >= 0, got {self.eval_every}")
        _one_of(self.device, ("auto", "cpu", "cuda"), "train.device")


@dataclass
class CheckpointConfig:
    interval: int = 50
    """Save a checkpoint every this many GRPO steps (and always after the last step). 0: only at the end."""

    keep: int = 2
    """Keep the latest k complete checkpoints; older ones are deleted."""

    resume: str = "auto"
    """auto (latest complete checkpoint of this run folder, if any), none, or a step folder to load."""

    export: bool = True
    """After training, export the policy as a safetensors folder (from_pretrained loads it) under final/."""

    def __post_init__(self) -> None:
        _check(self.interval >= 0, "checkpoint.interval", f"must be >= 0, got {self.interval}")
        _check(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")
        _check(bool(self.resume), "checkpoint.resume", "must be auto, none or a path")


@dataclass
class ParallelConfig:
    fsdp: str = "auto"
    """Shard the policy with FSDP2 fully_shard: auto (when launched with torchrun), on, off (one process only)."""

    reference: str = "replicate"
    """The frozen reference on each rank: replicate (a full copy) or shard (FSDP2, saves memory)."""

    listener: str = "replicate"
    """The frozen listener on each rank: replicate or shard."""

    frozen: str = "auto"
    """One module for the frozen reference and listener: auto (when they are the same weights in the same
    dtype: the same folder, or both copies of the policy's start or warm-up), shared (refused where they
    are not) or separate (two copies). A shared one is sharded when both say shard, else replicated. The
    run's banner and config.json say which was done (auto resolved)."""

    backend: str = "auto"
    """Process-group backend: auto (nccl on GPUs, gloo on CPU), nccl or gloo."""

    timeout_s: int = 1800
    """Seconds a collective waits for the other ranks (a hung, stopped or dead rank) before the run stops
    with an error naming the phase it stalled in."""

    def __post_init__(self) -> None:
        _check(self.timeout_s >= 1, "parallel.timeout_s", f"must be >= 1, got {self.timeout_s}")
        _one_of(self.fsdp, ("auto", "on", "off"), "parallel.fsdp")
        _one_of(self.reference, ("replicate", "shard"), "parallel.reference")
        _one_of(self.listener, ("replicate", "shard"), "parallel.listener")
        _one_of(self.frozen, ("auto", "shared", "separate"), "parallel.frozen")
        _one_of(self.backend, ("auto", "nccl", "gloo"), "parallel.backend")


@dataclass
class RunConfig:
    dir: str = "runs"
    """Parent folder of the runs."""

    name: str | None = None
    """Run folder under run.dir (None: a timestamp). Re-using a name resumes it (checkpoint.resume auto)."""

    tensorboard: str = "auto"
    """TensorBoard event files: auto (when tensorboard is installed), on, or off."""

    progress: bool = True
    """A tqdm progress bar on rank 0."""

    log_every: int = 1
    """Print a one-line summary every this many steps (JSONL gets every step regardless)."""

    allow_config_change: bool = False
    """Resume a run folder whose config.json differs from this config (the old one is kept as
    config.<time>.json). Without it, reusing a run name with other values is refused."""

    def __post_init__(self) -> None:
        _one_of(self.tensorboard, ("auto", "on", "off"), "run.tensorboard")
        _check(self.log_every >= 1, "run.log_every", f"must be >= 1, got {self.log_every}")
        _check(
            self.name is None or ("/" not in self.name and self.name not in ("", ".", "..")),
            "run.name",
            f"must be a plain folder name, got {self.name!r}",
        )


@dataclass
class JobConfig:
    preset: str = "tiny"
    """Preset of the defaults: tiny (built-in model, synthetic task) or a published model's name:
    qwen2.5-vl-3b, qwen2.5-vl-7b, qwen3-vl-4b, qwen3-vl-8b (lgrpo.models)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _one_of(self.preset, tuple(PRESETS), "preset")
        # Cross-section checks: each names the fields involved.
        if self.preset != "tiny":
            _check(
                self.model.policy is not None,
                "model.policy",
                f"preset {self.preset} needs the local folder of the pretrained weights "
                f"(e.g. --model.policy /models/{_folder_hint(self.preset)})",
            )
        _check(
            self.data.train != "synthetic" or self.data.synthetic_train_size >= self.train.prompts_per_step,
            "data.synthetic_train_size",
            f"({self.data.synthetic_train_size}) must be >= train.prompts_per_step "
            f"({self.train.prompts_per_step})",
        )
        # The warm-up's targets are the synthetic task's templated reasoning, written from its captions of
        # what each image shows; a manifest has no captions, so the warm-up would crash after minutes.
        _check(
            self.sft.steps == 0 or self.data.train == "synthetic",
            "sft.steps",
            f"({self.sft.steps}) > 0 with --data.train {self.data.train}: the supervised warm-up trains on the "
            f"synthetic task's templated reasoning, which needs captions of what each image shows, and a "
            f"manifest has none. Pass --sft.steps 0 and start from a policy that already writes the format "
            f"(<think>...</think><answer>1|2</answer>), or train on --data.train synthetic",
        )
        # vLLM is pushed the policy's weights by name; an adapted policy's are the base and the adapters.
        _check(
            not (self.model.lora_rank and self.rollout.engine == "vllm"),
            "rollout.engine",
            "vllm with --model.lora_rank: the vLLM engine takes a plain policy's weights; use the engine or hf",
        )
        # Minibatch m holds samples g with g % minibatches == m of every prompt: the same global
        # minibatch on any number of ranks, and equal sizes when G divides.
        _check(
            self.rollout.group_size % self.loss.minibatches == 0,
            "loss.minibatches",
            f"({self.loss.minibatches}) must divide rollout.group_size ({self.rollout.group_size})",
        )

    def pointless(self) -> list[str]:
        """Settings that run but cannot do what they are set for: warned about at start-up, not refused
        (a user may mean them, e.g. to time a step)."""
        out = []
        if self.loss.beta == 0 and self.model.reference is not None:
            out.append(f"--model.reference {self.model.reference} is set but --loss.beta is 0: no KL term, the "
                       "reference is never loaded. Set --loss.beta > 0 to use it")
        if self.reward.w_format == self.reward.w_accuracy == self.reward.w_listener == 0:
            out.append("every reward weight (--reward.w_format, w_accuracy, w_listener) is 0: every advantage "
                       "is 0, so GRPO changes nothing (only a KL term, if any, moves the policy)")
        return out

    def validate_world(self, world_size: int) -> None:
        """Checks that need the number of ranks (known only after the process group is up)."""
        _check(
            self.train.prompts_per_step % world_size == 0,
            "train.prompts_per_step",
            f"({self.train.prompts_per_step}) must divide by the number of ranks ({world_size}) so the "
            f"global batch stays the same on any number of ranks",
        )
        _check(
            self.sft.steps == 0 or self.sft.batch_size % world_size == 0,
            "sft.batch_size",
            f"({self.sft.batch_size}) must divide by the number of ranks ({world_size})",
        )
        # Without FSDP nothing all-reduces the gradients: each rank would train its own copy on its own
        # prompts, and the checkpoint would keep rank 0's.
        _check(
            world_size == 1 or self.parallel.fsdp != "off",
            "parallel.fsdp",
            f"off under torchrun ({world_size} processes) would train unsynchronised copies: use auto, or "
            f"launch one process",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- presets -----------------------------------------------------------------------------------------


def _tiny() -> dict:
    """The default run: tiny built-in model, synthetic task, SFT warm-up then GRPO; minutes on 2 CPU cores."""
    return {
        "model": {"dtype": "float32"},
        "rollout": {"group_size": 8, "temperature": 1.0, "max_new_tokens": 48},
        "loss": {"beta": 0.04, "micro_batch_size": 32},
        "optim": {"lr": 3e-4, "warmup_steps": 2, "schedule": "constant"},
        # The warm-up is where the tiny model learns to read the prompt and the images; 120 steps was too
        # short even to copy the prompt, so GRPO started from a constant "1". Measured on seed 0 (seeds 1
        # and 2 alike), held-out, greedy: by ~500 steps the prompt and the colours are right; by ~750
        # steps the shapes are too, but the verdict ("image k matches") is still at chance. It turns
        # right between ~750 and 1000 steps (0.81-0.88), and is 0.84-0.94 at 1250. GRPO can't learn
        # that step in the CPU budget: 150 steps started from 600 warm-up steps stayed at chance.
        # 1250 steps take ~70 s on 2 CPU cores.
        "sft": {"steps": 1250, "batch_size": 16, "lr": 1e-3},
        "train": {"steps": 30, "prompts_per_step": 8},
        "checkpoint": {"interval": 10, "keep": 2},
    }


def _qwen(size: str) -> dict:
    """SPEC §1 defaults for the real models: G = 8, lr 1e-6, beta 0.04, eps 0.2, T = 1.0, 512 tokens; from
    7B on, gradient checkpointing and smaller update micro-batches."""
    large = float(size.rstrip("b")) >= 7
    return {
        "model": {"dtype": "bfloat16", "gradient_checkpointing": large},
        "data": {"train": "synthetic", "eval": "synthetic"},
        "rollout": {"group_size": 8, "temperature": 1.0, "max_new_tokens": 512, "batch_size": 64},
        "reward": {"listener_batch_size": 16},
        "loss": {"eps_low": 0.2, "eps_high": 0.2, "beta": 0.04, "micro_batch_size": 4 if large else 8},
        "optim": {"lr": 1e-6, "warmup_steps": 10, "schedule": "cosine", "weight_decay": 0.0},
        "sft": {"steps": 0},
        "train": {"steps": 500, "prompts_per_step": 16},
        "checkpoint": {"interval": 50, "keep": 2},
        "parallel": {"reference": "shard", "listener": "shard"},
    }


def _size(preset: str) -> str:
    """A published name's size: ``qwen2.5-vl-7b`` -> ``7b``."""
    return preset.rsplit("-", 1)[1]


def _folder_hint(preset: str) -> str:
    """The Hub folder name of a published preset: ``qwen2.5-vl-7b`` -> ``Qwen2.5-VL-7B-Instruct``."""
    from .models import published

    family = published()[preset][0]
    return f"{family.name}-{_size(preset).upper()}-Instruct"


def _presets() -> dict:
    from .models import published

    return {"tiny": _tiny, **{name: functools.partial(_qwen, _size(name)) for name in published()}}


PRESETS = _presets()


# --- building from dictionaries and the command line ---------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(text: str, tp: Any, name: str) -> Any:
    """Turn a CLI string into a value of the field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, args[0], name)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expected true/false, got {text!r}")
    if tp in (int, float):
        try:
            value = tp(text)
        except ValueError:
            # Accept 1e3 for an int field only when it is integral.
            if tp is int:
                try:
                    as_float = float(text)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    return int(as_float)
            raise ConfigError(f"--{name}: expected {tp.__name__}, got {text!r}") from None
        return _finite(value, name)  # outside the try: a ConfigError is a ValueError too
    return text


def _finite(value, name: str):
    """No option means anything at inf or nan: refused here, once for every float option, rather than a
    step later as "the model has diverged" or an overflow traceback."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--{name}: must be a finite number, got {value}")
    return value


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert a value from a JSON file or a preset against the field's type."""
    if isinstance(value, str):
        return _parse_value(value, tp, name) if tp is not str else value
    origin = typing.get_origin(tp)
    allowed = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"--{name}: may not be none")
    for a in allowed:
        if a is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), name)
        if a is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if a is bool and isinstance(value, bool):
            return value
    raise ConfigError(f"--{name}: expected {tp}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown option(s) {sorted(prefix + u for u in unknown)} in {where}; "
            f"known: {sorted(prefix + n for n in names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = values[f.name]
            if not isinstance(sub, dict):
                raise ConfigError(
                    f"--{prefix}{f.name}: is a section; set its fields as --{prefix}{f.name}.FIELD"
                )
            kwargs[f.name] = _build(tp, sub, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(values[f.name], tp, prefix + f.name)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(tree: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {p} is not a section")
    node[parts[-1]] = value


def build_config(preset: str = "tiny", overrides: dict | None = None) -> JobConfig:
    """A JobConfig from a preset plus (nested) overrides; raises ConfigError naming a bad field."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset: must be one of {tuple(PRESETS)}, got {preset!r}")
    values = _merge(PRESETS[preset](), overrides or {})
    values["preset"] = preset
    return _build(JobConfig, values)


def load_config(path: str | Path, overrides: dict | None = None) -> JobConfig:
    """A saved resolved config (config.json of a run), with optional overrides on top."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it: {err}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--config {path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a JSON object (a run's config.json), got "
                          f"{type(values).__name__}")
    return _build(JobConfig, _merge(values, overrides or {}))


def save_config(cfg: JobConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tmp.replace(path)


# --- help text from the field docstrings ----------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text(cfg: JobConfig | None = None, prog: str = "python -m lgrpo.train") -> str:
    cfg = cfg or build_config()
    lines = [
        f"usage: {prog} [--preset NAME | --config FILE] [--section.field VALUE ...]",
        "",
        f"presets: {', '.join(PRESETS)} (default tiny: the built-in model on the synthetic task)",
        "--config FILE: start from a saved resolved config (a run's config.json)",
        "",
    ]
    for f in dataclasses.fields(JobConfig):
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value):
            continue
        lines.append(f"[{f.name}]")
        docs = field_docs(type(value))
        for sub in dataclasses.fields(value):
            lines.append(f"  --{f.name}.{sub.name} (default {getattr(value, sub.name)!r})")
            if sub.name in docs:
                lines.extend("      " + line for line in textwrap.wrap(docs[sub.name], 90))
        lines.append("")
    return "\n".join(lines)


def option_names() -> list[str]:
    """Every ``section.field`` the command line accepts."""
    hints = _hints(JobConfig)
    return [f"{name}.{sub.name}" for name, tp in hints.items() if dataclasses.is_dataclass(tp)
            for sub in dataclasses.fields(tp)]


def _check_option(key: str) -> None:
    """An unknown ``--key`` is named as such (not as a missing value), with the closest known ones."""
    import difflib

    names = option_names()
    if key in names:
        return
    sections = sorted({n.split(".")[0] for n in names})
    if key in sections:
        raise ConfigError(f"--{key}: is a section; set its fields as --{key}.FIELD (see --help)")
    close = difflib.get_close_matches(key, names + ["preset", "config"], n=3, cutoff=0.6)
    if not close and "." not in key:  # a bare field name: the sections that hold it
        close = [n for n in names if n.endswith("." + key)]
    hint = (f"the closest known: {', '.join('--' + c for c in close)}" if close
            else f"known options are --SECTION.FIELD with SECTION one of {', '.join(sections)}")
    raise ConfigError(f"unknown option --{key}; {hint} (--help lists every option)")


def parse_args(argv: list[str] | None = None, prog: str = "python -m lgrpo.train") -> JobConfig:
    """``[--preset NAME | --config FILE] --section.field value ...`` → a validated JobConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(prog=prog))
        raise SystemExit(0)
    preset, config_file, overrides = None, None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --section.field VALUE")
        key, eq, value = arg[2:].partition("=")
        if key not in ("preset", "config"):
            _check_option(key)
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key}: missing value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "preset":
            preset = value
        elif key == "config":
            config_file = value
        else:
            _set_path(overrides, key, value)
    if preset is not None and config_file is not None:
        raise ConfigError("--preset and --config are exclusive: a saved config already holds its preset")
    if config_file is not None:
        return load_config(config_file, overrides)
    return build_config(preset or "tiny", overrides)
