"""The kernel microbenchmarks as pytest-benchmark tests: ``pytest bench --benchmark-only``.

Each test times one implementation of one kernel; the implementations of one kernel and case share a
``benchmark.group``, so pytest-benchmark's table and ``--benchmark-json`` put them side by side. Groups:
grpo_loss, linear_grpo_loss, group_advantages, listener_confidence [B,V] and [B,T,V]@pos, sampler [16,V]
and [64,V].

The implementations, their shapes, inputs and peers are the bench_*.py scripts' own: each script's table
(``IMPLS``, bench.common.Impl) lists what both harnesses time, and this file times the entries it describes
(``about``), skipping with the reason what cannot run here. Only group_advantages, which has no script,
keeps its table here. Shapes: with CUDA those of bench/NOTES.md (N = 8 x 1024, V = 152064, H = 3584, bf16);
without it the scripts' smoke shapes through the Triton interpreter, so that the harness runs anywhere (a
CPU time measures the interpreter, not a kernel).

Before anything is timed, the implementation's output on the timed inputs is compared with the fp64
reference (lgrpo.kernels.reference): a wrong kernel fails its test instead of reporting a time.

Timing: ``benchmark.pedantic`` with a clock that waits for the GPU before it reads perf_counter, so a
round is timed until its GPU work has finished; ops of a few µs run ``CALLS`` back-to-back calls per round
on rotating inputs (pytest-benchmark divides by the count), so the synchronisation is spread over them.
The bench_*.py scripts stay the precise measurement (do_bench with L2 flushes, CUDA graphs, peak memory);
this is the same comparison in pytest-benchmark's format. ``extra_info`` holds the shape, the bytes (or
FLOPs) the op must move, the floor (copy bandwidth or matmul time measured in this session), ``x_floor``
= median / floor, and the agreement with the reference.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.*` from any working directory

from lgrpo.kernels import group_advantages, reference  # noqa: E402
from lgrpo.kernels.sampler import key_tensor, sample_tokens  # noqa: E402

import lgrpo.ops as ops  # noqa: E402
from bench import bench_grpo_loss as grpo_bench  # noqa: E402
from bench import bench_linear_grpo as linear_bench  # noqa: E402
from bench import bench_listener as listener_bench  # noqa: E402
from bench import bench_sampler as sampler_bench  # noqa: E402
from bench.common import SLOW_COMPILE, Impl, backward_step, copy_bandwidth_gbs, environment, rel_err  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ENV = environment()
# Few rounds: the whole module must fit in ~2 minutes of a GPU check's 15 (bench/gpu_check.sh).
ROUNDS = dict(rounds=7, warmup_rounds=2) if CUDA else dict(rounds=3, warmup_rounds=1)
CALLS = 20 if CUDA else 1  # calls per round for the µs-scale ops (on CPU the interpreter is slow enough)
LOSS_TOL = 1e-4  # |loss - fp64| / max(|fp64|, 1): the losses accumulate in fp32
GRAD_TOL = 1e-2  # relative (Frobenius) error of a bf16 gradient; bf16's rounding alone is ~1e-3
GRPO_OPTS = dict(temperature=grpo_bench.TEMP, eps_low=grpo_bench.EPS_LO, eps_high=grpo_bench.EPS_HI,
                 beta=grpo_bench.BETA, loss_type="dapo")


def synced_clock() -> float:
    """perf_counter once the GPU's queued work has finished: a round ends when its kernels do."""
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


pytestmark = pytest.mark.benchmark(timer=synced_clock)


@pytest.fixture(scope="session")
def copy_gbs() -> float:
    """Device copy bandwidth (read + write) measured once in this session; nan without CUDA."""
    return copy_bandwidth_gbs()


def copy_floor_ms(n_bytes: int, copy_gbs: float) -> float | None:
    return n_bytes / (copy_gbs * 1e9) * 1e3 if copy_gbs == copy_gbs else None


