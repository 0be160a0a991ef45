"""Triton GRPO kernels (token_logprobs, grpo_loss, group_advantages) against the fp64 reference.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1); the tests
marked `gpu` run the compiled kernels at realistic sizes.
"""

import math

import pytest
import torch
from grpo_checks import (
    GRAD_TOL,
    VALUE_RTOL,
    assert_close_rel,
    assert_matches_reference,
    fp64,
    grpo_case,
    one_row_programs,  # noqa: F401  (fixture)
    run_loss,
    run_reference64,
    small_tiles,  # noqa: F401  (fixture)
)
from lgrpo.kernels import PER_SEQUENCE, _common, group_advantages, grpo_loss, loss_options, token_logprobs
from lgrpo.kernels import reference as ref

pytestmark = pytest.mark.skipif(not _common.HAS_TRITON, reason="needs triton")

OPTION_SETS = {
    "plain": dict(),
    "full": dict(temperature=0.7, eps_low=0.2, eps_high=0.28, delta=1.5, beta=0.04),
}


# ---------------------------------------------------------------------------------------------
# grpo_loss: every loss type x ratio level x option set
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_loss_matches_fp64(gen, small_tiles, loss_type, level, options):  # noqa: F811
    case = grpo_case(gen, ref_logp=bool(OPTION_SETS[options]))
    opts = dict(OPTION_SETS[options], loss_type=loss_type, importance_level=level)
    out, grad = run_loss(grpo_loss, case, **opts)
    want, want_grad = run_reference64(case, **opts)
    assert_matches_reference(out, grad, want, want_grad, torch.float32)
    assert (grad[~case["mask"]] == 0).all() and (out.logp[~case["mask"]] == 0).all()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_one_row_per_program_and_per_token_advantages(gen, one_row_programs, level):  # noqa: F811
    case = grpo_case(gen, B=2, T=4, V=53, per_token_adv=True)
    opts = dict(OPTION_SETS["full"], importance_level=level, loss_type="grpo")
    out, grad = run_loss(grpo_loss, case, grad_scale=-2.5, **opts)  # grad_output != 1 reaches the kernel
    want, want_grad = run_reference64(case, grad_scale=-2.5, **opts)
    assert_matches_reference(out, grad, want, want_grad, torch.float32)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_layout(gen, small_tiles, level):  # noqa: F811
    lengths = [3, 1, 0, 5]
    N, V = sum(lengths), 29
    logits = torch.randn(N, V, generator=gen) * 2
    targets = torch.randint(0, V, (N,), generator=gen)
    mask = torch.rand(N, generator=gen) < 0.8
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    adv = torch.randn(len(lengths), generator=gen)
    case = dict(logits=logits, targets=targets, advantages=adv, mask=mask,
                old_logp=-3 + 0.3 * torch.randn(N, generator=gen),
                ref_logp=-3 + 0.3 * torch.randn(N, generator=gen))
    for loss_type in ("grpo", "dr_grpo"):
        opts = dict(OPTION_SETS["full"], cu_seqlens=cu, importance_level=level, loss_type=loss_type)
        out, grad = run_loss(grpo_loss, case, **opts)
        want, want_grad = run_reference64(case, **opts)
        assert_matches_reference(out, grad, want, want_grad, torch.float32)


@pytest.mark.parametrize("old", [True, False], ids=["off_policy", "on_policy"])
@pytest.mark.parametrize("loss_type,level", [("grpo", "sequence"), ("dapo", "token")])
def test_kl_bias_correction_matches_fp64(gen, small_tiles, loss_type, level, old):  # noqa: F811
    # TRL's use_bias_correction_kl: beta * r * kl, gradient through the (unclipped) ratio r
    case = grpo_case(gen, old=old)
    opts = dict(OPTION_SETS["full"], beta=0.3, loss_type=loss_type, importance_level=level, kl_bias_correction=True)
    out, grad = run_loss(grpo_loss, case, grad_scale=-1.3, **opts)
    want, want_grad = run_reference64(case, grad_scale=-1.3, **opts)
    assert_matches_reference(out, grad, want, want_grad, torch.float32)
    plain, plain_grad = run_loss(grpo_loss, case, grad_scale=-1.3, **dict(opts, kl_bias_correction=False))
    assert not torch.allclose(grad, plain_grad), "the switch must reach the kernel"
    if not old:  # on-policy the ratio is 1: same loss, another gradient
        assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)


