"""Loading the policy, the frozen reference and the frozen listener (Qwen2.5-VL), offline.

``name_or_path`` is either ``"tiny"`` (the built-in model: configs and tokenizer shipped in
``lgrpo/assets/tiny-qwen2.5-vl``, weights initialised from a seed) or a local Hugging Face folder with the
Qwen2.5-VL-3B/7B-Instruct layout. Nothing is ever downloaded (``local_files_only``).

Attention: ``flash_attention_2`` when ``flash_attn`` imports and the model goes to CUDA in fp16/bf16, else
``sdpa`` (PyTorch's own FlashAttention kernels on Ampere/Hopper in bf16, its other kernels in fp32). On
CUDA with liger-kernel installed, its Qwen2.5-VL RMSNorm/SwiGLU/RoPE kernels are applied (never its fused
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

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny-qwen2.5-vl"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def model_dir(name_or_path: str | os.PathLike) -> Path:
    """The local folder for ``"tiny"`` or a path; ``FileNotFoundError`` for anything else (no hub look-up)."""
    if str(name_or_path) == TINY:
        return TINY_DIR
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path!r} is neither 'tiny' nor a local model folder with a "
                                "config.json; models are never downloaded: pass the folder of a Qwen2.5-VL "
                                "checkpoint")
    return path


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
        raise ValueError(f"the tokenizer in {path} has no pad token; Qwen2.5-VL uses <|endoftext|>")
    return tok


def _folder_chat_template(path: Path) -> str:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    raise ValueError(f"no chat template in {path} (tokenizer_config.json, chat_template.jinja or "
                     "chat_template.json)")


def _pil_image_processor_class():
    """Qwen2-VL's PIL/numpy image processor (torchvision may not import beside a CPU torch).

    transformers >= 5.x (the releases with backend-specific processors) names it
    ``Qwen2VLImageProcessorPil``; earlier releases' ``Qwen2VLImageProcessor`` is the PIL/numpy one.
    """
    import transformers

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if cls is None:
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
                Qwen2VLImageProcessorPil as cls,
            )
        except ImportError:
            from transformers import Qwen2VLImageProcessor as cls
    return cls


def load_image_processor(name_or_path: str | os.PathLike = TINY, *, min_pixels: int | None = None,
                         max_pixels: int | None = None):
    """Qwen2-VL's PIL image processor configured from the folder's ``preprocessor_config.json``.

    ``min_pixels`` / ``max_pixels`` override the folder's bounds on the resized image area (each image
    becomes ``area / 28²`` visual tokens after the 2×2 merge).
    """
    path = model_dir(name_or_path)
    cfg_file = path / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    size = dict(cfg.pop("size", None) or {})
    folder_lo = cfg.pop("min_pixels", size.get("shortest_edge", 56 * 56))
    folder_hi = cfg.pop("max_pixels", size.get("longest_edge", 28 * 28 * 1280))
    lo = folder_lo if min_pixels is None else min_pixels
    hi = folder_hi if max_pixels is None else max_pixels
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {lo}, {hi}")
    keep = {"do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
            "resample", "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size"}
    kwargs = {k: v for k, v in cfg.items() if k in keep}
    # A fresh size dict: some 5.x releases mutate the class-level default when given min/max_pixels.
    return _pil_image_processor_class()(size={"shortest_edge": int(lo), "longest_edge": int(hi)}, **kwargs)


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
    """A ``Qwen2_5_VLForConditionalGeneration`` from ``"tiny"`` or a local folder.

    - ``dtype``: torch dtype or name; default bf16 on CUDA, fp32 on CPU.
    - ``device``: default CUDA when available.
    - ``attn_implementation``: see :func:`resolve_attn_implementation`.
    - ``liger``: apply liger-kernel's Qwen2.5-VL kernels; ``None`` = when on CUDA and installed,
      ``True`` = required (raises if it cannot), ``False`` = never.
    - ``seed``: the tiny model's weight initialisation (ignored for folders, whose weights are loaded).
    - ``trainable=False`` freezes the model (:func:`freeze`): the reference and the listener.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = model_dir(name_or_path)
    dev = _device(device)
    torch_dtype = _dtype(dtype, dev)
    attn = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    # Read the folder's own model_type: a config class reports its class's type whatever the file says.
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(f"{path} holds a {model_type!r} model; lgrpo loads Qwen2.5-VL (qwen2_5_vl)")
    config = Qwen2_5_VLConfig.from_pretrained(path, local_files_only=True)
    if str(name_or_path) == TINY:
        # Same seed, same weights, whatever the caller's RNG state; the caller's RNG is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config)
        model.set_attn_implementation(attn)
        model = model.to(dtype=torch_dtype)
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype, attn_implementation=attn)
    model = model.to(dev)
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
    """Apply liger when asked or (``liger=None``) when it can run; an explicit request that fails raises."""
    if not _resolve_liger(liger, device):
        return []
    try:
        return apply_liger(model)
    except RuntimeError as err:
        if liger:
            raise
        log.warning("%s; continuing without liger-kernel", err)
        return []


def apply_liger(model) -> list[str]:
    """Swap in liger-kernel's RMSNorm, SwiGLU and multimodal RoPE kernels for this Qwen2.5-VL model.

    Its cross-entropy and fused-linear-cross-entropy patches stay off: the model's forward keeps returning
    logits/hidden states, and the GRPO loss is the trainer's own. Returns the kernels that take effect:
    liger replaces ``apply_multimodal_rotary_pos_emb``, which transformers 5.x no longer calls (it merges
    the M-RoPE sections before attention), so there only RMSNorm and SwiGLU change. Raises
    ``RuntimeError`` when this liger-kernel cannot patch the installed transformers.
    """
    import transformers
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    rope_used = hasattr(modeling_qwen2_5_vl, "apply_multimodal_rotary_pos_emb")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

        apply_liger_kernel_to_qwen2_5_vl(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                         fused_linear_cross_entropy=False, model=model)
    except ImportError as err:
        raise RuntimeError("liger-kernel cannot patch Qwen2.5-VL under transformers "
                           f"{transformers.__version__}: {err}") from err
    return ["rms_norm", "swiglu"] + (["rope"] if rope_used else [])


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
