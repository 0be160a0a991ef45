"""The final export: the policy as a Hugging Face folder that ``from_pretrained`` loads (a LoRA policy:
merged, with its adapter in peft's format in ``adapter/``, lgrpo.lora)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from . import distributed as D
from .lora import export_lora, has_adapters


def export_pretrained(
    model: nn.Module, out_dir: str | os.PathLike, dist: D.Dist, extra_savers: tuple = (),
    base_folder: str | None = None,
) -> Path | None:
    """Write ``model`` as a safetensors Hugging Face folder that ``from_pretrained`` loads. A LoRA policy
    is written merged, and its adapter in peft's format under ``adapter/`` (``base_folder``: the model
    folder the adapter applies to, written into its adapter_config.json).

    Collective under FSDP2 (the full weights are gathered to rank 0's CPU, one tensor at a time);
    rank 0 writes to ``out_dir.tmp`` and renames. ``extra_savers`` are objects with
    ``save_pretrained`` (tokenizer, image processor) written into the same folder.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = Path(out_dir)
    if dist.is_main:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if has_adapters(model):
            export_lora(model, tmp, full, base_folder)
        else:
            model.save_pretrained(str(tmp), state_dict=full, safe_serialization=True)
        for saver in extra_savers:
            if saver is not None:
                saver.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    D.barrier()
    return out if dist.is_main else None
