"""linear_grpo_loss (fused lm_head + GRPO loss) against the fp64 reference, which materialises logits.

On CPU the Triton kernels run through the interpreter and the matmuls through torch; the tests marked
`gpu` run the compiled kernels and cuBLAS at realistic sizes.
"""

import pytest
import torch
from grpo_checks import VALUE_RTOL, assert_close_rel, small_tiles  # noqa: F401  (fixture)
from lgrpo.kernels import _common, linear_grpo_loss
from lgrpo.kernels import linear_grpo as linear_module
from lgrpo.kernels import reference as ref
from lgrpo.kernels.linear_grpo import default_chunk_rows, plan_chunks

pytestmark = pytest.mark.skipif(not _common.HAS_TRITON, reason="needs triton")

FULL = dict(temperature=0.7, eps_low=0.2, eps_high=0.28, delta=1.5, beta=0.04)
GRAD_TOL = {torch.float32: 2e-5}


def linear_case(gen, B=3, T=7, H=23, V=37, *, dtype=torch.float32, mask_p=0.7, packed=False, spread=0.3,
                temperature=1.0):
    """Odd sizes (no multiple of any block); an all-masked sequence; old/ref within ``3 * spread`` of the
    current logp at ``temperature`` (pass the loss's temperature for ratios near 1; at another
    temperature the log-ratios are O(1), whatever the spread).

    bf16 cases use a small ``spread`` and the loss's temperature: bf16 logits move logp by ~1e-2, so a
    ratio within ~1% of a clip bound may legitimately switch sides against the exact computation (any
    bf16 code would); log-ratios within 3 * 0.02 + ~1e-2 stay far from log(0.8) = -0.22.
    """
    hidden = torch.randn(B, T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < mask_p
    mask[0, :2] = True
    mask[-1] = False
    targets[~mask] = -100
    with torch.no_grad():
        lp = ref.token_logprobs(hidden.double() @ weight.double().T, targets.clamp(min=0), temperature).float()
    adv = torch.randn(B, generator=gen)
    case = dict(hidden=hidden, weight=weight, targets=targets, advantages=adv, mask=mask,
                old_logp=lp + spread * torch.randn(B, T, generator=gen).clamp(-3, 3),
                ref_logp=lp + spread * torch.randn(B, T, generator=gen).clamp(-3, 3))
    if packed:  # drop the padding: [N, H] rows + cu_seqlens
        lengths = mask.sum(1)
        case = dict(hidden=hidden[mask], weight=weight, targets=targets[mask], advantages=case["advantages"],
                    old_logp=case["old_logp"][mask], ref_logp=case["ref_logp"][mask],
                    cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))
    return case


def run(fn, case, grad_scale=1.0, leaves="hw", **options):
    """(output, d/d hidden, d/d weight) after a backward of ``loss * grad_scale``; ``leaves``: which of
    hidden ("h") and weight ("w") require a gradient (the other's is None)."""
    hidden = case["hidden"].detach().clone().requires_grad_("h" in leaves)
    weight = case["weight"].detach().clone().requires_grad_("w" in leaves)
    cu = case.get("cu_seqlens")
    args = {k: v for k, v in case.items() if k not in ("hidden", "weight", "cu_seqlens")}
    if cu is not None:
        options = dict(options, cu_seqlens=cu)
    out = fn(hidden, weight, **args, **options)
    (out.loss * grad_scale).backward()
    return out, hidden.grad, weight.grad


def run_ref64(case, grad_scale=1.0, **options):
    case64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in case.items()}
    options.pop("chunk_size", None)
    options.pop("fp32_weight_grad", None)
    return run(ref.linear_grpo_loss, case64, grad_scale, **options)


def assert_linear_matches(got, want, *, value_rtol=VALUE_RTOL, grad_tol=2e-5):
    (out, gh, gw), (rout, rgh, rgw) = got, want
    assert_close_rel(out.loss, rout.loss, value_rtol, atol_scale=1.0, what="loss")
    for name in ("logp", "entropy", "kl"):
        want_t = getattr(rout, name)
        scale = max(1.0, want_t.abs().max().item())
        assert_close_rel(getattr(out, name), want_t, value_rtol, atol_scale=scale, what=name)
    assert torch.equal(out.clipped, rout.clipped)
    assert gh.dtype == out_dtype(got) and gw.dtype == out_dtype(got)
    assert_close_rel(gh, rgh, grad_tol, what="d loss / d hidden")
    assert_close_rel(gw, rgw, grad_tol, what="d loss / d weight")


