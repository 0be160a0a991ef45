"""Test set-up. The Triton interpreter must be switched on before anything imports triton."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # On CPU the Triton kernels themselves run through the interpreter; on a GPU they compile.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: new random inputs each test, reproducible on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def reference_kernels(monkeypatch):
    """Route lgrpo.kernels' public functions to the pure-PyTorch reference for this test.

    The Triton kernels are checked against the fp64 reference in their own tests (through the
    interpreter on CPU); tests of the trainer's logic (resume, ranks, warm-up, metrics) run many
    optimizer steps, where the interpreter would cost minutes and add nothing they check.
    """
    import lgrpo.kernels._common as common

    monkeypatch.setattr(common, "INTERPRET", False)
