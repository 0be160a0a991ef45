"""Set-up for `pytest bench --benchmark-only`: the kernel microbenchmarks as pytest-benchmark tests.

Only test_*.py files are collected here (pytest's default ``python_files``): the bench_*.py scripts
are imported by them for their inputs and peers, never collected or run as tests.
"""

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run through the interpreter at tiny shapes, so that the harness
    # itself runs anywhere (tests/test_bench_pytest.py). Must happen before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