def out_dtype(got):
    return got[1].dtype


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_linear_matches_fp64(gen, small_tiles, loss_type, level):  # noqa: F811
    case = linear_case(gen)
    # chunks of 4 live rows split sequences (token level) / pack whole ones (sequence level)
    opts = dict(FULL, loss_type=loss_type, importance_level=level, chunk_size=4)
    got = run(linear_grpo_loss, case, grad_scale=-1.7, **opts)
    want = run_ref64(case, grad_scale=-1.7, **opts)
    assert_linear_matches(got, want)
    assert (got[1][~case["mask"]] == 0).all(), "masked rows get no hidden gradient"


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_linear_packed_default_chunk_and_on_policy(gen, small_tiles, level):  # noqa: F811
    case = linear_case(gen, B=4, T=6, V=41, packed=True)
    for opts in (dict(FULL, loss_type="grpo"), dict(loss_type="bnpo", old_logp=None)):
        opts = dict(opts, importance_level=level)
        c = dict(case, old_logp=opts.pop("old_logp", case["old_logp"]))
        assert_linear_matches(run(linear_grpo_loss, c, **opts), run_ref64(c, **opts))


@pytest.mark.parametrize("level,on_policy", [("token", True), ("sequence", False)])
def test_linear_kl_bias_correction(gen, small_tiles, level, on_policy):  # noqa: F811
    case = linear_case(gen)
    if on_policy:
        case["old_logp"] = None
    opts = dict(FULL, beta=0.3, loss_type="bnpo", importance_level=level, chunk_size=4, kl_bias_correction=True)
    got = run(linear_grpo_loss, case, grad_scale=0.7, **opts)
    assert_linear_matches(got, run_ref64(case, grad_scale=0.7, **opts))
    plain = run(linear_grpo_loss, case, grad_scale=0.7, **dict(opts, kl_bias_correction=False))
    assert not torch.allclose(got[1], plain[1]), "the switch must reach the kernel"


def test_linear_sequence_longer_than_chunk(gen, small_tiles):  # noqa: F811
    # sequence level with chunk_size 2 < every sequence: each sequence gets a chunk of its own
    case = linear_case(gen, B=3, T=6, mask_p=0.9)
    opts = dict(FULL, importance_level="sequence", loss_type="dr_grpo", chunk_size=2)
    assert_linear_matches(run(linear_grpo_loss, case, **opts), run_ref64(case, **opts))


def test_linear_per_token_advantages_num_items_max_len(gen, small_tiles):  # noqa: F811
    case = linear_case(gen, B=2, T=6, V=31)
    case["advantages"] = torch.randn(2, 6, generator=gen)
    for opts in (dict(loss_type="dapo", num_items=40), dict(loss_type="dr_grpo", max_len=11)):
        opts = dict(FULL, **opts, chunk_size=3)
        assert_linear_matches(run(linear_grpo_loss, case, **opts), run_ref64(case, **opts))


def test_masked_rows_are_never_projected(gen, small_tiles):  # noqa: F811
    case = linear_case(gen)
    case["hidden"][~case["mask"]] = float("nan")  # a masked row that were read would poison everything
    out, gh, gw = run(linear_grpo_loss, case, **FULL, chunk_size=5)
    assert torch.isfinite(out.loss) and torch.isfinite(gw).all()
    assert torch.isfinite(gh[case["mask"]]).all() and (gh[~case["mask"]] == 0).all()


