"""LoRA policies (``--model.lora_rank R``): every rule of a parameter-efficient policy, through peft.

**What trains.** Low-rank adapters (peft's LoRA layers, injected in place: the policy stays the
transformers model, so scoring, the rollout engines, FSDP2's per-block sharding and the exports reach
the same modules as a full policy) on the Linear layers ``--model.lora_targets`` names:

- a plain name (``q_proj``; the default: q, k, v, o, gate, up and down projections) is a Linear of the
  language model whose module name ends with it;
- ``lm_head``: the output projection (frozen unless named; the fused loss then reads its effective
  weight ``W + s·B·A``, :func:`effective_weight`);
- ``visual.NAME`` (``visual.qkv``, ``visual.proj``, ``visual.mlp.gate_proj``, ...): a Linear of the
  vision tower (frozen unless named).

Everything else is frozen, in the compute dtype (``--model.dtype``); the adapters are held in the
master dtype (``--model.master_weights``). Their initial weights come from ``--train.seed`` alone (peft's
own initialisation, Kaiming-uniform A and zero B, drawn from a seeded generator of their own): the
same on every rank and for every process count, whatever the global RNG holds.

**No frozen copies.** The KL reference, and the listener when it is the base model (no other folder
given), are the policy with its adapters disabled (:class:`AdaptersOff`): one set of base weights for
all three roles. ``AdaptersOff`` calls the trainer's scorer (the FSDP2 root), so a sharded policy's
reference and listener passes are the same collectives as its own.

**The warm-up.** The supervised warm-up trains adapters too; when it ends they are merged into the base
(:func:`merge_adapters`: ``W <- W + s·B·A`` in fp32, rounded to the base's dtype) and fresh adapters
are drawn. So "the reference after the warm-up" is the warmed-up policy, as with a full policy (whose
reference and listener are copies of it): GRPO starts with the policy equal to its reference, and the
listener is the model that learnt the format. The merged base is saved once in the run's ``warmup/``
folder (a resumed run reads its frozen weights from there, lgrpo.run).

**Checkpoints** hold the adapters and their optimizer state only (lgrpo.checkpoint ``ModelState``); the
base comes from the policy folder, or from ``warmup/``.

**Export** (:func:`export_lora`): ``final/`` holds the merged model (the names of the plain model, so
``from_pretrained`` loads it with no peft), and ``final/adapter/`` the adapter in peft's own format
(``PeftModel.from_pretrained(base, "final/adapter")``), relative to the base GRPO started from: the
policy folder, or with a warm-up that folder with the warm-up's adapters merged.

peft is imported only when LoRA is asked for (``pip install 'lgrpo[lora]'``, or ``pip install peft``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name: one adapter per policy
ADAPTER_DIR = "adapter"  # the export's subfolder for the adapter in peft's format
_LORA_WEIGHTS = (".lora_A.", ".lora_B.")
_BASE = ".base_layer."


def require_peft(what: str = "a LoRA policy") -> None:
    """Raise naming the install command when peft is missing (before any model is loaded)."""
    from .extras import require

    require("lora", what)


# --- which layers ---------------------------------------------------------------------------------------


def parse_targets(targets: str) -> list[str]:
    """The names of ``--model.lora_targets``; ``ValueError`` for an empty one or bad spelling."""
    names = [t.strip() for t in targets.split(",")]
    bad = [t for t in names if not t or not all(part.isidentifier() for part in t.split("."))]
    if bad or not names:
        raise ValueError(f"a comma-separated list of module names (e.g. q_proj,v_proj), got {targets!r}")
    return names


def _vision_prefix(model: nn.Module) -> str | None:
    """The module name of the vision tower, or None for a text model."""
    from .models import vision_tower

    tower = vision_tower(model)
    if tower is None:
        return None
    return next(name for name, m in model.named_modules() if m is tower)


def target_names(model: nn.Module, targets: str) -> list[str]:
    """Full module names of the Linear layers ``targets`` selects (the module docstring's rules);
    ``ValueError`` naming a target that selects nothing."""
    head = model.get_output_embeddings()
    vision = _vision_prefix(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for target in parse_targets(targets):
        if target == "lm_head":
            hits = [n for n, m in linears if m is head]
        elif target.startswith("visual."):
            suffix = target.removeprefix("visual.")
            hits = [n for n, _ in linears if vision and n.startswith(vision + ".") and _ends_with(n, suffix)]
        else:
            hits = [n for n, m in linears if m is not head and not (vision and n.startswith(vision + "."))
                    and _ends_with(n, target)]
        if not hits:
            raise ValueError(f"--model.lora_targets: {target!r} names no Linear layer of this model (plain names "
                             "are the language model's, e.g. q_proj; lm_head; visual.NAME for the vision tower)")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def adapter_numel(model: nn.Module, targets: str, rank: int) -> int:
    """Parameters the adapters of ``targets`` at ``rank`` add (``rank · (in + out)`` per layer); works on
    the meta device, without peft (the memory plan)."""
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in target_names(model, targets))


# --- adding the adapters ---------------------------------------------------------------------------------


def add_adapters(model: nn.Module, rank: int, alpha: float | None, dropout: float, targets: str, *,
                 seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Inject LoRA adapters in place (peft), freeze everything else; adapters in ``dtype``, initialised from
    ``seed`` alone. Returns ``model``."""
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    names = target_names(model, targets)
    head_names = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    if head_names and head_names[0] in names:
        if dropout > 0:  # the fused loss applies W + s·B·A to the final states: no place for a dropout
            raise ValueError("--model.lora_dropout > 0 with lm_head in --model.lora_targets: the fused loss "
                             "reads the head's effective weight, which has no dropout; set the dropout to 0")
        if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
            raise ValueError("--model.lora_targets lm_head: this model ties lm_head to the input embeddings, "
                             "so merging an adapter into it would change the embeddings too")
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=names, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # base frozen, adapters trainable
    for layer in lora_layers(model):
        for sub in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            sub.to(dtype)
    init_adapters(model, seed)
    return model


def lora_base(cfg, policy: nn.Module) -> AdaptersOff:
    """``--model.lora_*`` applied to ``policy`` (in place; adapters in the master dtype, seeded with
    ``--train.seed``); returns its adapters-off base, the reference and listener (lgrpo.task.build)."""
    m = cfg.model
    master = torch.float32 if m.master_weights == "float32" else next(policy.parameters()).dtype
    add_adapters(policy, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets, seed=cfg.train.seed,
                 dtype=master)
    return AdaptersOff(policy)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The adapted layers, in module order."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {})]


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def init_adapters(model: nn.Module, seed: int) -> None:
    """peft's default initialisation (A Kaiming-uniform with a = √5, B zero: the policy starts equal to its
    base), drawn from a CPU generator seeded with ``seed``: the same weights on any device and rank."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in _fresh_adapters(model, torch.Generator().manual_seed(seed)).items():
            params[name].copy_(value)


def _fresh_adapters(model: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """New adapter weights by parameter name, on the CPU in fp32, layer after layer in module order."""
    out = {}
    names = {m: n for n, m in model.named_modules()}
    for layer in lora_layers(model):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        fresh_a = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh_a, a=math.sqrt(5), generator=gen)
        prefix = names[layer]
        out[f"{prefix}.lora_A.{ADAPTER}.weight"] = fresh_a
        out[f"{prefix}.lora_B.{ADAPTER}.weight"] = torch.zeros(b.shape)
    return out


# --- the base model: reference and listener --------------------------------------------------------------


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model for the duration: every adapter layer off (peft's ``enable_adapters``), then on
    again. peft also clears and restores the adapters' ``requires_grad`` on the way."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersOff:
    """The policy with its adapters disabled, as a scorer: the KL reference and the base-model listener.

    Built with the policy (lgrpo.task.build); the trainer binds it to its own scorer (:meth:`bind`), the
    FSDP2 root, so every pass reaches the sharded weights as the policy's own passes do.
    """

    def __init__(self, policy: nn.Module):
        self.policy = policy
        self.scorer = None

    def bind(self, scorer) -> None:
        self.scorer = scorer

    @property
    def shared_prefix(self) -> bool:
        return self._bound().shared_prefix

    def _bound(self):
        if self.scorer is None:
            raise RuntimeError("AdaptersOff is used before the trainer bound it to the policy's scorer")
        return self.scorer

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self._bound()(*args, **kwargs)


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a (possibly adapted) Linear applies: ``W``, or ``W + s·B·A`` while its adapter is on.
    Differentiable in the adapter (the fused loss on an adapted lm_head)."""
    if not hasattr(linear, "base_layer"):
        return linear.weight
    weight = linear.base_layer.weight
    if linear.disable_adapters or linear.merged:
        return weight
    for name in linear.active_adapters:
        if name in linear.lora_A:
            weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight


# --- merging: the warm-up's end and the export ------------------------------------------------------------


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # every rank gets it (cpu_offload would leave the others empty): each loads the merged weights back
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _scaling(model: nn.Module) -> dict[str, float]:
    names = {m: n for n, m in model.named_modules()}
    return {names[layer]: layer.scaling[ADAPTER] for layer in lora_layers(model)}


def merged_weights(full: dict[str, torch.Tensor], scaling: dict[str, float]) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an adapted one's: ``W + s·B·A`` (fp32, rounded to W's dtype)
    under the plain names, no adapter entries."""
    out = {}
    for key, value in full.items():
        if any(part in key for part in _LORA_WEIGHTS):
            continue
        if _BASE in key:
            layer, _, leaf = key.partition(_BASE)
            if leaf == "weight":
                a, b = full[f"{layer}.lora_A.{ADAPTER}.weight"], full[f"{layer}.lora_B.{ADAPTER}.weight"]
                value = (value.float() + scaling[layer] * (b.float() @ a.float())).to(value.dtype)
            key = f"{layer}.{leaf}"
        out[key] = value
    return out


def merge_adapters(model: nn.Module, seed: int) -> None:
    """Fold the adapters into the base (``W <- W + s·B·A``) and draw fresh ones from ``seed``: the policy
    computes what it did (to the base dtype's rounding), and its adapters-off base is now that policy.
    Plain or FSDP2-sharded alike (through the full state dict; collective when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = _full_state(model)
    merged = merged_weights(full, _scaling(model))
    state = {}
    for key, value in full.items():
        layer, sep, leaf = key.partition(_BASE)
        state[key] = merged[f"{layer}.{leaf}"] if sep else merged.get(key, value)
    state.update(_fresh_adapters(model, torch.Generator().manual_seed(seed)))
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def adapter_weights(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names of peft's saved format (``base_model.model.<layer>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    own = get_peft_model_state_dict(model, state_dict=full, adapter_name=ADAPTER, save_embedding_layers=False)
    return {f"base_model.model.{k}": v.contiguous() for k, v in own.items()}


def export_lora(model: nn.Module, tmp: Path, full: dict[str, torch.Tensor], base_folder: str | None) -> None:
    """Write the merged model into ``tmp`` (``save_pretrained`` with the plain names) and the adapter in
    peft's format into ``tmp/adapter`` (rank 0; ``full``: the gathered state dict)."""
    from safetensors.torch import save_file

    model.save_pretrained(str(tmp), state_dict=merged_weights(full, _scaling(model)), safe_serialization=True)
    out = tmp / ADAPTER_DIR
    out.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[ADAPTER]
    config.base_model_name_or_path = base_folder
    config.save_pretrained(str(out))
    save_file(adapter_weights(model, full), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