def test_overrides_num_items_and_max_len(gen, small_tiles):  # noqa: F811
    case = grpo_case(gen, B=2, T=4, V=20)
    for opts in (dict(loss_type="dapo", num_items=17), dict(loss_type="dapo", num_items=torch.tensor(0.5)),
                 dict(loss_type="dr_grpo", max_len=9)):
        out, grad = run_loss(grpo_loss, case, **opts)
        want, want_grad = run_reference64(case, **opts)
        assert_matches_reference(out, grad, want, want_grad, torch.float32)


def test_loss_options_pick_each_loss_types_normaliser(gen):
    """loss_options: the one rule the trainer and the TRL/verl adapters map loss types with."""
    case = {k: fp64(v) for k, v in grpo_case(gen, B=3, T=5, V=20).items()}
    live = int(case["mask"].sum())

    def loss(**opts):
        return float(run_loss(ref.grpo_loss, case, **opts)[0].loss)

    # bnpo over a count is dapo over it: the batch's own count gives bnpo's mean, twice it half of it
    assert loss_options("bnpo", num_items=2 * live) == {"loss_type": "dapo", "num_items": 2 * live}
    assert loss(**loss_options("bnpo", num_items=live)) == pytest.approx(loss(loss_type="bnpo"), rel=1e-12)
    assert loss(**loss_options("bnpo", num_items=2 * live)) == pytest.approx(loss(loss_type="bnpo") / 2, rel=1e-12)
    assert loss_options("bnpo") == {"loss_type": "bnpo"}
    # dapo with num_items 1 is the token sum a caller divides by its own normaliser
    assert loss(**loss_options("dapo", num_items=1)) == pytest.approx(live * loss(loss_type="bnpo"), rel=1e-12)
    assert loss_options("dr_grpo", num_items=9, max_len=7) == {"loss_type": "dr_grpo", "max_len": 7}
    assert loss_options("grpo", num_items=9, max_len=7) == {"loss_type": "grpo"}  # divides by neither
    assert set(PER_SEQUENCE) == {"grpo", "dr_grpo"}
    with pytest.raises(ValueError, match="loss_type must be one of.*'sapo'"):
        loss_options("sapo")


def test_on_policy_loss_is_minus_mean_advantage(gen, small_tiles):  # noqa: F811
    # old_logp=None: ratio 1, loss -mean(A) over live tokens, gradient -A * (onehot - p) / n
    case = grpo_case(gen, B=3, T=4, V=23, old=False, ref_logp=False, all_masked_seq=False)
    out, grad = run_loss(grpo_loss, case, loss_type="bnpo")
    m = case["mask"]
    expect = -(case["advantages"][:, None].expand_as(m)[m]).mean()
    assert out.loss.item() == pytest.approx(expect.item(), rel=1e-5, abs=1e-6)
    want, want_grad = run_reference64(case, loss_type="bnpo")
    assert_matches_reference(out, grad, want, want_grad, torch.float32)
    assert not out.clipped.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes_against_fp32_truth(gen, small_tiles, dtype):  # noqa: F811
    case = grpo_case(gen, B=2, T=6, V=41, dtype=dtype)
    opts = dict(OPTION_SETS["full"], loss_type="dapo")
    out, grad = run_loss(grpo_loss, case, **opts)
    want, want_grad = run_reference64(case, **opts)
    assert_matches_reference(out, grad, want, want_grad, dtype)