def test_linear_bf16_equals_exact_math_on_its_bf16_logits(gen, small_tiles):  # noqa: F811
    # bf16 hidden/weight: the logits are rounded to bf16 (as eager bf16 would); the loss terms are then
    # exact fp32 arithmetic on those rounded logits, and the gradients carry bf16 roundings.
    # The gradients are compared with exact arithmetic on the *unrounded* logits, so every ratio must
    # sit a margin away from the clip bounds [0.8, 1.28] on both (at the loss's temperature).
    case = linear_case(gen, B=2, T=9, H=40, V=45, dtype=torch.bfloat16, spread=0.02,
                       temperature=FULL["temperature"])
    # |advantage| >= 0.5, so the policy term carries the gradient. With ref within 0.02 of logp the KL
    # term's coefficient 1 - exp(ref - logp) is ~0.02, a difference bf16 logits move at first order;
    # with an advantage near 0 that term was the whole (tiny) gradient (seed 497: adv -0.0012,
    # d loss / d weight off by 4%).
    adv = case["advantages"]
    case["advantages"] = torch.where(adv < 0, -0.5, 0.5) + adv
    opts = dict(FULL, loss_type="dapo", chunk_size=4)
    out, gh, gw = run(linear_grpo_loss, case, **opts)
    logits = (case["hidden"].float() @ case["weight"].float().T).to(torch.bfloat16).double()
    m, old = case["mask"], case["old_logp"].double()
    for lg in (logits, case["hidden"].double() @ case["weight"].double().T):
        ratio = (ref.token_logprobs(lg, case["targets"].clamp(min=0), FULL["temperature"]) - old).exp()[m]
        assert ((ratio > 1 - FULL["eps_low"] + 0.05) & (ratio < 1 + FULL["eps_high"] - 0.05)).all(), ratio
    args = {k: v for k, v in case.items() if k not in ("hidden", "weight")}
    args = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in args.items()}
    on_rounded = ref.grpo_loss(logits, **args, **{k: v for k, v in opts.items() if k != "chunk_size"})
    assert_close_rel(out.loss, on_rounded.loss, VALUE_RTOL, atol_scale=1.0)
    assert_close_rel(out.logp, on_rounded.logp, VALUE_RTOL, atol_scale=on_rounded.logp.abs().max().item())
    assert_close_rel(out.entropy, on_rounded.entropy, VALUE_RTOL, atol_scale=1.0)
    # gradients against exact arithmetic on the bf16 inputs: bf16-level agreement
    _, rgh, rgw = run_ref64(case, **opts)
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert_close_rel(gh, rgh, 3e-2, what="d loss / d hidden")
    assert_close_rel(gw, rgw, 3e-2, what="d loss / d weight")


def test_weight_grad_bf16_accumulation_bound(gen, small_tiles):  # noqa: F811
    """Across K chunks the bf16 weight gradient differs from an fp32-accumulated one (same products)
    by at most (K + 1) u sum_t |D_t| |h_t| elementwise, u = 2^-8 (the bound the docs state)."""
    case = linear_case(gen, B=4, T=12, H=16, V=24, dtype=torch.bfloat16, mask_p=0.9, spread=0.02)
    opts = dict(FULL, loss_type="dapo", chunk_size=4)
    n_live = int(case["mask"].sum())
    k_chunks = -(-n_live // 4)
    _, _, gw16 = run(linear_grpo_loss, case, **opts)
    _, _, gw32 = run(linear_grpo_loss, case, **opts, fp32_weight_grad=True)
    assert gw16.dtype == gw32.dtype == torch.bfloat16
    # sum_t |D_t| |h_t| from the fp64 truth of dL/dlogits
    case64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in case.items()}
    logits = (case64["hidden"] @ case64["weight"].T).requires_grad_()
    args = {k: v for k, v in case64.items() if k not in ("hidden", "weight")}
    ref.grpo_loss(logits, **args, **{k: v for k, v in opts.items() if k != "chunk_size"}).loss.backward()
    d_abs, h_abs = logits.grad.abs().reshape(-1, 24), case64["hidden"].abs().reshape(-1, 16)
    bound = (k_chunks + 1) * 2.0**-8 * 1.05 * (d_abs.T @ h_abs)
    diff = (gw16.double() - gw32.double()).abs()
    assert (diff <= bound + 1e-30).all(), f"max excess {(diff - bound).max().item():.3e}"
    assert k_chunks >= 5


