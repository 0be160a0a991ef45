"""A memory plan before anything loads: what one rank holds, from the model folder's ``config.json`` alone.

``plan(cfg, world_size)`` counts the policy's parameters on the meta device (no weights read, no memory
taken) and adds up, per rank: the policy's weights, gradients and AdamW state (sharded by FSDP2 over the
ranks, or whole), the frozen reference and listener (one module when they are the same weights: the
build's rule, lgrpo.frozen), what a rollout adds (the policy gathered whole under FSDP2, the engine's KV
cache and one step's logits) and what the update adds (the saved activations of one micro-batch). The peak
is the larger of the two phases on top of what stays resident.

Activations are bytes saved for the backward per token and per layer, for transformers' Qwen2.5-VL layers
with sdpa attention (the other families' decoder layers compute the same shapes; Qwen3-VL's adds a q/k
norm), as counted with ``torch.autograd.graph.saved_tensors_hooks`` (``tests/test_plan.py`` counts them
again on fresh shapes). For a decoder layer with element size e (2 for bf16, 4 for fp32):

    h·(8e + 4·[e < 4]) + 4e·i + 2e·kv_heads·head_dim + 4·heads + 8

(h hidden, i intermediate: the norms' inputs and outputs, the extra fp32 copy a half-precision RMSNorm
makes, the four MLP tensors of width i, keys and values, the attention's fp32 log-sum-exp per head, the
norms' fp32 reciprocal roots); a vision block saves 5e·h more per patch (its fused qkv and rotary inputs).
With gradient checkpointing each layer keeps only its input (h·e per token) and one layer is recomputed
at a time: an estimate from that structure, not measured (the tests measure the plain case).

Not counted: the allocator's fragmentation and the CUDA context (about 0.5 GiB), kernels' workspaces, the
listener's and the reference's forward (no gradient: one layer's activations at a time), and the vLLM
engine's own pool (``--rollout.vllm_gpu_memory_utilization`` of the device).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .frozen import frozen_dtype, frozen_layout
from .models import DEFAULT, family_named, published

GiB = 2**30
_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shapes:
    """What the plan needs of a vision-language model, read from its config.json."""

    params: int
    vision_params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    patch: int
    merge: int

    @property
    def pixels_per_token(self) -> int:
        """Image area (pixels) per visual token after the spatial merge (28 × 28 for Qwen2.5-VL, 32 × 32 for
        Qwen3-VL)."""
        return (self.patch * self.merge) ** 2


# The published shapes of each family's models (lgrpo.models), so that a plan needs no download.
PUBLISHED = {name: shapes for name, (_, shapes) in published().items()}


def read_shapes(model: str | Path | dict) -> Shapes:
    """Shapes of a model folder (its config.json), of a name in ``PUBLISHED``, or of a config dictionary;
    the parameters are counted on the meta device (nothing allocated, no weights read)."""
    family, config, built = _meta_model(model)
    text, vision = config.text_config, config.vision_config
    heads = text.num_attention_heads
    return Shapes(
        params=sum(p.numel() for p in built.parameters()),
        vision_params=sum(p.numel() for p in family.vision_tower(built).parameters()),
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
        heads=heads, kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        **family.vision_shapes(vision),
    )


def _meta_model(model: str | Path | dict):
    """The family, the config and the model (a folder, a name in ``PUBLISHED`` or a config dictionary) built
    by its family on the meta device (nothing allocated, nothing in the folder runs: a dictionary only)."""
    import torch

    from .model import model_dir

    if isinstance(model, dict):
        raw, family = model, family_named(model.get("model_type", DEFAULT.model_type))
    elif str(model) in PUBLISHED:
        family, raw = published()[str(model)]
    else:
        raw = json.loads((model_dir(model) / "config.json").read_text(encoding="utf-8"))
        family = family_named(raw.get("model_type"), str(model))
    config = family.config_class()(**{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        return family, config, family.model_class()._from_config(config)


def adapter_params(model: str | Path | dict, targets: str, rank: int) -> int:
    """Parameters of ``--model.lora_targets`` adapters at ``rank`` (lgrpo.lora), counted on the meta device."""
    from .lora import adapter_numel

    return adapter_numel(_meta_model(model)[2], targets, rank)


def layer_activation_bytes(s: Shapes, e: int) -> int:
    """Bytes a decoder layer saves for the backward, per token (the module docstring's formula)."""
    return (s.hidden * (8 * e + (4 if e < 4 else 0)) + 4 * e * s.intermediate
            + 2 * e * s.kv_heads * s.head_dim + 4 * s.heads + 8)


def vision_activation_bytes(s: Shapes, e: int) -> int:
    """Bytes a vision block saves for the backward, per patch."""
    h, i = s.vision_hidden, s.vision_intermediate
    return h * (13 * e + (4 if e < 4 else 0)) + 4 * e * i + 4 * s.vision_heads + 8


def update_activation_bytes(s: Shapes, e: int, *, prompts: int, prompt_len: int, completions: int,
                            completion_len: int, patches: int, backend: str = "sdpa",
                            checkpointing: bool = False, loss_rows: int | None = None,
                            vision_trains: bool = True, lora: tuple[int, int] | None = None) -> dict[str, int]:
    """What one update micro-batch saves for the backward, by part: ``prompts`` prompts of ``prompt_len``
    tokens computed once (shared prefix) and ``completions`` completions of ``completion_len`` tokens.

    ``backend`` "sdpa" (the shared-prefix attention on CPU and the GPU fallback) gathers each
    completion's prompt keys and values into its attention call (K and V, before and after the GQA
    expansion's view, saved per layer) and saves the completions' masks; the flash and flex backends read
    the prompt's keys in place. ``loss_rows``: the rows of logits the fused loss holds at a time (all
    completion tokens, in fp32, for the CPU's reference path, which also casts the lm_head to fp32).
    ``vision_trains`` False (a LoRA policy without ``visual.`` targets): no weight of the tower and not its
    input, the pixels, needs a gradient, so autograd saves nothing there. ``lora``: (rank, adapted Linears
    per decoder layer): the frozen RMSNorm weights need no normalised output kept (2·h·e per token a
    layer fewer), and each adapter keeps its rank-r intermediate (measured: tests/test_plan.py).
    """
    tokens = prompts * prompt_len + completions * completion_len
    per_token = layer_activation_bytes(s, e)
    if lora is not None:
        rank, adapted = lora
        per_token += adapted * rank * e - 2 * s.hidden * e
    per_layer = tokens * per_token
    context = completions * (prompt_len + completion_len)
    parts = {}
    if backend == "sdpa":
        kv = 2 * e * s.kv_heads * s.head_dim
        per_layer += 2 * context * kv - completions * completion_len * kv
        if not checkpointing:  # built inside the layers, so a checkpointed layer recomputes them
            parts["attention masks"] = 2 * completions * completion_len * (prompt_len + completion_len) * e
    per_block = patches * vision_activation_bytes(s, e)
    if checkpointing:  # each layer and block keeps its input; the backward recomputes one at a time
        # (an estimate from that structure: tests/test_plan.py measures the plain case only)
        parts["decoder layers"] = s.layers * tokens * s.hidden * e + 2 * tokens * s.hidden * 4  # + final norm
        parts["vision blocks"] = s.vision_layers * patches * s.vision_hidden * e
        parts["recomputed layer"] = max(per_layer, per_block)
    else:
        parts["decoder layers"] = s.layers * per_layer
        parts["vision blocks"] = s.vision_layers * per_block
    parts["image patches"] = patches * 3 * 2 * s.patch**2 * e  # the patch embedding's input
    if not vision_trains:
        parts["vision blocks"] = parts["image patches"] = 0
        if checkpointing:
            parts["recomputed layer"] = per_layer
    rows = completions * completion_len if loss_rows is None else min(loss_rows, completions * completion_len)
    parts["loss logits"] = rows * s.vocab * (4 if loss_rows is None else e)
    if loss_rows is None:  # the reference path also holds the lm_head weight in fp32
        parts["loss logits"] += s.vocab * s.hidden * 4
    parts["completion hidden states"] = completions * completion_len * s.hidden * 4
    return parts


@dataclass
class Plan:
    """Bytes per rank, by what holds them (``rows``, in the order they are printed), grouped in phases."""

    rows: dict[str, float] = field(default_factory=dict)
    resident: tuple[str, ...] = ()  # held the whole step
    rollout: tuple[str, ...] = ()  # while generating; freed before the update
    update: tuple[str, ...] = ()  # the update's activations and gradients
    notes: list[str] = field(default_factory=list)

    def total(self, names: tuple[str, ...]) -> float:
        return sum(self.rows[n] for n in names)

    @property
    def update_extra(self) -> float:
        """The backward frees a layer's activations as it writes that layer's gradients, so activations
        and gradients peak one after the other, not together: the larger of the two (the gradients then
        stay for the optimizer step)."""
        return max(self.rows[n] for n in self.update)

    @property
    def peak(self) -> float:
        return self.total(self.resident) + max(self.total(self.rollout), self.update_extra)


def prompt_tokens(s: Shapes, max_pixels: int, images: int = 2, text_tokens: int = 128) -> int:
    """A prompt's tokens at the largest image size: its visual tokens plus ``text_tokens``."""
    return images * max(1, max_pixels // s.pixels_per_token) + text_tokens


def plan(cfg, world_size: int, *, shapes: Shapes | None = None, fsdp: bool | None = None, device: str = "cuda",
         backend: str | None = None, images: int = 2, text_tokens: int = 128) -> Plan:
    """The memory plan of ``cfg`` (a JobConfig) on each of ``world_size`` ranks of ``device`` ("cuda", or
    "cpu": the CPU's reference loss holds all logits in fp32). ``backend``: the shared-prefix attention
    (default: sdpa on the CPU, else what ``--loss.prefix_attention`` names, varlen when auto)."""
    from .model import load_image_processor

    s = shapes or read_shapes(cfg.model.policy or "tiny")  # a folder, "tiny", or a name in PUBLISHED
    if backend is None:
        backend = "sdpa" if device == "cpu" else {"auto": "varlen"}.get(cfg.loss.prefix_attention,
                                                                       cfg.loss.prefix_attention)
    fsdp = (world_size > 1 and cfg.parallel.fsdp != "off") if fsdp is None else fsdp
    shard = world_size if fsdp else 1
    e_c = _SIZE[cfg.model.dtype]
    e_w = 4 if cfg.model.master_weights == "float32" else e_c
    n = s.params
    m = cfg.model
    # A LoRA policy (lgrpo.lora) trains its adapters alone; its base is frozen in the compute dtype and is
    # also the reference and the listener unless they are other folders.
    trained = adapter_params(m.policy or "tiny", m.lora_targets, m.lora_rank) if m.lora_rank else n
    p = Plan()
    p.rows["policy weights"] = (n * e_c + trained * e_w if m.lora_rank else n * e_w) / shard
    p.rows["gradients"] = trained * e_w / shard
    p.rows["AdamW state"] = 2 * trained * e_w / shard
    # Compute-dtype copies of fp32 weights: FSDP2 gathers them a block at a time; on one rank autocast
    # caches a cast of every weight for the forward and backward.
    p.rows["compute copy"] = 0.0 if e_w == e_c else (2 * trained * e_c / max(s.layers, 1) if fsdp else trained * e_c)
    # One row per frozen module held: "frozen reference + listener" when one serves both, none for the roles
    # a LoRA policy's base serves (lgrpo.frozen)
    copies = frozen_layout(cfg).copies(cfg, fsdp)
    for name, how in copies:
        p.rows[f"frozen {name}"] = n * _SIZE[frozen_dtype(cfg)] / (shard if how == "shard" else 1)

    model = cfg.model.policy or "tiny"
    max_pixels = cfg.data.max_pixels or (published()[str(model)][0].published_max_pixels if str(model) in PUBLISHED
                                         else load_image_processor(model).size["longest_edge"])
    prompt = prompt_tokens(s, max_pixels, images, text_tokens)
    new = cfg.rollout.max_new_tokens
    group = cfg.rollout.group_size
    prompts = math.ceil(cfg.train.prompts_per_step / world_size)
    rows = min(cfg.rollout.batch_size or prompts * group, prompts * group)
    # FSDP2's mixed precision gathers in the compute dtype; one rank decodes as held (a LoRA policy's base in
    # the compute dtype: peft casts its adapters' outputs back to it)
    e_r = e_c if fsdp or m.lora_rank else e_w
    p.rows["rollout gather"] = n * e_r * (1 - 1 / shard) if fsdp else 0.0
    # The prefill of a call's prompts: their own KV before it is forked into the rows, and one layer's
    # intermediates at a time (no gradient); logits only at the last position.
    kv_token = s.layers * 2 * s.kv_heads * s.head_dim * e_r
    p.rows["prefill"] = math.ceil(rows / group) * (prompt * (kv_token + (3 * s.intermediate + 4 * s.hidden) * e_r)
                                                   + s.vocab * 4)
    p.rows["KV cache"] = kv_token * rows * (prompt + new)
    p.rows["decode logits"] = rows * s.vocab * 4

    mb = cfg.loss.micro_batch_size
    targets = [t.strip() for t in m.lora_targets.split(",")]  # each plain name: one Linear a decoder layer
    prompts_mb = math.ceil(mb / group) if cfg.loss.shared_prefix else mb
    patches = prompts_mb * images * max(1, max_pixels // s.pixels_per_token) * s.merge**2
    from .kernels.linear_grpo import default_chunk_rows

    parts = update_activation_bytes(
        s, e_c, prompts=prompts_mb, prompt_len=prompt, completions=mb, completion_len=new, patches=patches,
        backend=backend, checkpointing=cfg.model.gradient_checkpointing,
        loss_rows=None if device == "cpu" else default_chunk_rows(s.vocab, e_c),
        vision_trains=not m.lora_rank or any(t.startswith("visual.") for t in targets),
        lora=(m.lora_rank, sum(t != "lm_head" and not t.startswith("visual.") for t in targets))
        if m.lora_rank else None)
    p.rows["update activations"] = sum(parts.values())
    p.resident = ("policy weights", "AdamW state", "compute copy", *(f"frozen {name}" for name, _ in copies))
    p.rollout = ("rollout gather", "KV cache", "decode logits", "prefill")
    p.update = ("update activations", "gradients")
    p.notes = [f"{world_size} rank(s), {'FSDP2 sharded' if fsdp else 'unsharded'}; {prompt} prompt tokens "
               f"({images} images at {max_pixels} pixels + {text_tokens} text), {new} new tokens, "
               f"{rows} rollout rows, update micro-batch {mb} completions"
               + (f"; LoRA rank {m.lora_rank}: {trained / 1e6:.1f} M adapter parameters train, the base is "
                  "frozen" if m.lora_rank else "")]
    return p


def format_plan(p: Plan, device_gib: float | None = None) -> str:
    """The plan as a table, in GiB, against the device's memory when known."""
    width = max(len(k) for k in p.rows) + 2
    lines = [f"memory plan per rank ({p.notes[0]})" if p.notes else "memory plan per rank"]
    for title, names in (("held all step", p.resident), ("rollout", p.rollout), ("update", p.update)):
        lines.append(f"  {title}:")
        lines += [f"    {name:<{width}}{_size(p.rows[name]):>11}" for name in names if p.rows[name]]
    lines.append(f"  {'peak':<{width + 2}}{_size(p.peak):>11}  (held {_size(p.total(p.resident))} + "
                 f"max(rollout {_size(p.total(p.rollout))}, update {_size(p.update_extra)}))")
    if device_gib is not None:
        verdict = "fits" if p.peak <= device_gib * GiB else "does NOT fit"
        lines.append(f"  {verdict} in {device_gib:.1f} GiB per rank")
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


PLAN_FLAGS = ("--plan", "--plan.ranks", "--plan.gpu_gib")


def split_plan_args(argv: list[str]) -> tuple[dict | None, list[str]]:
    """``--plan [--plan.ranks N] [--plan.gpu_gib G]`` taken out of a training command line: the plan's
    options (None without ``--plan``) and the rest, which is parsed as the run's config."""
    rest, opts, asked, i = [], {}, False, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--plan":
            asked = True
        elif arg in ("--plan.ranks", "--plan.gpu_gib"):
            if i + 1 == len(argv):
                raise ValueError(f"{arg} needs a value")
            key, text = arg.removeprefix("--plan."), argv[i + 1]
            try:
                value = int(text) if key == "ranks" else float(text)
            except ValueError:
                raise ValueError(f"{arg}: not a number: {text!r}") from None
            if not (value >= 1 if key == "ranks" else 0 < value < math.inf):
                raise ValueError(f"{arg}: must be {'>= 1' if key == 'ranks' else 'positive and finite'}, "
                                 f"got {text}")
            opts[key] = value
            i += 1
        else:
            rest.append(arg)
        i += 1
    if opts and not asked:
        raise ValueError(f"{' and '.join('--plan.' + k for k in opts)} only mean something with --plan")
    return (opts if asked else None), rest


def device_gib(device: str) -> float | None:
    """This machine's accelerator memory (GiB), when there is one."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GiB
    return None


def plan_device(cfg) -> str:
    """What the run will use: the CPU only when asked for (or auto on a machine without a GPU)."""
    import torch

    if cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda"


def show_plan(cfg, opts: dict, out=print) -> int:
    """``python -m lgrpo.train --plan ...``: print the plan per rank; nothing is loaded, nothing written."""
    import os

    ranks = int(opts.get("ranks") or os.environ.get("WORLD_SIZE", 1))
    device = plan_device(cfg) if "gpu_gib" not in opts else "cuda"
    out(format_plan(plan(cfg, ranks, device=device), opts.get("gpu_gib") or device_gib(device)))
    return 0


def write_plan(cfg, run_dir: Path, world_size: int) -> Path | None:
    """The plan of the run that is starting, as ``memory_plan.txt`` in its folder (rank 0). A plan that
    cannot be made (a model it cannot read) is a warning: the run matters more than its forecast."""
    try:
        text = format_plan(plan(cfg, world_size, device=plan_device(cfg)), device_gib(plan_device(cfg)))
    except (ValueError, KeyError, OSError) as err:
        print(f"[warn] no memory plan for this run: {err}", flush=True)
        return None
    path = Path(run_dir) / "memory_plan.txt"
    path.write_text(text + "\n", encoding="utf-8")
    return path