def test_large_logits_and_minus_inf(gen, one_row_programs):  # noqa: F811
    B, T, V = 2, 4, 40
    logits = torch.randn(B, T, V, generator=gen) * 1e4
    logits[0, 1, 5] = logits[1, 2, :7].fill_(-math.inf)[0]  # -inf entries, straddling tile edges
    targets = logits.argmax(-1)  # logp ~ 0 (the max) ...
    targets[:, ::2] = torch.randint(7, V, (B, (T + 1) // 2), generator=gen)  # ... and ~ -1e4
    mask = torch.ones(B, T, dtype=torch.bool)
    case = dict(logits=logits, targets=targets, advantages=torch.randn(B, generator=gen), mask=mask,
                old_logp=None, ref_logp=None)
    opts = dict(temperature=3.0, loss_type="grpo")
    out, grad = run_loss(grpo_loss, case, **opts)
    want, want_grad = run_reference64(case, **opts)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(grad).all()
    # fp32 holds z - lse to a few ulps of |z| / tau ~ 3e3, i.e. ~1e-3: p (and the gradient) carry
    # that relative error, whoever computes them in fp32.
    assert_matches_reference(out, grad, want, want_grad, torch.float32, grad_tol=2e-3)


def test_single_token_and_all_masked(gen, small_tiles):  # noqa: F811
    case = grpo_case(gen, B=3, T=1, V=19, all_masked_seq=False)
    out, grad = run_loss(grpo_loss, case, **OPTION_SETS["full"])
    want, want_grad = run_reference64(case, **OPTION_SETS["full"])
    assert_matches_reference(out, grad, want, want_grad, torch.float32)

    case["mask"][:] = False
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        out, grad = run_loss(grpo_loss, case, loss_type=loss_type)
        assert out.loss.item() == 0.0 and (grad == 0).all() and not out.clipped.any()
        assert (out.logp == 0).all() and (out.entropy == 0).all()


def test_inplace_grad_reuses_the_logits_buffer(gen, small_tiles):  # noqa: F811
    case = grpo_case(gen, B=2, T=5, V=33, dtype=torch.bfloat16)
    opts = dict(OPTION_SETS["full"], loss_type="grpo")
    _, want_grad = run_loss(grpo_loss, case, **opts)
    # Non-leaf logits, as in a model: the gradient lands in their buffer, then flows to `base`.
    base = case["logits"].float().requires_grad_()
    logits = base.to(torch.bfloat16)
    args = {k: v for k, v in case.items() if k != "logits"}
    grads = {}
    logits.register_hook(lambda g: grads.setdefault("g", g))
    out = grpo_loss(logits, **args, **opts, inplace_grad=True)
    out.loss.backward()
    assert grads["g"].data_ptr() == logits.data_ptr()  # no gradient buffer was allocated
    torch.testing.assert_close(logits.detach(), want_grad, rtol=0, atol=0)  # logits now hold the gradient
    torch.testing.assert_close(base.grad, want_grad.float(), rtol=0, atol=0)
    # A leaf's .grad adopts the logits' buffer itself (no copy by autograd either).
    leaf = case["logits"].clone().requires_grad_()
    grpo_loss(leaf, **args, **opts, inplace_grad=True).loss.backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()
    torch.testing.assert_close(leaf.grad, want_grad, rtol=0, atol=0)


def test_strided_logits_view_is_read_in_place(gen, small_tiles):  # noqa: F811
    # TRL-style logits[:, :-1]: batch/time strides of a longer tensor, no copy needed.
    case = grpo_case(gen, B=2, T=4, V=21)
    full = torch.cat([case["logits"], torch.randn(2, 1, 21, generator=gen)], dim=1).requires_grad_()
    view = full[:, :-1]
    assert not view.is_contiguous()
    args = {k: v for k, v in case.items() if k != "logits"}
    out = grpo_loss(view, **args, **OPTION_SETS["full"])
    out.loss.backward()
    want, want_grad = run_reference64(case, **OPTION_SETS["full"])
    assert_close_rel(out.loss, want.loss, VALUE_RTOL, atol_scale=1.0)
    assert_close_rel(full.grad[:, :-1], want_grad, GRAD_TOL[torch.float32])
    assert (full.grad[:, -1] == 0).all()


@pytest.mark.slow
def test_long_sequence_beyond_grid_axis_limits(gen):
    # 131072 rows > 65535: rows must be on grid axis 0. Tiny V keeps the interpreter fast.
    B, T, V = 1, 131072, 6
    # On a GPU (V = 152k) every row is its own program, all on axis 0:
    assert _common.row_launch(T, 152064, _common.MAX_BLOCK_V_FWD, 1)[3] == (T,)
    # The interpreter runs programs one by one (~ms each), so here rows are packed 512 per program.
    # On-policy (ratio 1): among ~10^5 random off-policy ratios some land within fp32 rounding of a
    # clip bound, where fp32 and fp64 may legitimately disagree on which term is active.
    case = grpo_case(gen, B=B, T=T, V=V, mask_p=0.9, old=False)
    for level in ("token", "sequence"):
        opts = dict(beta=0.04, importance_level=level, loss_type="grpo")
        out, grad = run_loss(grpo_loss, case, **opts)
        want, want_grad = run_reference64(case, **opts)
        assert_matches_reference(out, grad, want, want_grad, torch.float32)


def test_torch_compile_fullgraph(gen, small_tiles):  # noqa: F811
    case = grpo_case(gen, B=2, T=3, V=17)
    args = {k: v for k, v in case.items() if k != "logits"}

    def step(logits, inplace):
        out = grpo_loss(logits, **args, beta=0.04, loss_type="grpo", inplace_grad=inplace)
        return out.loss + token_logprobs(logits, case["targets"].clamp(min=0)).sum() * 0.01, out.entropy

    for inplace in (False, True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        x_eager = case["logits"].clone().requires_grad_()
        x_comp = case["logits"].clone().requires_grad_()
        loss_e, ent_e = step(x_eager * 1.0, inplace)
        loss_c, ent_c = compiled(x_comp * 1.0, inplace)
        loss_e.backward()
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss_e)
        torch.testing.assert_close(ent_c, ent_e)
        torch.testing.assert_close(x_comp.grad, x_eager.grad)


# ---------------------------------------------------------------------------------------------
# token_logprobs and group_advantages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_logprobs_matches_fp64(gen, small_tiles, dtype):  # noqa: F811
    for shape, V in (((3, 4), 37), ((5,), 64), ((2, 1, 3), 11)):
        logits = (torch.randn(*shape, V, generator=gen) * 3).to(dtype).requires_grad_()
        targets = torch.randint(0, V, shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        lp = token_logprobs(logits, targets, temperature=0.8)
        lp.backward(g)
        x64 = logits.detach().double().requires_grad_()
        want = ref.token_logprobs(x64, targets, temperature=0.8)
        want.backward(g.double())
        assert lp.dtype == torch.float32 and lp.shape == shape
        assert_close_rel(lp, want, VALUE_RTOL, atol_scale=1.0)
        assert logits.grad.dtype == dtype
        assert_close_rel(logits.grad, x64.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_matches_fp64(gen, scale):
    for G, n_groups in ((4, 3), (1, 3), (5, 300)):
        rewards = torch.rand(G * n_groups, generator=gen)
        if G > 1:
            rewards[G:2 * G] = 0.25  # an all-equal group
        got = group_advantages(rewards, G, scale)
        want = ref.group_advantages(rewards.double(), G, scale)
        assert got.dtype == torch.float32 and got.shape == rewards.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        if G > 1:
            assert (got[G:2 * G] == 0).all()
    bf16 = torch.rand(8, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(group_advantages(bf16, 4, scale).double(),
                               ref.group_advantages(bf16.double(), 4, scale), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# dispatch and errors
# ---------------------------------------------------------------------------------------------


def test_fallback_to_reference(gen, monkeypatch):
    calls = []
    real = ref.grpo_loss
    monkeypatch.setattr(ref, "grpo_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = grpo_case(gen, B=2, T=2, V=5)
    grpo_loss(**{**case, "logits": case["logits"].double()})  # fp64: the reference's job
    assert calls == [1]
    monkeypatch.setattr(_common, "INTERPRET", False)  # CPU tensor, no interpreter
    if not torch.cuda.is_available():
        grpo_loss(**case)
        assert calls == [1, 1]


def _bad(case, **changes):
    return {**case, **changes}


ERROR_CASES = [
    (dict(targets=torch.zeros(3, 4, dtype=torch.long)), ValueError, "targets must have shape"),
    (dict(targets=torch.full((3, 5), 37)), IndexError, r"token id 37, outside the vocabulary \[0, 37\)"),
    (dict(targets=torch.full((3, 5), -1)), IndexError, "token id -1"),
    (dict(targets=torch.zeros(3, 5)), ValueError, "targets must hold integer token ids"),
    (dict(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "mask must have the targets' shape"),
    (dict(advantages=torch.zeros(4)), ValueError, "advantages must be per sequence"),
    (dict(advantages=torch.zeros(3, dtype=torch.long)), ValueError, "advantages must be floating point"),
    (dict(old_logp=torch.zeros(3, 4)), ValueError, "old_logp must have the targets' shape"),
    (dict(ref_logp=torch.zeros(3, 4)), ValueError, "ref_logp must have the targets' shape"),
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(importance_level="tok"), ValueError, "importance_level must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(eps_low=1.0), ValueError, "eps_low must be < 1"),
    (dict(eps_high=-0.1), ValueError, "eps_low and eps_high must be >= 0"),
    (dict(delta=0.5), ValueError, "delta"),
    (dict(beta=0.1, ref_logp=None), ValueError, "beta > 0 needs ref_logp"),
    (dict(beta=-0.1), ValueError, "beta must be >= 0"),
    (dict(max_len=0), ValueError, "max_len must be >= 1"),
    (dict(num_items=torch.ones(2)), ValueError, "num_items must be a scalar"),
    (dict(cu_seqlens=torch.tensor([0, 15])), ValueError, "cu_seqlens is only for packed"),
    (dict(kl_bias_correction="yes"), ValueError, "kl_bias_correction must be a bool"),
]


@pytest.mark.parametrize("changes,exc,message", ERROR_CASES, ids=[c[2][:28] for c in ERROR_CASES])
def test_grpo_loss_errors_name_the_argument(gen, changes, exc, message):
    case = grpo_case(gen, B=3, T=5, V=37, all_masked_seq=False, mask_p=1.1)
    with pytest.raises(exc, match=message):
        grpo_loss(**_bad(case, **changes))


def test_packed_errors_and_masked_ids_ignored(gen):
    logits, targets = torch.randn(6, 9, generator=gen), torch.randint(0, 9, (6,), generator=gen)
    adv = torch.zeros(2)
    with pytest.raises(ValueError, match="need cu_seqlens"):
        grpo_loss(logits, targets, adv)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to N"):
        grpo_loss(logits, targets, adv, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
        grpo_loss(logits, targets, adv, cu_seqlens=torch.tensor([0.0, 6.0]))
    # a masked-out row may hold any id (e.g. -100) and is never read
    targets[2], mask = -100, torch.arange(6) != 2
    out = grpo_loss(logits, targets, adv, mask, cu_seqlens=torch.tensor([0, 3, 6]))
    assert torch.isfinite(out.loss) and out.logp[2] == 0


def test_token_logprobs_errors(gen):
    logits = torch.randn(2, 3, 7, generator=gen)
    with pytest.raises(ValueError, match="targets must have shape"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(IndexError, match="token id 7"):
        token_logprobs(logits, torch.full((2, 3), 7))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=-1.0)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(4), 2, "mean")
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        group_advantages(torch.zeros(5), 2)


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at the real vocabulary size
# ---------------------------------------------------------------------------------------------

V_QWEN = 152064


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_grpo_loss_qwen_vocab_bf16(level):
    gen = torch.Generator().manual_seed(1234)
    case = grpo_case(gen, B=4, T=48, V=V_QWEN, dtype=torch.bfloat16, mask_p=0.9)
    case = {k: (v.cuda() if v is not None else None) for k, v in case.items()}
    opts = dict(OPTION_SETS["full"], eps_high=0.28, loss_type="dapo", importance_level=level)
    out, grad = run_loss(grpo_loss, case, **opts)
    want, want_grad = run_reference64(case, **opts)
    assert_matches_reference(out, grad, want, want_grad, torch.bfloat16)
    # in-place mode: same gradient bits, written into the logits' buffer
    logits = case["logits"].clone().requires_grad_()
    args = {k: v for k, v in case.items() if k != "logits"}
    grpo_loss(logits, **args, **opts, inplace_grad=True).loss.backward()
    assert torch.equal(logits.grad, grad)


@pytest.mark.gpu
def test_gpu_grpo_loss_memory():
    # Out of place: the gradient buffer and a few N-sized vectors; in place: only the vectors.
    B, T, V = 2, 512, V_QWEN
    gen = torch.Generator().manual_seed(7)
    case = {k: (v.cuda() if v is not None else None)
            for k, v in grpo_case(gen, B=B, T=T, V=V, dtype=torch.bfloat16).items()}
    grad_bytes = case["logits"].numel() * 2
    slack = 64 * B * T * 4 + (8 << 20)  # per-token fp32/bool vectors + allocator rounding
    args = {k: v for k, v in case.items() if k != "logits"}
    grpo_loss(case["logits"].clone().requires_grad_(), **args, beta=0.04).loss.backward()  # warm-up
    for inplace, budget in ((False, grad_bytes + slack), (True, slack)):
        logits = case["logits"].clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grpo_loss(logits, **args, beta=0.04, inplace_grad=inplace).loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= budget, f"inplace={inplace}: peak {peak / 2**20:.1f} MiB > {budget / 2**20:.1f} MiB"


@pytest.mark.gpu
def test_gpu_token_logprobs_and_advantages():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(300, V_QWEN, generator=gen) * 2).to(torch.bfloat16).cuda().requires_grad_()
    targets = torch.randint(0, V_QWEN, (300,), generator=gen).cuda()
    lp = token_logprobs(logits, targets)
    lp.sum().backward()
    x64 = logits.detach().double().requires_grad_()
    want = ref.token_logprobs(x64, targets)
    want.sum().backward()
    assert_close_rel(lp, want, VALUE_RTOL, atol_scale=1.0)
    assert_close_rel(logits.grad, x64.grad, GRAD_TOL[torch.bfloat16])
    rewards = torch.rand(64, generator=gen).cuda()
    torch.testing.assert_close(group_advantages(rewards, 8).double(),
                               ref.group_advantages(rewards.double(), 8), rtol=1e-5, atol=1e-5)


def test_benchmark_smoke(run_bench):
    """bench/bench_grpo_loss.py at smoke sizes through the interpreter: every row of ours is measured."""
    data = run_bench("bench_grpo_loss", "grpo_loss")
    ours = [r for r in data["rows"] if r["name"].startswith("ours")]
    assert ours and all(r["ms"] == r["ms"] and r["ms"] > 0 for r in ours), data["rows"]