def test_requires_grad_combinations(gen, small_tiles):  # noqa: F811
    case = linear_case(gen, B=2, T=5, V=30)
    _, want_gh, want_gw = run_ref64(case, **FULL)
    args = {k: v for k, v in case.items() if k not in ("hidden", "weight")}
    # frozen lm_head (LoRA-style): only the hidden gradient
    h = case["hidden"].clone().requires_grad_()
    linear_grpo_loss(h, case["weight"], **args, **FULL, chunk_size=3).loss.backward()
    assert_close_rel(h.grad, want_gh, 2e-5)
    w = case["weight"].clone().requires_grad_()
    linear_grpo_loss(case["hidden"], w, **args, **FULL, chunk_size=3).loss.backward()
    assert_close_rel(w.grad, want_gw, 2e-5)
    with torch.no_grad():
        out = linear_grpo_loss(case["hidden"], case["weight"], **args, **FULL)
    want = ref.linear_grpo_loss(case["hidden"].double(), case["weight"].double(),
                                **{k: (v.double() if v is not None and v.is_floating_point() else v)
                                   for k, v in args.items()}, **FULL)
    assert_close_rel(out.loss, want.loss, VALUE_RTOL, atol_scale=1.0)


def test_linear_all_masked_gives_zero(gen, small_tiles):  # noqa: F811
    case = linear_case(gen, B=2, T=3)
    case["mask"][:] = False
    out, gh, gw = run(linear_grpo_loss, case, **FULL)
    assert out.loss.item() == 0.0 and (gh == 0).all() and (gw == 0).all()


def test_linear_torch_compile_fullgraph(gen, small_tiles):  # noqa: F811
    case = linear_case(gen, B=2, T=5, V=29)
    args = {k: v for k, v in case.items() if k not in ("hidden", "weight")}
    for level in ("token", "sequence"):
        def step(h, w):
            return linear_grpo_loss(h, w, **args, **FULL, importance_level=level, chunk_size=3,  # noqa: B023
                                    overlap=level == "sequence").loss * 2  # noqa: B023
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        he, we = case["hidden"].clone().requires_grad_(), case["weight"].clone().requires_grad_()
        hc, wc = case["hidden"].clone().requires_grad_(), case["weight"].clone().requires_grad_()
        step(he, we).backward()
        compiled(hc, wc).backward()
        torch.testing.assert_close(hc.grad, he.grad)
        torch.testing.assert_close(wc.grad, we.grad)


def test_plan_chunks():
    counts = [3, 0, 5, 2]  # live rows per sequence; rows 0-2 | 3-7 | 8-9
    chunks, bounds, seqs, first = plan_chunks(counts, 4, whole_sequences=False)
    assert chunks == [(0, 4), (4, 8), (8, 10)]
    assert first == [0, 2, 3, 4] and seqs == [0, 2, 2, 3]
    assert bounds == [0, 3, 4, 4, 8, 8, 10]  # per chunk: [0, 3, 4] [4, 8] [8, 10]
    chunks, bounds, seqs, first = plan_chunks(counts, 4, whole_sequences=True)
    assert chunks == [(0, 3), (3, 8), (8, 10)]  # the 5-row sequence gets a chunk of its own
    assert seqs == [0, 2, 3] and bounds == [0, 3, 3, 8, 8, 10]
    chunks, _, seqs, _ = plan_chunks(counts, 100, whole_sequences=True)
    assert chunks == [(0, 10)] and seqs == [0, 2, 3]
    assert plan_chunks([0, 0], 4, whole_sequences=False)[0] == []
    assert default_chunk_rows(152064, 2) == 768 and default_chunk_rows(152064, 4) == 384
    assert default_chunk_rows(152064, 2, buffers=2) == 384  # overlap's two buffers: the memory of one
    assert default_chunk_rows(10**9, 4) == 1


def test_linear_errors(gen):
    case = linear_case(gen, B=2, T=3, H=8, V=11)
    h, w = case.pop("hidden"), case.pop("weight")
    with pytest.raises(ValueError, match="weight must be the lm_head matrix"):
        linear_grpo_loss(h, w[0], **case)
    with pytest.raises(ValueError, match="H = 8"):
        linear_grpo_loss(h[..., :5], w, **case)
    with pytest.raises(ValueError, match="must share a dtype"):
        linear_grpo_loss(h.to(torch.bfloat16), w, **case)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_grpo_loss(h, w, **case, chunk_size=0)
    with pytest.raises(IndexError, match="token id 11"):
        linear_grpo_loss(h, w, **dict(case, targets=torch.full((2, 3), 11)))
    with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
        linear_grpo_loss(h, w, **dict(case, ref_logp=None), beta=0.1)
    wg = w.clone().requires_grad_()
    loss = linear_grpo_loss(h, wg, **case).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# overlap=True: on CUDA the weight-gradient GEMMs run on a side stream; without CUDA the same schedule