def agreement(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    """Assert that ``got`` matches the fp64 ``want`` (relative Frobenius error <= tol; a scalar relative to
    max(|want|, 1)) and say by how much. NaN fails."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    if got.dim():
        err = rel_err(got, want)
    else:
        err = abs(float(got) - float(want)) / max(abs(float(want)), 1.0)
    assert err <= tol, f"{what} differs from the fp64 reference: relative error {err:.2e} > {tol:.0e}"
    return f"{what} relerr {err:.1e}"


def pytest_ids(impls: dict[str, Impl]) -> list[str]:
    """The ids of a script's table that this harness times (those it describes)."""
    return [key for key, impl in impls.items() if impl.about]


def skip_unless_runnable(impl: Impl) -> None:
    """Skip, with the reason, an implementation that cannot run here: its optional package is missing, or it
    is not timed at the smoke sizes / without CUDA (CPU runs here use the smoke sizes)."""
    __tracebackhide__ = True  # pytest's skip summary then names the test's line, not this one
    if impl.needs:
        pytest.importorskip(impl.needs, reason=f"{impl.needs} is not installed (pip install -e .[bench])")
    if not CUDA and impl.smoke_skip:
        pytest.skip(f"not timed at the CPU's smoke sizes: {impl.smoke_skip}")
    if not CUDA and impl.cuda_only:
        pytest.skip(impl.cuda_only)


def time_it(benchmark, group: str, run: Callable[[], object], *, setup: Callable[[], None] | None = None,
            calls: int = 1, floor_ms: float | None = None, **info) -> None:
    """Time ``run`` (one call) in pedantic rounds, ``setup`` untimed before each; record ``info``, the floor
    and ``x_floor`` in the JSON's extra_info."""
    benchmark.group = group
    benchmark.extra_info.update(info, floor_ms=floor_ms, calls_per_round=calls, device=ENV["device"],
                                torch=ENV["torch"], triton=ENV["triton"])
    benchmark.pedantic(run, setup=setup, iterations=calls, **ROUNDS)
    if benchmark.stats is not None:  # None under --benchmark-disable (one untimed call)
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["x_floor"] = median_ms / floor_ms if floor_ms else None


# --- grpo_loss from logits -------------------------------------------------------------------------------

GRPO_SHAPE = grpo_bench.SHAPE if CUDA else grpo_bench.SMOKE_SHAPE


def fp64_by_sequence(x, piece) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp64 loss and the gradient of one leaf, a sequence at a time: the fp64 copies stay ~10 GB at the GPU
    shape instead of ~80. With dapo and token-level ratios each sequence's terms depend on its own rows only,
    and the global normaliser (the live-token count) is passed to every piece as ``num_items``, so the pieces
    add up to the whole loss. ``piece(rows, num_items)`` -> (the loss of those sequences, the leaf whose
    gradient is kept, in fp32: half of fp64's memory, far below bf16's error)."""
    num_items = float(x.mask.sum())
    loss, grads = 0.0, []
    for b in range(x.mask.shape[0]):
        piece_loss, leaf = piece(slice(b, b + 1), num_items)
        piece_loss.backward()
        loss, grads = loss + piece_loss.detach(), grads + [leaf.grad.float()]
    return loss, torch.cat(grads)


def grpo_truth(x: grpo_bench.Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 loss and d loss / d logits."""

    def piece(rows: slice, num_items: float):
        z = x.logits[rows].double().requires_grad_()
        return reference.grpo_loss(z, x.ids[rows], x.adv[rows], x.mask[rows], x.old[rows], x.ref[rows],
                                   num_items=num_items, **GRPO_OPTS).loss, z

    return fp64_by_sequence(x, piece)


@pytest.fixture(scope="module")
def grpo_case():
    x = grpo_bench.make_inputs(*GRPO_SHAPE, DEVICE)
    return (x, *grpo_truth(x))


@pytest.mark.parametrize("impl", pytest_ids(grpo_bench.IMPLS))
def test_grpo_loss(benchmark, grpo_case, copy_gbs, impl):
    x, want_loss, want_grad = grpo_case
    spec = grpo_bench.IMPLS[impl]
    skip_unless_runnable(spec)
    peer = grpo_bench.peer(impl, x)
    forward_only = spec.opts.get("forward_only", False)
    if peer.restore:  # an in-place call destroys its logits: each timed call starts from the same ones
        peer.restore()
    checks = [agreement("loss", peer.step(), want_loss, LOSS_TOL)]
    if not forward_only:
        checks.append(agreement("grad", peer.grad(), want_grad, GRAD_TOL))
    B, T, V = GRPO_SHAPE
    passes = 1 if forward_only else 3  # forward reads the logits; backward reads them and writes the gradient
    time_it(benchmark, "grpo_loss", peer.step, setup=peer.restore,
            floor_ms=copy_floor_ms(passes * x.nbytes, copy_gbs), impl=spec.about, shape=dict(B=B, T=T, V=V),
            dtype="bfloat16", bytes=passes * x.nbytes, floor=f"{passes} x the logits at the copy bandwidth",
            agreement=", ".join(checks))


# --- linear_grpo_loss from hidden states -----------------------------------------------------------------

LINEAR_SHAPE = linear_bench.SHAPE if CUDA else linear_bench.SMOKE_SHAPE
# The table at this harness's shape: the overlap rows' chunks follow the script's (4 rows at the smoke shape).
LINEAR_IMPLS = {**linear_bench.ours_impls(LINEAR_SHAPE[-1], smoke=not CUDA), **linear_bench.PEERS}
# The logits pass through bf16 in these implementations (a rounding of 2^-9 of each), the fp64 truth does not:
# 1.4e-4 at the CPU shape; a wrong loss (a clip, a sign, a temperature) is off by far more.
LINEAR_LOSS_TOL = 2e-3
# cut-cross-entropy's default filter skips gradient entries below bf16's resolution by design (1.5e-2 on an
# H100, bench/results): a looser bound for it; a wrong kernel is off by O(1) all the same.
LINEAR_GRAD_TOL = {"cce": 5e-2}


@pytest.fixture(scope="module")
def linear_case():
    B, T, H, V = LINEAR_SHAPE
    x = linear_bench.make_inputs(B, T, H, V, DEVICE)
    w = x.weight.double().requires_grad_()  # its gradient adds up over the pieces

    def piece(rows: slice, num_items: float):
        h = x.hidden[rows].double().requires_grad_()
        return reference.linear_grpo_loss(h, w, x.ids[rows], x.adv[rows], x.mask[rows], x.old[rows], x.ref[rows],
                                          num_items=num_items, **GRPO_OPTS).loss, h

    loss, grad_h = fp64_by_sequence(x, piece)
    floor = linear_bench.matmul_floor(B * T, H, V) if CUDA else (None, "")
    return x, loss, grad_h, w.grad.float(), floor


@pytest.mark.parametrize("impl", pytest_ids(LINEAR_IMPLS))
def test_linear_grpo_loss(benchmark, linear_case, impl):
    x, want_loss, want_gh, want_gw, (floor_ms, floor_note) = linear_case
    spec = LINEAR_IMPLS[impl]
    skip_unless_runnable(spec)
    hidden, weight = x.hidden.clone().requires_grad_(), x.weight.clone().requires_grad_()
    step = backward_step(linear_bench.loss_fn(impl, spec, hidden, weight, x), hidden, weight)

    tol = LINEAR_GRAD_TOL.get(impl, GRAD_TOL)
    checks = [agreement("loss", step(), want_loss, LINEAR_LOSS_TOL),
              agreement("grad_h", hidden.grad, want_gh, tol), agreement("grad_W", weight.grad, want_gw, tol)]
    B, T, H, V = LINEAR_SHAPE
    time_it(benchmark, "linear_grpo_loss", step, floor_ms=floor_ms, impl=spec.about,
            shape=dict(B=B, T=T, H=H, V=V), dtype="bfloat16", flops=3 * 2 * B * T * H * V,
            floor=f"the three lm_head matmuls, timed in this session ({floor_note})" if floor_ms else None,
            agreement=", ".join(checks))


# --- group advantages ------------------------------------------------------------------------------------

ADV_SHAPE = (512, 8) if CUDA else (64, 8)  # rewards [B], groups of G
ADV_IMPLS = {  # no bench_*.py script times these: this harness's own table
    "ours": Impl(None, "lgrpo group_advantages: one Triton launch"),
    "eager": Impl(None, "the PyTorch reference in fp32 (~10 small torch ops)"),
    "compile": Impl(None, "torch.compile of the PyTorch reference", smoke_skip=SLOW_COMPILE),
}


@pytest.fixture(scope="module")
def advantages_case():
    B, G = ADV_SHAPE
    gen = torch.Generator().manual_seed(0)
    # Rewards like the judge task's (0 / 0.5 / 1 steps plus a listener part): ties inside groups, and a
    # group whose rewards are all equal, whose advantages must be exactly 0.
    rewards = torch.randint(0, 3, (B,), generator=gen) * 0.5 + torch.rand(B, generator=gen) * 0.5
    rewards[:G] = 1.0
    return rewards.to(DEVICE), reference.group_advantages(rewards.double(), G).to(DEVICE)


@pytest.mark.parametrize("impl", pytest_ids(ADV_IMPLS))
def test_group_advantages(benchmark, advantages_case, impl):
    rewards, want = advantages_case
    B, G = ADV_SHAPE
    skip_unless_runnable(ADV_IMPLS[impl])
    fn = group_advantages if impl == "ours" else reference.group_advantages
    if impl == "compile":
        fn = torch.compile(fn)
    got = fn(rewards, G)
    check = agreement("advantages", got, want, 1e-5)
    assert (got[:G] == 0).all(), "a group of equal rewards must get advantage exactly 0"
    time_it(benchmark, "group_advantages", lambda: fn(rewards, G), calls=CALLS, impl=ADV_IMPLS[impl].about,
            shape=dict(B=B, G=G), dtype="float32", bytes=2 * B * rewards.element_size(),
            floor="none: a few KB, launch-bound", agreement=check)


# --- listener_confidence ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def listener_cases() -> dict:
    """case -> (shape label, argument tuples (rotating buffers / positions), bytes a call must read, fp64
    (probs, logp) of the first tuple)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    cases = {}
    for case, make in listener_bench.CASES.items():
        label, inputs, n_bytes = make(not CUDA, DEVICE, gen)
        logits, positions, cand = inputs[0]
        rows = logits if positions is None else logits[torch.arange(logits.shape[0], device=DEVICE), positions]
        cases[case] = label, inputs, n_bytes, reference.listener_confidence(rows.double(), None, cand)
    return cases


@pytest.mark.parametrize("impl", pytest_ids(listener_bench.IMPLS))
@pytest.mark.parametrize("case", list(listener_bench.CASES))
def test_listener_confidence(benchmark, listener_cases, copy_gbs, case, impl):
    label, inputs, n_bytes, (want_probs, want_logp) = listener_cases[case]
    if impl.startswith("ours") and not ops.HAS_EXTENSION:
        pytest.skip("lgrpo._C is not loaded: 'ours' would time the PyTorch reference")
    skip_unless_runnable(listener_bench.IMPLS[impl])
    fn = listener_bench.implementation(impl)
    probs, logp = fn(*inputs[0])
    checks = [agreement("probs", probs, want_probs, 1e-5), agreement("logp", logp, want_logp, 1e-5)]
    rotating = itertools.cycle(inputs)  # back-to-back calls read different buffers / rows, not L2's copy
    time_it(benchmark, f"listener_confidence {case}", lambda: fn(*next(rotating)), calls=CALLS,
            floor_ms=copy_floor_ms(n_bytes, copy_gbs), impl=listener_bench.IMPLS[impl].about,
            shape=dict(logits=list(inputs[0][0].shape), K=len(listener_bench.CANDIDATES), case=label), dtype="bfloat16",
            bytes=n_bytes, floor="one read of the rows at the copy bandwidth", agreement=", ".join(checks))


# --- the rollout sampler ---------------------------------------------------------------------------------

SAMPLER_VOCAB = sampler_bench.QWEN_V if CUDA else sampler_bench.SMOKE_VOCAB


def kernel_args(rows_b: int) -> tuple[torch.Tensor, ...]:
    """The engine kernel's (key, row ids, positions, temperature) for one decoding step, temperature 1."""
    return (key_tensor(1, 2, DEVICE), torch.arange(rows_b, device=DEVICE),
            torch.zeros(1, dtype=torch.long, device=DEVICE).expand(rows_b), torch.ones(1, device=DEVICE))


def samplers(rows_b: int, u: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """impl -> logits [rows_b, V] -> one token id per row (temperature 1, no top-p): the script's samplers and
    the engine's kernel."""
    args = kernel_args(rows_b)
    return {"ours": lambda z: sample_tokens(z, *args)[0], **sampler_bench.samplers(rows_b, u, DEVICE)}


@pytest.mark.parametrize("impl", pytest_ids(sampler_bench.IMPLS))
@pytest.mark.parametrize("rows_b", sampler_bench.ROWS)
def test_sampler(benchmark, copy_gbs, rows_b, impl):
    logits, u = sampler_bench.make_logits(rows_b, SAMPLER_VOCAB, DEVICE)
    fn = samplers(rows_b, u)[impl]
    # Samplers draw with different noise, so each is held to what pins it down: the kernel draws exactly its
    # PyTorch twin's tokens; the fixed-point sampler and the one before it the same tokens from the same
    # uniforms; and every one, on logits where one token per row outweighs the rest by e^100, that token.
    if impl == "ours":
        want, empty = reference.sample_tokens(logits, *kernel_args(rows_b))
        assert not empty.any() and torch.equal(fn(logits), want), "the kernel's tokens differ from its PyTorch twin's"
        check = "same tokens as the PyTorch twin"
    elif impl in ("fixed_point", "cumsum_fp64"):
        agree = sampler_bench.check_old_new_agree(logits, u, impl)
        check = f"fixed-point and fp64-cumsum samplers agree on {agree:.0%} of rows"
    else:
        check = "the certain token drawn"
    hot = torch.randint(0, SAMPLER_VOCAB, (rows_b,), generator=torch.Generator().manual_seed(rows_b)).to(DEVICE)
    peaked = logits.clone()
    peaked[torch.arange(rows_b, device=DEVICE), hot] += 100.0
    assert torch.equal(fn(peaked), hot), f"{impl} did not draw the token that holds all the probability"
    del peaked
    n_bytes = logits.numel() * logits.element_size()
    time_it(benchmark, f"sampler [{rows_b},V]", lambda: fn(logits), calls=CALLS,
            floor_ms=copy_floor_ms(n_bytes, copy_gbs), impl=sampler_bench.IMPLS[impl].about,
            shape=dict(B=rows_b, V=SAMPLER_VOCAB), dtype="float32", bytes=n_bytes,
            floor="one read of the logits at the copy bandwidth", agreement=check)
