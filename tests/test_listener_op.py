"""lgrpo._C listener_confidence (csrc/) against the float64 reference, its errors, its fake kernel,
and a compile-only check of the CUDA sources with the machine's nvcc.

Tests taking a ``device`` run on the CPU kernel and, marked ``gpu``, on the CUDA kernel.
"""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lgrpo.kernels import reference

import lgrpo.ops as ops

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
op = torch.ops.lgrpo.listener_confidence if ops.HAS_EXTENSION else None


def randn(shape, gen, scale=3.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


def expect(logits, positions, cand, temperature=1.0):
    """fp64 truth from the very same (rounded) logits."""
    return reference.listener_confidence(logits.double(), positions, cand, temperature)


def assert_matches(got, want):
    probs, logp = got
    assert probs.dtype == logp.dtype == torch.float32
    assert probs.shape == logp.shape == want[0].shape
    # fp32 accumulation of exact inputs: errors are ~1e-7 relative, whatever the input dtype.
    torch.testing.assert_close(probs.double(), want[0], rtol=1e-5, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(logp.double(), want[1], rtol=1e-5, atol=2e-5, equal_nan=True)


def test_extension_is_loaded():
    # `make install` builds lgrpo._C; a silent fallback to the reference would hide a broken build.
    assert ops.HAS_EXTENSION, "lgrpo._C failed to load"
    assert {"cpu", "meta"} <= ops.NATIVE_DEVICES
    if torch.cuda.is_available():
        assert "cuda" in ops.NATIVE_DEVICES


pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="lgrpo._C is not built")


# ---------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["BV", "BTV"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_matches_reference(gen, device, dtype, layout, shared):
    B, T, V, K = 6, 5, 1001, 3  # odd V: 2-byte rows alternate 16-byte alignment on the GPU
    temperature = 0.7
    logits = randn((B, T, V) if layout == "BTV" else (B, V), gen, dtype=dtype, device=device)
    positions = None
    if layout == "BTV":
        positions = torch.randint(0, T, (B,), generator=gen)
        positions[0], positions[1] = 0, T - 1  # both ends of the sequence
        positions = positions.to(device)
    cand = torch.randint(0, V, (K,) if shared else (B, K), generator=gen)
    cand.view(-1)[0], cand.view(-1)[1] = 0, V - 1  # both ends of the vocabulary
    cand = cand.to(device)
    got = ops.listener_confidence(logits, positions, cand, temperature)
    assert_matches(got, expect(logits, positions, cand, temperature))
    assert got[0].device == logits.device
    torch.testing.assert_close(got[0].sum(-1), torch.ones(B, device=device), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 33, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
def test_vocab_sizes_and_temperatures(gen, device, vocab, temperature):
    # Sizes around the 8-element vector and the unrolled sweep; V = 1 has a single candidate.
    B, K = 9, min(vocab, 4)
    logits = randn((B, vocab), gen, dtype=torch.bfloat16, device=device)
    cand = torch.stack([torch.randperm(vocab, generator=gen)[:K] for _ in range(B)]).to(device)
    got = ops.listener_confidence(logits, None, cand, temperature)
    assert_matches(got, expect(logits, None, cand, temperature))


@pytest.mark.parametrize("device", DEVICES)
def test_qwen_vocab(gen, device):
    V = 152064  # Qwen2.5-VL: many full unrolled sweeps per row
    logits = randn((3, V), gen, dtype=torch.bfloat16, device=device)
    cand = torch.tensor([16, 17], device=device)  # "1", "2"
    assert_matches(ops.listener_confidence(logits, None, cand), expect(logits, None, cand))


@pytest.mark.parametrize("device", DEVICES)
def test_single_candidate_has_probability_one(gen, device):
    logits = randn((4, 3, 257), gen, device=device)
    positions = torch.tensor([0, 2, 1, 2], device=device)
    cand = torch.tensor([[5], [0], [256], [100]], device=device)
    probs, logp = ops.listener_confidence(logits, positions, cand)
    assert probs.shape == (4, 1)
    assert torch.equal(probs, torch.ones_like(probs))
    assert_matches((probs, logp), expect(logits, positions, cand))


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices(gen, device):
    logits = randn((4, 6, 99), gen, dtype=torch.float16, device=device)
    positions = torch.tensor([5, 0, 3, 1], dtype=torch.int32, device=device)
    cand = torch.tensor([3, 98, 0], dtype=torch.int32, device=device)
    assert_matches(ops.listener_confidence(logits, positions, cand), expect(logits, positions, cand))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(gen, device, dtype):
    B, T, V = 5, 6, 513
    positions_full = torch.randint(0, T, (2 * B,), generator=gen).to(device)
    positions = positions_full[::2]  # strided positions
    cand = torch.randint(0, V, (3, B), generator=gen).to(device).t()  # [B, K] with stride (1, B)
    cases = {
        # every other time step: stride_t = 2V
        "t_strided": randn((B, 2 * T, V), gen, dtype=dtype, device=device)[:, ::2],
        # batch-minor layout [T, B, V] seen as [B, T, V]
        "b_minor": randn((T, B, V), gen, dtype=dtype, device=device).transpose(0, 1),
        # vocabulary not contiguous: stride_v = T (the slow scalar path, no copy)
        "v_strided": randn((B, V, T), gen, dtype=dtype, device=device).transpose(1, 2),
        # storage offset of one element: no row starts 16-byte aligned on the GPU
        "offset": randn((B * T * V + 1,), gen, dtype=dtype, device=device)[1:].view(B, T, V),
    }
    for name, logits in cases.items():
        assert not logits.is_contiguous() or name == "offset"
        got = ops.listener_confidence(logits, positions, cand, 1.3)
        try:
            assert_matches(got, expect(logits, positions, cand, 1.3))
        except AssertionError as e:
            raise AssertionError(f"layout {name}: {e}") from None
    # [B, V] rows taken out of a wider buffer: stride_b > V
    wide = randn((B, V + 37), gen, dtype=dtype, device=device)[:, 5 : 5 + V]
    assert_matches(ops.listener_confidence(wide, None, cand), expect(wide, None, cand))


@pytest.mark.parametrize("device", DEVICES)
def test_huge_logits_do_not_overflow(gen, device):
    B, V = 4, 3001
    logits = randn((B, V), gen, scale=1e4, device=device)
    logits[1] = -1e4
    logits[1, 17] = 1e4  # one dominant entry
    logits[2] = 1e4  # all equal and huge: logsumexp = 1e4 + log(V)
    cand = torch.tensor([17, 0, V - 1], device=device)
    probs, logp = ops.listener_confidence(logits, None, cand, 0.9)
    assert torch.isfinite(probs).all() and torch.isfinite(logp).all()
    assert_matches((probs, logp), expect(logits, None, cand, 0.9))
    assert logp[2].tolist() == pytest.approx([-math.log(V)] * 3, abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_logits(gen, device, dtype):
    B, V = 5, 301
    logits = randn((B, V), gen, dtype=dtype, device=device)
    logits[torch.rand(B, V, generator=gen).to(device) < 0.3] = -math.inf  # masked vocabulary
    cand = torch.tensor([[3, 4, 5]] * B, device=device)
    logits[:, 3:5] = torch.tensor([1.0, 2.0], dtype=dtype)
    logits[:, 5] = 0.5
    logits[0, 4] = -math.inf  # one candidate at -inf: probability 0, logp -inf
    logits[1, 3:6] = -math.inf  # every candidate at -inf: probs undefined (NaN), logp -inf
    logits[2] = -math.inf  # the whole row at -inf: everything NaN
    logits[3, :3] = -math.inf  # -inf at the very start of a row (the unaligned head on the GPU)
    probs, logp = ops.listener_confidence(logits, None, cand)
    assert_matches((probs, logp), expect(logits, None, cand))
    assert probs[0, 1] == 0 and logp[0, 1] == -math.inf
    assert probs[1].isnan().all() and (logp[1] == -math.inf).all()
    assert probs[2].isnan().all() and logp[2].isnan().all()
    assert torch.isfinite(probs[3:]).all() and torch.isfinite(logp[3:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logit_gives_nan_row(gen, device):
    logits = randn((3, 77), gen, device=device)
    logits[1, 40] = math.nan  # not a candidate: it still poisons the row's logsumexp
    probs, logp = ops.listener_confidence(logits, None, torch.tensor([1, 2], device=device))
    assert logp[1].isnan().all()
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(probs[[0, 2]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    logits = torch.zeros(0, 4, 10, device=device)
    positions = torch.zeros(0, dtype=torch.long, device=device)
    probs, logp = ops.listener_confidence(logits, positions, torch.tensor([1, 2, 3], device=device))
    assert probs.shape == logp.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Errors: every check, on the C++ kernel and on the Python fake (meta tensors), same messages
# ---------------------------------------------------------------------------------------------

B_, T_, V_ = 3, 4, 10


def _args(device, **over):
    a = dict(logits=torch.zeros(B_, T_, V_, device=device),
             positions=torch.zeros(B_, dtype=torch.long, device=device),
             candidate_ids=torch.tensor([1, 2], device=device), temperature=1.0)
    a.update({k: (v(device) if callable(v) else v) for k, v in over.items()})
    return a


def _t(*args, **kw):
    return lambda device: torch.zeros(*args, device=device, **kw)


POS_MSG = r"positions must be an int32 or int64 tensor of shape \[3\]"
LAYOUT_ERRORS = {
    "fp64 logits": (dict(logits=_t(B_, T_, V_, dtype=torch.float64)), "logits must be fp32, fp16 or bf16"),
    "int logits": (dict(logits=_t(B_, T_, V_, dtype=torch.int32)), "logits must be fp32, fp16 or bf16"),
    "zero temperature": (dict(temperature=0.0), "temperature must be"),
    "negative temperature": (dict(temperature=-1.0), "temperature must be"),
    "nan temperature": (dict(temperature=math.nan), "temperature must be"),
    "inf temperature": (dict(temperature=math.inf), "temperature must be"),
    "rank 1 logits": (dict(logits=_t(V_), positions=None), r"logits must be \[B, T, V\] or \[B, V\]"),
    "rank 4 logits": (dict(logits=_t(B_, T_, 2, V_)), r"logits must be \[B, T, V\] or \[B, V\]"),
    "empty vocab": (dict(logits=_t(B_, T_, 0)), "empty vocabulary"),
    "missing positions": (dict(positions=None), r"positions \[B\] is required"),
    "positions for 2-D": (dict(logits=_t(B_, V_)), "positions must be None"),
    "float positions": (dict(positions=_t(B_)), POS_MSG),
    "int16 positions": (dict(positions=_t(B_, dtype=torch.int16)), POS_MSG),
    "short positions": (dict(positions=_t(B_ - 1, dtype=torch.long)), POS_MSG),
    "2-D positions": (dict(positions=_t(B_, 1, dtype=torch.long)), POS_MSG),
    "float candidates": (dict(candidate_ids=_t(2)), "candidate_ids must be an int32 or int64 tensor"),
    "3-D candidates": (dict(candidate_ids=_t(B_, 2, 1, dtype=torch.long)), "candidate_ids must be an int32"),
    "0-D candidates": (dict(candidate_ids=_t((), dtype=torch.long)), "candidate_ids must be an int32"),
    "candidate rows": (dict(candidate_ids=_t(B_ + 1, 2, dtype=torch.long)), r"must have B = 3 rows, got 4"),
    "no candidates": (dict(candidate_ids=_t(0, dtype=torch.long)), r"at least one candidate \(K >= 1\)"),
}


@pytest.mark.parametrize("device", ["cpu", "meta"], ids=["kernel", "fake"])
@pytest.mark.parametrize("case", list(LAYOUT_ERRORS))
def test_layout_errors(device, case):
    over, message = LAYOUT_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        ops.listener_confidence(**_args(device, **over))


@pytest.mark.parametrize("arg", ["positions", "candidate_ids"])
def test_device_mismatch(arg):
    args = _args("cpu")
    args[arg] = args[arg].to("meta")
    with pytest.raises(ValueError, match=f"{arg} is on meta but logits are on cpu"):
        op(**args)


INDEX_ERRORS = {
    "position T": (dict(positions=torch.tensor([0, T_, 1])), r"positions\[1\] = 4 is outside \[0, 4\)"),
    "position -1": (dict(positions=torch.tensor([0, 1, -1])), r"positions\[2\] = -1 is outside \[0, 4\)"),
    "shared candidate V": (dict(candidate_ids=torch.tensor([1, V_])), r"candidate_ids\[1\] = 10 is outside"),
    "shared candidate -1": (dict(candidate_ids=torch.tensor([-1, 2])), r"candidate_ids\[0\] = -1 is outside"),
    "row candidate": (dict(candidate_ids=torch.tensor([[1, 2], [3, 4], [5, 99]])),
                      r"candidate_ids\[2, 1\] = 99 is outside the vocabulary \[0, 10\)"),
    "2-D logits candidate": (dict(logits=torch.zeros(B_, V_), positions=None,
                                  candidate_ids=torch.tensor([V_])), r"candidate_ids\[0\] = 10 is outside"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(INDEX_ERRORS))
def test_index_errors(device, case):
    over, message = INDEX_ERRORS[case]
    args = _args(device, **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in over.items()})
    with pytest.raises(IndexError, match=message):
        ops.listener_confidence(**args)
    with pytest.raises(IndexError, match=message):
        op(**args)  # the op itself, not only the Python face


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_indices_give_nan_rows(gen, device):
    logits = randn((4, 3, 50), gen, device=device)
    positions = torch.tensor([0, 3, 2, 1], device=device)  # row 1 out of range
    cand = torch.tensor([[1, 2], [1, 2], [1, 50], [0, 49]], device=device)  # row 2 out of range
    probs, logp = ops.listener_confidence(logits, positions, cand, check_indices=False)
    bad = torch.tensor([False, True, True, False], device=device)
    assert probs[bad].isnan().all() and logp[bad].isnan().all()
    ok = ~bad
    want = expect(logits[ok], positions[ok], cand[ok])
    assert_matches((probs[ok], logp[ok]), want)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, fallback
# ---------------------------------------------------------------------------------------------


def test_opcheck(gen):
    samples = [
        ((randn((3, 5, 33), gen, dtype=torch.bfloat16), torch.tensor([0, 4, 2]), torch.tensor([1, 7])), {}),
        ((randn((3, 33), gen), None, torch.tensor([[1], [2], [3]], dtype=torch.int32), 0.5), {}),
        ((randn((2, 40), gen, dtype=torch.float16), None, torch.tensor([3, 9])), {"check_indices": False}),
    ]
    for args, kwargs in samples:
        torch.library.opcheck(op.default, args, kwargs)


def test_not_differentiable(gen):
    # The listener is frozen: outputs never require grad, so backward fails loudly (no silent zeros).
    logits = randn((3, 5, 33), gen).requires_grad_()
    probs, logp = ops.listener_confidence(logits, torch.tensor([0, 1, 4]), torch.tensor([1, 7]))
    assert not probs.requires_grad and not logp.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        logp.sum().backward()
    torch.library.opcheck(op.default, (logits, torch.tensor([0, 1, 4]), torch.tensor([1, 7])))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(gen, dynamic):
    def reward(logits, positions, cand):
        probs, logp = ops.listener_confidence(logits, positions, cand, 0.8)
        return probs[:, 0] * 2 - 1, logp.sum(-1)

    compiled = torch.compile(reward, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for B in (4, 6):  # a second shape: recompiles or reuses the dynamic graph
        logits = randn((B, 7, 301), gen, dtype=torch.bfloat16)
        positions = torch.randint(0, 7, (B,), generator=gen)
        cand = torch.tensor([11, 12])
        for a, b in zip(compiled(logits, positions, cand), reward(logits, positions, cand)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fallback_to_reference_warns(gen, monkeypatch):
    # What a machine without the built extension (or a CPU-only build given CUDA tensors) runs.
    monkeypatch.setattr(ops, "NATIVE_DEVICES", frozenset())
    monkeypatch.setattr(ops, "_warned_devices", set())
    logits = randn((3, 4, 50), gen)
    positions, cand = torch.tensor([0, 3, 1]), torch.tensor([2, 9])
    with pytest.warns(RuntimeWarning, match="runs the PyTorch reference"):
        got = ops.listener_confidence(logits, positions, cand)
    assert_matches(got, expect(logits, positions, cand))
    with pytest.raises(IndexError, match="positions"):  # the reference checks too
        ops.listener_confidence(logits, torch.tensor([0, 4, 1]), cand)


def test_launch_plan_is_none_off_cuda():
    assert ops.listener_launch_plan(torch.zeros(2, 8), None, torch.tensor([1])) is None


def test_benchmark_smoke(run_bench):
    """bench/bench_listener.py end to end at smoke sizes: the JSON gpu_check.sh collects."""
    data = run_bench("bench_listener", "bench_listener")
    names = [r["name"] for r in data["rows"]]
    for case in ("[4,V]", "[2,8,V]@pos"):
        for impl in ("ours", "ours, checked", "torch eager"):
            assert f"{case} {impl}" in names
    assert all(r["ms"] > 0 for r in data["rows"]), data["rows"]
    assert {"device", "torch", "triton"} <= set(data["env"]) and "copy_gbs" in data


@pytest.mark.parametrize("flag", ["1", "0", "2"])
def test_setup_build_cuda_flag(flag):
    """LGRPO_BUILD_CUDA: 0 builds CPU only, 1 demands CUDA and says why it cannot, others are refused."""
    from torch.utils.cpp_extension import CUDA_HOME

    can_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "LGRPO_BUILD_CUDA": flag}, timeout=300)
    if flag == "0" or (flag == "1" and can_cuda):
        assert res.returncode == 0 and res.stdout.strip().endswith("lgrpo"), res.stderr[-2000:]
    elif flag == "1":
        assert res.returncode != 0
        assert "LGRPO_BUILD_CUDA=1 but the CUDA kernels cannot be built" in res.stderr
    else:
        assert res.returncode != 0 and "LGRPO_BUILD_CUDA must be 0, 1 or unset" in res.stderr


# ---------------------------------------------------------------------------------------------
# CUDA only: real sizes, the block split of a row, graphs, streams, inductor
# ---------------------------------------------------------------------------------------------

QWEN_V = 152064


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_bv_real_size(gen, dtype):
    # The benchmark's [256, V] case (2 blocks per row on an H100), shared and per-row candidates.
    logits = randn((256, QWEN_V), gen, dtype=dtype, device="cuda")
    shared = torch.tensor([16, 17], device="cuda")
    per_row = torch.randint(0, QWEN_V, (256, 4), generator=gen).cuda()
    for cand in (shared, per_row):
        assert_matches(ops.listener_confidence(logits, None, cand), expect(logits, None, cand))


@pytest.mark.gpu
def test_gpu_positions_real_size(gen):
    # The benchmark's [16, 1536, V] case: 7.5 GB of logits, > 2^31 elements (64-bit offsets). Every
    # row except the 16 at `positions` holds NaN, so reading any other row shows in the result.
    B, T = 16, 1536
    logits = torch.empty(B, T, QWEN_V, dtype=torch.bfloat16, device="cuda").fill_(math.nan)
    positions = torch.randint(0, T, (B,), generator=gen)
    positions[0], positions[-1] = 0, T - 1
    positions = positions.cuda()
    rows = randn((B, QWEN_V), gen, dtype=torch.bfloat16, device="cuda")
    logits[torch.arange(B, device="cuda"), positions] = rows
    cand = torch.tensor([16, 17], device="cuda")
    got = ops.listener_confidence(logits, positions, cand)
    assert torch.isfinite(got[1]).all()
    assert_matches(got, expect(rows, None, cand))  # truth from the rows alone: no 30 GB fp64 copy
    del logits
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "vocab"),
                         [(1, QWEN_V - 1), (3, QWEN_V - 1), (64, QWEN_V - 1), (1, 2**20 + 3), (20000, 129)])
def test_gpu_row_split(gen, dtype, batch, vocab):
    # From 8 blocks per row (a cluster) down to one, with odd V (unaligned rows) and a large grid.
    logits = randn((batch, vocab), gen, dtype=dtype, device="cuda")
    cand = torch.randint(0, vocab, (batch, 3), generator=gen).cuda()
    assert_matches(ops.listener_confidence(logits, None, cand, 0.9), expect(logits, None, cand, 0.9))


@pytest.mark.gpu
def test_gpu_launch_plan_and_its_cap(gen, monkeypatch):
    """The plan reports the launcher's row split (on an H100: a cluster of 2 blocks per row for
    [256, V], 8 for [16, V]), and every cap of LGRPO_LISTENER_MAX_CHUNKS gives the same, correct result."""
    cand = torch.tensor([16, 17], device="cuda")
    for rows in (256, 16):
        logits = randn((rows, QWEN_V), gen, dtype=torch.bfloat16, device="cuda")
        plan = ops.listener_launch_plan(logits, None, cand)
        assert plan["sms"] == torch.cuda.get_device_properties(0).multi_processor_count
        assert 1 <= plan["blocks_per_row"] <= 8 and plan["resident_blocks_per_sm"] >= 1
        if torch.cuda.get_device_capability() >= (9, 0):
            # one wave of resident blocks, at most one block per 256 threads x 32 bf16 of the row, at most 8
            by_work = -(-(QWEN_V // 8) // (256 * 4))
            want_chunks = max(1, min(plan["sms"] * plan["resident_blocks_per_sm"] // rows, by_work, 8))
            assert plan["clusters"] and plan["blocks_per_row"] == want_chunks, plan
        want = expect(logits, None, cand)
        for cap in (1, 2, 3, 8):
            monkeypatch.setenv("LGRPO_LISTENER_MAX_CHUNKS", str(cap))
            assert ops.listener_launch_plan(logits, None, cand)["blocks_per_row"] <= cap
            assert_matches(ops.listener_confidence(logits, None, cand), want)
        monkeypatch.delenv("LGRPO_LISTENER_MAX_CHUNKS")


@pytest.mark.gpu
def test_gpu_cuda_graph(gen):
    # Inside a capture the index check (a sync) is skipped; replays follow new data in place.
    logits = randn((8, 4, 5003), gen, dtype=torch.bfloat16, device="cuda")
    positions = torch.tensor([0, 3, 1, 2, 3, 0, 1, 2], device="cuda")
    cand = torch.tensor([7, 5002], device="cuda")
    ops.listener_confidence(logits, positions, cand)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.listener_confidence(logits, positions, cand)
    for _ in range(2):
        logits.copy_(randn(logits.shape, gen, dtype=torch.bfloat16, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, expect(logits, positions, cand))
    positions.fill_(9)  # out of range: a replay cannot raise, it gives NaN rows
    graph.replay()
    torch.cuda.synchronize()
    assert out[0].isnan().all() and out[1].isnan().all()


@pytest.mark.gpu
def test_gpu_side_stream(gen):
    logits = randn((32, QWEN_V), gen, dtype=torch.bfloat16, device="cuda")
    cand = torch.tensor([16, 17], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for check in (True, False):
            got = ops.listener_confidence(logits, None, cand, check_indices=check)
            side.synchronize()
            assert_matches(got, expect(logits, None, cand))


@pytest.mark.gpu
def test_gpu_torch_compile_inductor(gen):
    def reward(logits, positions, cand):
        probs, logp = ops.listener_confidence(logits, positions, cand)
        return probs[:, 0], logp.exp().sum(-1)

    compiled = torch.compile(reward, fullgraph=True)
    logits = randn((16, 64, 4099), gen, dtype=torch.bfloat16, device="cuda")
    positions = torch.randint(0, 64, (16,), generator=gen).cuda()
    cand = torch.tensor([1, 2], device="cuda")
    for a, b in zip(compiled(logits, positions, cand), reward(logits, positions, cand)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_opcheck(gen):
    logits = randn((4, 6, 1001), gen, dtype=torch.bfloat16, device="cuda")
    positions = torch.tensor([0, 5, 2, 3], device="cuda")
    for cand in (torch.tensor([1, 7], device="cuda"), torch.tensor([[3], [4], [5], [1000]], device="cuda")):
        torch.library.opcheck(op.default, (logits, positions, cand, 0.5))
    torch.library.opcheck(op.default, (logits[:, 0], None, cand), {"check_indices": False})


@pytest.mark.gpu
def test_gpu_device_mismatch():
    args = _args("cuda")
    for arg in ("positions", "candidate_ids"):
        bad = dict(args, **{arg: args[arg].cpu()})
        with pytest.raises(ValueError, match=f"{arg} is on cpu but logits are on cuda"):
            ops.listener_confidence(**bad)
    with pytest.raises(ValueError, match="is on cuda:0 but logits are on cpu"):
        op(**dict(_args("cpu"), candidate_ids=args["candidate_ids"]))


# ---------------------------------------------------------------------------------------------
# The CUDA sources, compiled (not run) with this machine's nvcc
# ---------------------------------------------------------------------------------------------

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(not (NVCC and os.path.exists(NVCC)),
                                reason="nvcc not found (neither on PATH nor in CUDA_HOME)")


def _nvcc_flags():
    # The macros torch's build adds to every nvcc command (they disable half/bf16 conversions).
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return [*COMMON_NVCC_FLAGS, "-O3"]


@needs_nvcc
def test_cuda_kernels_compile_for_sm90(tmp_path):
    """cuda/listener.cu (ATen-free: every dtype's kernel behind one launcher), for sm_90 and sm_80."""
    cmd = [NVCC, "-std=c++17", *_nvcc_flags(), "-gencode=arch=compute_90,code=sm_90",
           "-gencode=arch=compute_80,code=sm_80", "-Xptxas", "-v", f"-I{CSRC}", "-c",
           str(CSRC / "cuda" / "listener.cu"), "-o", str(tmp_path / "listener.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    # ptxas reports each kernel (3 dtypes x 2 archs); a spill would put the streamed values in
    # local memory and halve the bandwidth.
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    assert len(spills) == 6, res.stderr[-4000:]
    assert all(s == ("0", "0") for s in spills), res.stderr[-4000:]


def _torch_cuda_headers(tmp_path):
    """torch's include dirs plus a stand-in for the one generated CUDA header a CPU wheel lacks."""
    from torch.utils.cpp_extension import include_paths

    dirs = include_paths()
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "CUDAStream.h")) for d in dirs):
        pytest.skip("this torch ships no c10/cuda headers")
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in dirs):
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        # What a CUDA build of torch generates there (shared libraries).
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs = [*dirs, str(tmp_path / "shim")]
    return dirs


def _cuda_include_dir() -> Path:
    """The CUDA toolkit's include folder (cuda_runtime.h): CUDA_HOME, else found from nvcc.

    nvcc may be a wrapper script outside the toolkit, so ask it where its headers are.
    """
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"]) / "include"
    res = subprocess.run([NVCC, "-E", "-x", "cu", "-", "-M"], input="#include <cuda_runtime.h>\n",
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"(\S+)/cuda_runtime\.h", res.stdout)
    if not found:
        pytest.skip(f"cannot locate cuda_runtime.h through nvcc: {res.stderr[-300:]}")
    return Path(found.group(1))


@needs_nvcc
@pytest.mark.slow
def test_cuda_registration_compiles(tmp_path):
    """cuda/listener_cuda.cpp (the ATen side of the CUDA op) against this torch's headers.

    It is compiled by the host compiler, as setup.py's CUDAExtension does; a syntax-only pass
    is enough to catch API errors without CUDA's link libraries.
    """
    dirs = _torch_cuda_headers(tmp_path)
    cuda_include = _cuda_include_dir()
    std = "-std=c++20" if torch.__version__ >= "2.10" else "-std=c++17"
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, std, "-fsyntax-only", "-fPIC", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{d}" for d in dirs], f"-I{cuda_include}", f"-I{CSRC}",
           str(CSRC / "cuda" / "listener_cuda.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