# (buffers used in turn) runs in order and must give bit-identical results
# ---------------------------------------------------------------------------------------------


def assert_identical(got, want):
    (out, gh, gw), (rout, rgh, rgw) = got, want
    for name in ("loss", "logp", "entropy", "kl", "clipped"):
        assert torch.equal(getattr(out, name), getattr(rout, name)), name
    for name, a, b in (("d loss / d hidden", gh, rgh), ("d loss / d weight", gw, rgw)):
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), name


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_linear_overlap_bit_identical_on_cpu(gen, small_tiles, level):  # noqa: F811
    # bf16: the weight gradient's rounding depends on the chunking and the accumulation order, so
    # equality says both are unchanged; several chunks, so both buffers are used in turn. (Without a weight
    # gradient the option is not passed on at all: nothing to overlap.)
    case = linear_case(gen, B=4, T=7, V=37, dtype=torch.bfloat16, spread=0.02)
    variants = (dict(chunk_size=3), dict(chunk_size=5, fp32_weight_grad=True), dict(chunk_size=4, leaves="w"))
    for opts in variants:
        opts = dict(FULL, loss_type="grpo", importance_level=level, **opts)
        want = run(linear_grpo_loss, case, grad_scale=-1.3, **opts)
        for n_buf in (1, 2):
            got = run(linear_grpo_loss, case, grad_scale=-1.3, overlap=True, overlap_buffers=n_buf, **opts)
            assert_identical(got, want)


class LaggingSide:
    """Stands in for the CUDA side stream: runs its work as late as the overlap's waits allow (the worst a
    real side stream can do), so that a wait missing from the schedule gives wrong numbers on the CPU."""

    def __init__(self):
        self.queue, self.done = [], 0

    def guard(self, *tensors):
        pass

    def submit(self, work):
        self.queue.append(work)
        return len(self.queue)  # the event: "the first n pieces of work have run"

    def wait(self, event):
        while self.done < event:
            self.queue[self.done]()
            self.done += 1

    def join(self):
        self.wait(len(self.queue))


@pytest.mark.parametrize("n_buf", [1, 2])
def test_linear_overlap_schedule_with_a_lagging_side_stream(gen, small_tiles, monkeypatch, n_buf):  # noqa: F811
    sides = []
    monkeypatch.setattr(linear_module, "_overlap_stream", lambda device: sides.append(LaggingSide()) or sides[-1])
    case = linear_case(gen, B=4, T=7, V=37, dtype=torch.bfloat16, spread=0.02)
    for opts in (dict(chunk_size=3), dict(chunk_size=4, importance_level="sequence", fp32_weight_grad=True)):
        opts = dict(FULL, loss_type="dapo", **opts)
        want = run(linear_grpo_loss, case, grad_scale=0.6, **opts)
        got = run(linear_grpo_loss, case, grad_scale=0.6, overlap=True, overlap_buffers=n_buf, **opts)
        assert_identical(got, want)
    assert len(sides) == 2 and all(len(s.queue) >= 2 and s.done == len(s.queue) for s in sides)


def test_linear_overlap_default_chunk_keeps_the_buffer_memory(gen, small_tiles, monkeypatch):  # noqa: F811
    monkeypatch.setattr(linear_module, "CHUNK_BYTES", 8 * 37 * 2)  # default chunk: 8 rows of bf16 logits
    case = linear_case(gen, B=4, T=7, V=37, dtype=torch.bfloat16, spread=0.02)
    default, halved = run(linear_grpo_loss, case, **FULL), run(linear_grpo_loss, case, **FULL, chunk_size=4)
    assert_identical(default, run(linear_grpo_loss, case, **FULL, chunk_size=8))
    assert not torch.equal(default[2], halved[2]), "bf16 grad_W must tell the two chunkings apart"
    assert_identical(run(linear_grpo_loss, case, **FULL, overlap=True), halved)  # two buffers of 4 rows
    assert_identical(run(linear_grpo_loss, case, **FULL, overlap=True, overlap_buffers=1), default)


