"""Loading the policy, the frozen reference and the frozen listener, offline, for any supported family.

``name_or_path`` is either ``"tiny"`` (the built-in model: configs and tokenizer shipped in
``lgrpo/assets/tiny-qwen2.5-vl``, weights initialised from a seed), another built-in tiny model's name or
folder (``tiny-qwen2-vl``, ...: one per family), or a local Hugging Face folder. The folder's
``config.json`` names its family (:mod:`lgrpo.models`: the model class, the image processor, the liger
kernels); this module is the same for all of them. Nothing is ever downloaded (``local_files_only``).

Attention: ``flash_attention_2`` when ``flash_attn`` imports and the model goes to CUDA in fp16/bf16, else
``sdpa`` (PyTorch's own FlashAttention kernels on Ampere/Hopper in bf16, its other kernels in fp32). On
CUDA with liger-kernel installed, its RMSNorm/SwiGLU/RoPE kernels for the family are applied (never its fused
cross-entropy: the trainer has its own fused GRPO loss). Both choices are logged.

For the policy update the trainer needs the final hidden states and the lm_head weight, never the
full-vocabulary logits: :func:`final_hidden_states` and :func:`lm_head_weight`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .models import DEFAULT, family_for, family_names, family_of, tiny_folders
from .models.qwen_vl import pil_image_processor_class as _pil_image_processor_class  # noqa: F401 (tests' name)

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_DIR = DEFAULT.tiny
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def model_dir(name_or_path: str | os.PathLike) -> Path:
    """The local folder for ``"tiny"`` (or another built-in tiny model's name) or a path;
    ``FileNotFoundError`` for anything else (no hub look-up)."""
    tiny = tiny_folders()
    if str(name_or_path) in tiny:
        return tiny[str(name_or_path)]
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path!r} is neither 'tiny' nor a local model folder with a "
                                f"config.json; models are never downloaded: pass the folder of a {family_names()} "
                                "checkpoint")
    return path


def is_tiny(name_or_path: str | os.PathLike) -> bool:
    """Whether this names a built-in tiny model (configs shipped, weights initialised from a seed)."""
    path = model_dir(name_or_path).resolve()
    return any(path == folder.resolve() for folder in tiny_folders().values())


# ----------------------------------------------------------------------------------------------------
# Tokenizer and image processor
# ----------------------------------------------------------------------------------------------------

def load_tokenizer(name_or_path: str | os.PathLike = TINY):
    """The model folder's tokenizer, left-padding, with a chat template and a pad token.

    A folder whose tokenizer has no chat template but ships ``chat_template.jinja`` / ``chat_template.json``
    (as Qwen2.5-VL processor folders do) gets that template.
    """
    from transformers import AutoTokenizer

    path = model_dir(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"  # generation appends on the right
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = _folder_chat_template(path)
    if tok.pad_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no pad token; the Qwen-VL tokenizers use <|endoftext|>")
    return tok


def _folder_chat_template(path: Path) -> str:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    raise ValueError(f"no chat template in {path} (tokenizer_config.json, chat_template.jinja or "
                     "chat_template.json)")


def load_image_processor(name_or_path: str | os.PathLike = TINY, *, min_pixels: int | None = None,
                         max_pixels: int | None = None):
    """The family's PIL image processor configured from the folder's ``preprocessor_config.json``.

    ``min_pixels`` / ``max_pixels`` override the folder's bounds on the resized image area (each image
    becomes ``area / (patch · merge)²`` visual tokens: 28² for Qwen2/2.5-VL, 32² for Qwen3-VL).
    """
    path = model_dir(name_or_path)
    cfg_file = path / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    return family_for(path).image_processor(cfg, min_pixels, max_pixels)


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------

def flash_attn_available() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a broken build (ABI mismatch) must not take the run down: SDPA is the fallback
        return False
    return True


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_attn_implementation(requested: str = "auto", device: str | torch.device | None = None,
                                dtype: str | torch.dtype | None = None) -> str:
    """``"auto"``: ``flash_attention_2`` when flash_attn imports, ``device`` is CUDA and ``dtype`` (the
    weights' dtype; default: :func:`load_model`'s for that device) is fp16 or bf16, else ``sdpa``.

    flash-attn takes fp16/bf16 only, and fp32 weights are not always run under autocast (the trainer's
    rollouts decode the fp32 master weights as they are): fp32 gets SDPA, which runs any dtype.
    An explicit ``"flash_attention_2"`` that cannot run (no CUDA, no flash_attn, fp32 weights) raises;
    ``"sdpa"`` and ``"eager"`` pass through.
    """
    dev = _device(device)
    half = _dtype(dtype, dev) in (torch.float16, torch.bfloat16)
    if requested == "auto":
        return "flash_attention_2" if dev.type == "cuda" and half and flash_attn_available() else "sdpa"
    if requested == "flash_attention_2" and not (dev.type == "cuda" and flash_attn_available()):
        raise ValueError("attn_implementation='flash_attention_2' needs a CUDA device and an importable "
                         "flash_attn")
    if requested == "flash_attention_2" and not half:
        raise ValueError(f"attn_implementation='flash_attention_2' needs fp16/bf16 weights, got "
                         f"{_dtype(dtype, dev)} (flash-attn has no fp32 kernels): use sdpa or auto")
    if requested not in ("flash_attention_2", "sdpa", "eager"):
        raise ValueError("attn_implementation must be auto, flash_attention_2, sdpa or eager, "
                         f"got {requested!r}")
    return requested


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:  # bf16 where the GPU kernels want it, fp32 on CPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(name_or_path: str | os.PathLike = TINY, *, trainable: bool = True,
               dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               attn_implementation: str = "auto", liger: bool | None = None, seed: int = 0):
    """The family's model (e.g. ``Qwen2_5_VLForConditionalGeneration``) from a tiny model or a local folder.

    - ``dtype``: torch dtype or name; default bf16 on CUDA, fp32 on CPU.
    - ``device``: default CUDA when available.
    - ``attn_implementation``: see :func:`resolve_attn_implementation`.
    - ``liger``: apply liger-kernel's kernels for the family; ``None`` = when on CUDA and installed,
      ``True`` = required (raises if it cannot), ``False`` = never.
    - ``seed``: the tiny model's weight initialisation (ignored for folders, whose weights are loaded).
    - ``trainable=False`` freezes the model (:func:`freeze`): the reference and the listener.
    """
    path = model_dir(name_or_path)
    dev = _device(device)
    torch_dtype = _dtype(dtype, dev)
    attn = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    family = family_for(path)  # refuses a model type lgrpo does not support, naming those it does
    cls = family.model_class()
    if is_tiny(path):
        config = family.config_class().from_pretrained(path, local_files_only=True)
        # Same seed, same weights, whatever the caller's RNG state; the caller's RNG is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
        model.set_attn_implementation(attn)
        model = model.to(dtype=torch_dtype)
    else:
        model = cls.from_pretrained(path, local_files_only=True, dtype=torch_dtype, attn_implementation=attn)
    model = model.to(dev)
    family.prepare(model)
    kernels = _maybe_apply_liger(model, liger, dev)
    log.info("loaded %s: %s, %s on %s, attention=%s, liger=%s, %s", name_or_path, type(model).__name__,
             torch_dtype, dev, attn, "+".join(kernels) or "off", "trainable" if trainable else "frozen")
    return model if trainable else freeze(model)


def load_policy(name_or_path: str | os.PathLike = TINY, **kwargs):
    """The policy: trainable, in train mode."""
    return load_model(name_or_path, trainable=True, **kwargs).train()


def load_reference(name_or_path: str | os.PathLike = TINY, **kwargs):
    """The frozen reference for the KL term (same checkpoint as the policy's start)."""
    return load_model(name_or_path, trainable=False, **kwargs)


def load_listener(name_or_path: str | os.PathLike = TINY, **kwargs):
    """The frozen listener (by default the same base model, frozen: SPEC §1)."""
    return load_model(name_or_path, trainable=False, **kwargs)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward. transformers 5.2x renamed the switch
    (``gradient_checkpointing_enable`` warns it goes away in v6); the older name where the new one is missing."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def freeze(model):
    """No gradients, eval mode (no dropout). Returns the model."""
    model.requires_grad_(False)
    return model.eval()


def _resolve_liger(liger: bool | None, device: torch.device) -> bool:
    if liger is None:
        return device.type == "cuda" and liger_available()
    if liger and device.type != "cuda":
        raise ValueError("liger=True needs a CUDA device (liger-kernel's kernels are Triton GPU kernels)")
    if liger and not liger_available():
        raise ValueError("liger=True but liger-kernel is not installed (pip install 'lgrpo[bench]')")
    return bool(liger)


def _maybe_apply_liger(model, liger: bool | None, device: torch.device) -> list[str]:
    """Apply the family's liger kernels when asked or (``liger=None``) when they can run; an explicit
    request that fails raises."""
    if not _resolve_liger(liger, device):
        return []
    try:
        return family_of(model).apply_liger(model)
    except RuntimeError as err:
        if liger:
            raise
        log.warning("%s; continuing without liger-kernel", err)
        return []


# ----------------------------------------------------------------------------------------------------
# What the trainer's loss needs
# ----------------------------------------------------------------------------------------------------

def lm_head_weight(model) -> torch.Tensor:
    """The output projection ``[V, H]`` (``linear_grpo_loss(hidden, weight, ...)``): with a LoRA adapter
    on the lm_head, the weight it applies (lgrpo.lora.effective_weight)."""
    from .lora import effective_weight

    return effective_weight(model.get_output_embeddings())


def final_hidden_states(model, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Final-norm hidden states ``[B, T, H]`` for a batch, without full-sequence logits.

    Runs the model's own forward (so wrappers' hooks, e.g. FSDP2's, fire) with ``logits_to_keep=1``:
    the lm_head sees one position only. ``inputs``: e.g. ``PromptBatch.model_inputs()``.
    """
    out = model(**inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]
