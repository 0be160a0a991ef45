"""Build script: the pure-Python packages plus the native extension ``lgrpo._C``.

The top-level ``kernels/`` folder is installed as ``lgrpo.kernels``. It must never become an
importable top-level ``kernels`` module: transformers treats one as the Hugging Face kernel hub.

``lgrpo._C`` (csrc/) always holds the CPU kernels; the CUDA kernels are added when torch was built
with CUDA and nvcc is found. ``LGRPO_BUILD_CUDA=1`` demands them (and fails clearly when they
cannot be built), ``LGRPO_BUILD_CUDA=0`` leaves them out. ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures as usual; unset, it defaults to Ampere, Ada and Hopper plus PTX for newer cards.

A build where torch cannot be imported (pip's default isolated build environment has none) fails
with a message saying what to do, rather than silently producing a wheel without ``lgrpo._C``;
``LGRPO_PURE_PYTHON=1`` asks for that pure-Python wheel on purpose (``lgrpo.ops`` then runs the
PyTorch reference).
"""

import os

from setuptools import find_packages, setup

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


def pure_python() -> bool:
    """Whether LGRPO_PURE_PYTHON=1 asks for a wheel without the native extension."""
    flag = os.environ.get("LGRPO_PURE_PYTHON", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"LGRPO_PURE_PYTHON must be 0, 1 or unset, got {flag!r}")
    if flag == "1" and os.environ.get("LGRPO_BUILD_CUDA", "").strip() == "1":
        raise SystemExit("LGRPO_PURE_PYTHON=1 and LGRPO_BUILD_CUDA=1 contradict each other")
    return flag == "1"


def extensions() -> tuple[list, dict]:
    """The lgrpo._C extension and the build_ext command that compiles it (none when pure_python())."""
    if pure_python():
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # pyproject cannot require torch for the build without pulling a multi-GB CUDA wheel into
        # pip's isolated build environment, so the extension builds against the installed torch.
        raise SystemExit(
            "lgrpo: torch is not importable at build time, so the native extension lgrpo._C cannot be built.\n"
            "  Install torch first, then build against it:  pip install --no-build-isolation .\n"
            "  Or build a pure-Python package on purpose:   LGRPO_PURE_PYTHON=1 pip install .\n"
            "  (without lgrpo._C, lgrpo.ops.listener_confidence runs its PyTorch reference)"
        ) from None

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

# Every package under lgrpo/ (found, not listed: a new subpackage cannot be left out of the wheel),
# plus the top-level kernels/ folder under its import name.
PACKAGES = find_packages(include=["lgrpo", "lgrpo.*"]) + ["lgrpo.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"lgrpo": "lgrpo", "lgrpo.kernels": "kernels"},
    package_data={"lgrpo": ["assets/*/*"]},
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if ext_modules else {},
)