def test_linear_overlap_arguments(gen):
    case = linear_case(gen, B=2, T=3, H=8, V=11)
    h, w = case.pop("hidden"), case.pop("weight")
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="overlap must be a bool"):
            linear_grpo_loss(h, w, **case, overlap=bad)
    for bad in (0, 3, True, 2.0):
        with pytest.raises(ValueError, match="overlap_buffers must be 1 or 2"):
            linear_grpo_loss(h, w, **case, overlap=True, overlap_buffers=bad)


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels + cuBLAS at the real vocabulary size
# ---------------------------------------------------------------------------------------------


def _cuda(case):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def assert_bf16_matches(got, want):
    """bf16 logits and gradients against exact arithmetic: bf16-level agreement."""
    (out, gh, gw), (rout, rgh, rgw) = got, want
    assert_close_rel(out.loss, rout.loss, 2e-2, atol_scale=1.0, what="loss")
    assert_close_rel(out.logp, rout.logp, 2e-2, atol_scale=rout.logp.abs().max().item(), what="logp")
    assert_close_rel(gh, rgh, 3e-2, what="d loss / d hidden")
    assert_close_rel(gw, rgw, 3e-2, what="d loss / d weight")


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_linear_qwen_vocab(level):
    gen = torch.Generator().manual_seed(11)
    case = _cuda(linear_case(gen, B=3, T=160, H=512, V=152064, dtype=torch.bfloat16, mask_p=0.9,
                             spread=0.02))
    opts = dict(FULL, loss_type="dapo", importance_level=level, chunk_size=96)
    rout, rgh, rgw = run_ref64(case, **opts)
    assert_bf16_matches(run(linear_grpo_loss, case, **opts), (rout, rgh, rgw))
    _, _, gw32 = run(linear_grpo_loss, case, **opts, fp32_weight_grad=True)  # cuBLAS mixed-precision path
    assert gw32.dtype == torch.bfloat16
    assert_close_rel(gw32, rgw, 3e-2, what="d loss / d weight (fp32 accumulation)")


@pytest.mark.gpu
@pytest.mark.parametrize("n_buf", [0, 1, 2])  # 0: no overlap; else overlap with that many logits buffers
def test_gpu_linear_memory_bound(n_buf):
    # Peak extra = weight grad + hidden grad + n_buf (at least 1) chunks of logits + a few gathered hidden
    # chunks + small vectors; never N x V. The side stream's cuBLAS workspace is allocated once per process
    # (a new stream per call would add one to every call's peak).
    gen = torch.Generator().manual_seed(5)
    B, T, H, V, chunk = 4, 512, 1024, 32768, 256
    case = _cuda(linear_case(gen, B=B, T=T, H=H, V=V, dtype=torch.bfloat16, mask_p=0.9))
    hidden = case.pop("hidden").requires_grad_()
    weight = case.pop("weight").requires_grad_()
    buffers = max(n_buf, 1)
    expected = (V * H + B * T * H + buffers * chunk * V + chunk * H * (buffers + 2)) * 2 + 64 * B * T * 4 + (16 << 20)
    opts = dict(beta=0.04, chunk_size=chunk, overlap=n_buf > 0, overlap_buffers=buffers)
    # warm-up: cuBLAS allocates its workspace on first use, which is not ours to count
    linear_grpo_loss(hidden, weight, **case, **opts).loss.backward()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_grpo_loss(hidden, weight, **case, **opts).loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= expected, f"peak extra {peak / 2**20:.1f} MiB > {expected / 2**20:.1f} MiB"
    assert peak < B * T * V * 2, "never N x V"


def assert_same_as_sequential(got, want):
    """overlap=True against the same call without: the forward and grad_h are the same bits (same kernels on
    the same stream); grad_W's GEMMs run on the side stream, where cuBLAS might pick another algorithm, so
    within a bf16 rounding of the largest entry (a chunk read too early, too late or from a reused block
    is off by O(1) in its target rows)."""
    (out, gh, gw), (rout, rgh, rgw) = got, want
    for name in ("loss", "logp", "entropy", "kl", "clipped"):
        assert torch.equal(getattr(out, name), getattr(rout, name)), name
    assert (gh is None) == (rgh is None) and (gw is None) == (rgw is None)
    assert gh is None or torch.equal(gh, rgh), "d loss / d hidden"
    if gw is not None:
        assert_close_rel(gw, rgw, 2.0**-7, what="d loss / d weight")


