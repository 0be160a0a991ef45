"""Test set-up. The Triton interpreter must be switched on before anything imports triton."""

import os

# One intra-op thread per test process (and per subprocess it starts), unless the caller says
# otherwise: the tests' models are tiny, so two threads gain nothing on an idle 2-core machine
# (warm-up steps timed side by side: equal), while on a busy one torch's spinning threads made a
# 32x64 @ 64x64 matmul ~2000x slower (23 ms vs 0.012 ms) and the tiny-preset test hit its timeout.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
    """A fresh, seeded generator per test: new random inputs each test, reproducible on failure
    (a failing test prints ``seed=N``; ``LGRPO_TEST_SEED=N pytest ...`` draws the same inputs again)."""
    seed = int(os.environ.get("LGRPO_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
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


@pytest.fixture
def run_bench(tmp_path):
    """Run ``bench/NAME.py`` in this process at smoke sizes; returns the JSON it wrote, parsed."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"

    def run(name: str, json_name: str, *args: str) -> dict:
        spec = importlib.util.spec_from_file_location(name, bench_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(bench_dir))
        try:
            spec.loader.exec_module(module)
            module.main(["--smoke", "--out", str(tmp_path), *args])
        finally:
            sys.path.remove(str(bench_dir))
        return json.loads((tmp_path / f"{json_name}.json").read_text())

    return run


@pytest.fixture(scope="session")
def batcher():
    """The tiny built-in Qwen2.5-VL's tokenizer and image processor."""
    from lgrpo.batching import VLBatcher

    return VLBatcher.from_pretrained("tiny")


@pytest.fixture(scope="session")
def pairs():
    """Three (prompt, two images) pairs whose images have different sizes: 4, 6 and 16 visual tokens (and 4
    for the rest), so their prompts have different lengths."""
    from lgrpo.synthetic import SyntheticTask

    task = SyntheticTask(seed=0)
    exs = [task.example("train", i) for i in range(3)]
    images = [list(e.images) for e in exs]
    images[1][0] = images[1][0].resize((84, 56))
    images[2][1] = images[2][1].resize((112, 112))
    return [e.prompt for e in exs], images
