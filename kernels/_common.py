"""What every Triton kernel family shares: the dispatch rule and the launch-shape heuristics.

Dispatch: the Triton kernels run when the input lives on a CUDA device, or when the Triton
interpreter was switched on (``TRITON_INTERPRET=1`` before triton was imported, as the CPU tests
do); otherwise, and for fp64 inputs (a testing dtype; the kernels compute in fp32), the public
functions fall back to the pure-PyTorch reference.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False

# Read once, at import, like triton itself: @triton.jit decides between compiling and interpreting
# when the decorator runs, so a later change of the variable would not change what runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

LOG2E = 1.4426950408889634  # kernels work in base 2: exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernels should handle these inputs (see the module docstring)."""
    if not HAS_TRITON:
        return False
    present = [t for t in tensors if t is not None]
    if not present or any(t.dtype not in KERNEL_DTYPES for t in present):
        return False
    return INTERPRET or all(t.is_cuda for t in present)


def on_device(t: torch.Tensor):
    """Context for a launch: Triton launches on the *current* CUDA device, so make it the tensor's
    (a tensor on cuda:1 while cuda:0 is current, as under some data-parallel set-ups)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# Upper bounds on the vocabulary tile of the row kernels. Module-level so that the tests can
# shrink them and walk several tiles (with a ragged last one) on a small vocabulary.
MAX_BLOCK_V_FWD = 2048
MAX_BLOCK_V_BWD = 4096
ROW_TILE = 2048  # elements per program when rows are short: several rows share one program


def row_launch(n_rows: int, vocab: int, max_block_v: int, big_warps: int) -> tuple[int, int, int, tuple[int]]:
    """(BLOCK_R, BLOCK_V, num_warps, grid) for a kernel streaming ``n_rows`` rows of ``vocab``.

    Long rows (the LLM case, V ~ 152k): one row per program, so 8k rows fill every SM many times
    over, and a loop over vocabulary tiles of ``max_block_v``. Short rows: several rows per
    program (a [BLOCK_R, BLOCK_V] tile) so that a program still moves a few KB. Rows go on grid
    axis 0, which allows 2^31 - 1 programs (axes 1 and 2 stop at 65535).
    """
    block_v = min(next_pow2(vocab), max_block_v)
    block_r = max(1, min(ROW_TILE // block_v, next_pow2(n_rows)))
    if block_r == 1 and block_v == max_block_v:
        num_warps = big_warps
    else:
        num_warps = 8 if block_r * block_v >= 2048 else 4
    return block_r, block_v, num_warps, (max(1, triton.cdiv(n_rows, block_r)),)