@pytest.mark.gpu
@pytest.mark.parametrize("n_buf", [1, 2])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_linear_overlap(level, n_buf):
    # odd sizes; token level: 6 chunks with a ragged last one; sequence level: a chunk per sequence
    gen = torch.Generator().manual_seed(13)
    case = _cuda(linear_case(gen, B=5, T=101, H=328, V=50021, dtype=torch.bfloat16, mask_p=0.9, spread=0.02))
    opts = dict(FULL, loss_type="grpo", importance_level=level, chunk_size=72)
    overlap = dict(overlap=True, overlap_buffers=n_buf)
    got = run(linear_grpo_loss, case, **opts, **overlap)
    assert_bf16_matches(got, run_ref64(case, **opts))
    assert_same_as_sequential(got, run(linear_grpo_loss, case, **opts))
    for extra in (dict(fp32_weight_grad=True), dict(leaves="h"), dict(leaves="w")):
        assert_same_as_sequential(run(linear_grpo_loss, case, **opts, **extra, **overlap),
                                  run(linear_grpo_loss, case, **opts, **extra))


@pytest.mark.gpu
@pytest.mark.parametrize("n_buf", [1, 2])
def test_gpu_linear_overlap_stress(monkeypatch, n_buf):
    """Where a wait missing from the overlap gives wrong numbers: ~34 chunks of 16 rows whose weight-gradient
    GEMM (a read and a write of the [V, H] gradient: 0.6 GB in bf16, 1.2 GB in fp32) takes far longer than
    the chunk's logits GEMM and row passes, so the side stream is always as far behind as the waits let it be
    (waits 2, 3, 4 of the ordering argument in kernels/linear_grpo.py); and the current stream sleeps ~2 ms before
    the first chunk's row pass, so a side stream that did not wait for it would read the buffer early (1)."""
    gen = torch.Generator().manual_seed(17)
    case = _cuda(linear_case(gen, B=6, T=120, H=1024, V=152064, dtype=torch.bfloat16, mask_p=0.9, spread=0.02))
    stats, slept = linear_module.launch_row_stats, []

    def first_chunk_late(*args, **kwargs):
        if not slept:
            slept.append(True)
            torch.cuda._sleep(4_000_000)  # GPU cycles on the current stream: ~2 ms
        return stats(*args, **kwargs)

    for fp32 in (False, True):
        opts = dict(FULL, loss_type="dapo", chunk_size=16, fp32_weight_grad=fp32)
        want = run(linear_grpo_loss, case, **opts)
        slept.clear()
        monkeypatch.setattr(linear_module, "launch_row_stats", first_chunk_late)
        got = run(linear_grpo_loss, case, **opts, overlap=True, overlap_buffers=n_buf)
        monkeypatch.setattr(linear_module, "launch_row_stats", stats)
        assert slept
        assert_same_as_sequential(got, want)


def test_benchmark_smoke(run_bench):
    """bench/bench_linear_grpo.py at smoke sizes: ours agrees with eager, the per-chunk model is written."""
    data = run_bench("bench_linear_grpo", "linear_grpo")
    rows = {r["name"]: r for r in data["rows"]}
    ours = [r for name, r in rows.items() if name.startswith(("ours (chunk", "ours overlap"))]
    assert {name for name in rows if name.startswith("ours overlap")} == {"ours overlap (1 x 4 rows)",
                                                                        "ours overlap (2 x 4 rows)"}
    assert ours and all(r["ms"] > 0 for r in ours)
    for r in ours:  # "loss diff X, grad_h relerr Y, grad_W relerr Z"
        errs = [float(part.split()[-1]) for part in r["note"].split(";")[0].split(",")]
        assert errs[0] < 1e-4 and max(errs[1:]) < 2e-2, r["note"]
    model = [r for name, r in rows.items() if name.startswith("model:")]
    assert model and set(model[0]["extra"]["per_chunk_ms"]) >= {"logits", "stats", "grad pass", "grad_h"}
    assert rows["eager matmul + loss"]["ms"] > 0
