"""Build script: the pure-Python packages plus the native extension ``lgrpo._C``.

The top-level ``kernels/`` folder is installed as ``lgrpo.kernels``. It must never become an
importable top-level ``kernels`` module: transformers treats one as the Hugging Face kernel hub.

``lgrpo._C`` (csrc/) always holds the CPU kernels; the CUDA kernels are added when torch was built
with CUDA and nvcc is found. ``LGRPO_BUILD_CUDA=1`` demands them (and fails clearly when they
cannot be built), ``LGRPO_BUILD_CUDA=0`` leaves them out. ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures as usual; unset, it defaults to Ampere, Ada and Hopper plus PTX for newer cards.
"""

import os
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/ops.cpp"]
CUDA_SOURCES = ["csrc/cuda/listener.cu", "csrc/cuda/listener_cuda.cpp"]
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def want_cuda(torch_has_cuda: bool, nvcc_found: bool) -> bool:
    """Whether to build the CUDA kernels, from LGRPO_BUILD_CUDA (unset: when possible)."""
    flag = os.environ.get("LGRPO_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"LGRPO_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False
    if flag == "1" and not (torch_has_cuda and nvcc_found):
        why = "torch was built without CUDA" if not torch_has_cuda else "nvcc was not found (set CUDA_HOME)"
        raise SystemExit(f"LGRPO_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return torch_has_cuda and nvcc_found


def extensions() -> tuple[list, dict]:
    """The lgrpo._C extension and the build_ext command that compiles it (empty without torch)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # An isolated build env has no torch (pyproject cannot require one without pulling a
        # multi-GB wheel): install with --no-build-isolation, as the Makefile does.
        if os.environ.get("LGRPO_BUILD_CUDA", "").strip() == "1":
            raise SystemExit("LGRPO_BUILD_CUDA=1 but torch is not importable at build time") from None
        print("lgrpo: torch is not importable at build time, so lgrpo._C is not built and "
              "lgrpo.ops falls back to the PyTorch reference (use pip install --no-build-isolation)",
              file=sys.stderr)
        return [], {}

    with_cuda = want_cuda(torch.version.cuda is not None, cpp_extension.CUDA_HOME is not None)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    extra = {"cxx": ["-O3"]}
    sources = list(CPU_SOURCES)
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += CUDA_SOURCES
        extra["nvcc"] = ["-O3"]
    ext = ext_cls(
        "lgrpo._C",
        sources,
        extra_compile_args=extra,
        # Ops go through the dispatcher (no pybind11), so one abi3 binary serves every CPython.
        py_limited_api=True,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    packages=["lgrpo", "lgrpo.kernels"],
    package_dir={"lgrpo": "lgrpo", "lgrpo.kernels": "kernels"},
    package_data={"lgrpo": ["assets/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
