"""The shared-prefix attention backends (sdpa, flex, varlen) against the attention they replace.

The truth at the attention level is SDPA on each completion's prompt repeated in front of it, built
here by hand from the segment lengths (not from lgrpo.attention's mask); at the model level, plain
transformers on repeated prompts (tests/test_scoring.py's truth). On CPU: sdpa forward and backward,
flex forward (torch has no CPU backward for it), varlen's packing through a reference varlen kernel
written here (FlashAttention itself is CUDA-only: the real kernels run in the GPU-marked tests, in
bench/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from lgrpo import attention as A
from lgrpo.attention import flex as flex_backend
from lgrpo.attention import varlen as varlen_backend
from lgrpo.attention.layout import Segments, allowed
from lgrpo.model import load_model
from lgrpo.scoring import completion_logprobs
from tests.test_scoring import _assert_close, _completions, _truth_vlm

pytestmark = pytest.mark.usefixtures("reference_kernels")

CASES = {
    # prompt lengths, completion lengths, group (completion n continues prompt group[n])
    "groups": ([7, 3, 12], [4, 6, 1, 5, 5, 2], [0, 0, 1, 1, 2, 2]),
    "ragged, empty, out of order": ([37, 5, 130], [9, 0, 140, 3, 1, 20], [2, 0, 0, 2, 1, 0]),
    "G = 1, one-token prompt": ([1, 9], [3, 8], [0, 1]),
    "one prompt, one block edge": ([128], [128, 127, 129], [0, 0, 0]),
}


def _case(name, device="cpu"):
    p, c, g = CASES[name]
    return Segments.of(torch.tensor(p), torch.tensor(c), torch.tensor(g, device=device))


def _qkv(segments, gen, heads=4, kv_heads=2, dim=16, grad=False):
    t = int(segments.prompt_lengths.sum() + segments.completion_lengths.sum())
    q = torch.randn(heads, t, dim, generator=gen)
    k, v = (torch.randn(kv_heads, t, dim, generator=gen) for _ in range(2))
    return [x.requires_grad_(grad) for x in (q, k, v)]


def _truth(segments, q, k, v):
    """Each prompt causally; each completion after a copy of its prompt, causally: the repeated layout."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    lp, lc = segments.prompt_lengths.tolist(), segments.completion_lengths.tolist()
    starts = [sum(lp[:i]) for i in range(len(lp))]
    out = []
    for s, n in zip(starts, lp):
        out.append(F.scaled_dot_product_attention(q[:, s:s + n], k[:, s:s + n], v[:, s:s + n], is_causal=True))
    c0 = sum(lp)
    for n, g in zip(lc, segments.group.tolist()):
        if n:
            rows = list(range(starts[g], starts[g] + lp[g])) + list(range(c0, c0 + n))
            full = F.scaled_dot_product_attention(q[:, rows], k[:, rows], v[:, rows], is_causal=True)
            out.append(full[:, lp[g]:])
        c0 += n
    return torch.cat(out, 1).transpose(0, 1)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale):
    """What a FlashAttention varlen call computes (causal aligned bottom right), one sequence at a time."""
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1), k[cu_k[i]:cu_k[i + 1]].transpose(0, 1)
        vs = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1)
        nq, nk = qs.shape[1], ks.shape[1]
        mask = torch.arange(nk)[None] <= torch.arange(nq)[:, None] + (nk - nq)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                  enable_gqa=True).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("case", CASES)
def test_dense_mask_is_the_repeated_attention(case, gen):
    s = _case(case)
    q, k, v = _qkv(s, gen)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=A.dense_mask(s), enable_gqa=True).transpose(0, 1)
    _assert_close(got, _truth(s, q, k, v), case)


@pytest.mark.parametrize("case", CASES)
def test_sdpa_backend_forward_and_backward(case, gen):
    s = _case(case)
    q, k, v = _qkv(s, gen, grad=True)
    got = A.BACKENDS["sdpa"].build(s).attend(q, k, v, 0.0, None)
    want = _truth(s, q, k, v)
    _assert_close(got, want, "output")
    w = torch.randn(want.shape, generator=gen)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, torch.autograd.grad((want * w).sum(), (q, k, v))):
        _assert_close(a, b, f"d{name}")


@pytest.mark.parametrize("case", CASES)
def test_varlen_packing_forward_and_backward(case, gen, monkeypatch):
    """The cu_seqlens and packed keys the varlen backend hands FlashAttention, through a reference kernel."""
    monkeypatch.setattr(varlen_backend, "varlen_kernel", lambda: _reference_varlen)
    s = _case(case)
    q, k, v = _qkv(s, gen, grad=True)
    layout = A.BACKENDS["varlen"].build(s)
    got = layout.attend(q, k, v, 0.0, None)
    want = _truth(s, q, k, v)
    _assert_close(got, want, "output")
    w = torch.randn(want.shape, generator=gen)
    for name, a, b in zip("qkv", torch.autograd.grad((got * w).sum(), (q, k, v)),
                          torch.autograd.grad((want * w).sum(), (q, k, v))):
        _assert_close(a, b, f"d{name}")
    assert layout.max_key == max(int(s.prompt_lengths[g] + c) for g, c in zip(s.group, s.completion_lengths))


def _assert_same_block_mask(s):
    segment, reads = s.token_segments()
    t = len(segment)

    def mask_mod(b, h, q, k):
        return allowed(segment, reads, q, k)

    ours = flex_backend.block_mask(s, mask_mod)
    theirs = create_block_mask(mask_mod, None, None, t, t, device="cpu", BLOCK_SIZE=flex_backend.BLOCK)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    for a, b in ((ours.kv_num_blocks, theirs.kv_num_blocks), (ours.full_kv_num_blocks, theirs.full_kv_num_blocks)):
        assert torch.equal(a.flatten(), b.flatten())
    assert ours.seq_lengths == (t, t)


@pytest.mark.parametrize("case", CASES)
def test_flex_block_mask_equals_torch_create_block_mask(case):
    """Counted from the segment intervals (no T x T mask): the same tiles, partial and full, as torch's own
    builder evaluating the rule on every pair."""
    _assert_same_block_mask(_case(case))


def test_flex_block_mask_on_random_layouts(gen):
    """Fresh random geometries: tile edges falling inside, at the start and at the end of prompts and
    completions, empty completions, several tiles per segment and several segments per tile."""
    for _ in range(12):
        p = int(torch.randint(1, 4, (1,), generator=gen))
        n = int(torch.randint(1, 9, (1,), generator=gen))
        prompts = torch.randint(1, 300, (p,), generator=gen)
        completions = torch.randint(0, 200, (n,), generator=gen) * (torch.rand(n, generator=gen) > 0.15)
        _assert_same_block_mask(Segments.of(prompts, completions, torch.randint(0, p, (n,), generator=gen)))


@pytest.mark.slow
def test_flex_backend_forward(gen):
    """Compiled flex_attention (the first call compiles, ~10-20 s on CPU). Compiled with dynamic shapes, a
    new length does not recompile (dynamo would fall back to eager after 8): two compiles at most, the
    second when a one-tile sequence (sizes of 1 are specialised) is followed by a longer one."""
    from torch._dynamo.utils import counters

    before = counters["frames"]["total"]
    for case in CASES:
        s = _case(case)
        q, k, v = _qkv(s, gen)
        with torch.no_grad():
            got = A.BACKENDS["flex"].build(s).attend(q, k, v, 0.0, None)
        _assert_close(got, _truth(s, q, k, v), case)
    assert counters["frames"]["total"] - before <= 2


def test_flex_backend_refuses_gradients_on_cpu(gen):
    s = _case("groups")
    q, k, v = _qkv(s, gen, grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        A.BACKENDS["flex"].build(s).attend(q, k, v, 0.0, None)


def test_check_backend_catches_a_wrong_kernel(monkeypatch):
    """The self-check ``auto`` runs before it trusts varlen: passes with the right alignment, fails with
    top-left causal alignment (the easiest way for a varlen kernel to be wrong)."""
    monkeypatch.setattr(A, "_checked", {})
    monkeypatch.setattr(varlen_backend, "varlen_kernel", lambda: _reference_varlen)
    A.check_backend("varlen", "cpu", torch.float32)

    def top_left(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale):
        return _reference_varlen(q, k[: len(q)], v[: len(q)], cu_q, cu_q, max_q, max_q, dropout, scale)

    monkeypatch.setattr(A, "_checked", {})
    monkeypatch.setattr(varlen_backend, "varlen_kernel", lambda: top_left)
    with pytest.raises(ValueError, match="disagrees.*output"):
        A.check_backend("varlen", "cpu", torch.float32)

    class WrongBackward(torch.autograd.Function):  # the right output, a 10% wrong gradient
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.1 * g

    def wrong_grad(q, *args):
        return _reference_varlen(WrongBackward.apply(q), *args)

    monkeypatch.setattr(A, "_checked", {})
    monkeypatch.setattr(varlen_backend, "varlen_kernel", lambda: wrong_grad)
    with pytest.raises(ValueError, match="disagrees.*dq"):
        A.check_backend("varlen", "cpu", torch.float32)


def _torch_varlen_release(release: str, calls: list):
    """Stand-ins for torch.nn.attention.varlen.varlen_attn as each release spells it, computing with the
    reference kernel: 2.10 takes ``is_causal`` and has no ``scale`` (always 1/sqrt(head dim)); 2.11 takes
    ``window_size`` and ``scale``; 2.13 adds ``enable_gqa`` (required for grouped heads)."""

    def check(cu_q, cu_k):
        assert cu_q.dtype == cu_k.dtype == torch.int32

    def release_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        check(cu_seq_q, cu_seq_k)
        assert is_causal, "2.10 spells causal is_causal=True"
        calls.append(None)
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, None)

    def release_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
        check(cu_seq_q, cu_seq_k)
        assert window_size == (-1, 0), "causal: the left window unbounded, nothing to the right"
        calls.append(None)
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, scale)

    def release_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        check(cu_seq_q, cu_seq_k)
        assert window_size == (-1, 0), "causal: the left window unbounded, nothing to the right"
        calls.append(enable_gqa)
        assert enable_gqa == (query.shape[1] != key.shape[1])
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, scale)

    return {"2.10": release_2_10, "2.11": release_2_11, "2.13": release_2_13}[release]


@pytest.fixture
def torch_varlen_on_cuda(monkeypatch):
    """The varlen backend's torch path as on a GPU without flash-attn, with ``varlen_attn`` replaced by the
    stand-in a test installs; a fresh check cache and warning set."""
    from lgrpo import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model, "flash_attn_available", lambda: False)
    monkeypatch.setattr(A, "_checked", {})
    monkeypatch.setattr(A, "_warned", set())

    def install(fn):
        import torch.nn.attention.varlen as torch_varlen

        monkeypatch.setattr(torch_varlen, "varlen_attn", fn)
    return install


@pytest.mark.parametrize("torch_release", ["2.10", "2.11", "2.13"])
def test_torch_varlen_attn_is_called_as_each_release_spells_it(torch_release, torch_varlen_on_cuda, gen):
    """Without flash-attn the backend calls torch.nn.attention.varlen.varlen_attn, whose keywords differ by
    release (read from its signature): each spelling, standing in for torch's function with the reference
    kernel, passes the self-check on grouped heads; passing 2.13's ``enable_gqa`` or 2.11's ``scale`` and
    ``window_size`` to 2.10's raises TypeError. A scale other than 1/sqrt(d) reaches every release (2.10's
    folded into the queries)."""
    calls = []
    torch_varlen_on_cuda(_torch_varlen_release(torch_release, calls))
    A.check_backend("varlen", "cpu", torch.float32)
    assert calls and all(c is (True if torch_release == "2.13" else None) for c in calls)
    s = _case("groups")
    q, k, v = _qkv(s, gen)
    layout = A.BACKENDS["varlen"].build(s)
    _assert_close(layout.attend(q, k, v, 0.0, 0.3), A.BACKENDS["sdpa"].build(s).attend(q, k, v, 0.0, 0.3), "scale")


def test_a_varlen_kernel_that_cannot_be_called_falls_back_to_sdpa(torch_varlen_on_cuda, monkeypatch):
    """``auto`` on CUDA in bf16 runs the varlen check first; a kernel that raises TypeError (a torch whose
    varlen_attn takes other keywords) or a varlen_attn with no causal argument at all is a failed check:
    sdpa, with a warning naming the error, never the error at the first shared-prefix forward."""
    real = A._compare_with_dense
    # the check's own code, on the CPU (there is no GPU here): only the device it allocates on changes
    monkeypatch.setattr(A, "_compare_with_dense", lambda backend, device, dtype: real(backend, torch.device("cpu"),
                                                                                       dtype))

    def other_keywords(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        raise TypeError("varlen_attn() got an unexpected keyword argument 'window_size'")

    def no_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None):
        raise AssertionError("never called: the signature is refused first")

    for fn, says in ((other_keywords, "TypeError: varlen_attn.. got an unexpected keyword"),
                     (no_causal, "takes neither window_size nor is_causal")):
        torch_varlen_on_cuda(fn)
        monkeypatch.setattr(A, "_checked", {})
        with pytest.warns(RuntimeWarning, match=f"varlen backend is not used on cuda.*{says}.*using sdpa"):
            assert A.resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "sdpa"
        with pytest.raises((ValueError, RuntimeError), match=says):  # the benchmarks' catch, too
            A.check_backend("varlen", torch.device("cuda"), torch.bfloat16)


def test_check_backend_passes_the_cpu_backends_even_in_inference_mode(monkeypatch):
    monkeypatch.setattr(A, "_checked", {})
    with torch.inference_mode():  # auto may resolve inside a no-gradient forward
        A.check_backend("sdpa", "cpu", torch.float32)
        A.check_backend("flex", "cpu", torch.float32)  # forward only: no backward on CPU


def test_attention_runs_in_the_autocast_dtype(gen):
    """fp32 weights under bf16 autocast: the rotary embedding leaves q, k in fp32 beside a bf16 v; every
    backend receives the three in autocast's dtype (FlashAttention takes one 16-bit dtype)."""
    s = _case("groups")
    q, k, v = _qkv(s, gen)
    seen = []

    class Recording(A.SharedPrefixLayout):
        num_tokens = q.shape[1]

        def attend(self, query, key, value, dropout, scale):
            seen.append({x.dtype for x in (query, key, value)})
            return torch.zeros(query.shape[1], query.shape[0], value.shape[-1], dtype=value.dtype)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = A.shared_prefix_attention(None, q[None], k[None], v[None].bfloat16(), Recording())
    A.shared_prefix_attention(None, q[None], k[None], v[None], Recording())
    assert seen == [{torch.bfloat16}, {torch.float32}] and out.shape == (1, q.shape[1], 4, 16)


def test_auto_layout_builds_once_per_forward(vlm, batcher, pairs, gen, monkeypatch):
    """``auto`` resolves at the first layer and every later layer reuses that layout (the host syncs of a
    build happen once per forward, not per layer)."""
    builds = []
    real = A.SdpaLayout.build.__func__

    def counting(cls, segments):
        builds.append(len(segments.group))
        return real(cls, segments)

    monkeypatch.setattr(A.SdpaLayout, "build", classmethod(counting))
    texts, images = pairs
    ids, mask = _completions(gen, 6, 5, 500)
    with torch.no_grad():
        completion_logprobs(vlm, batcher.reasoner_batch(texts, images), ids, mask, 2)
    assert vlm.config.get_text_config().num_hidden_layers > 1 and builds == [6]


def test_resolve_and_build_validate():
    assert A.resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert A.resolve_backend("flex", torch.device("cpu"), torch.float32) == "flex"
    with pytest.raises(ValueError, match="prefix_attention must be one of"):
        A.resolve_backend("flash", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="prefix_attention must be one of"):
        A.build_layout(torch.tensor([2]), torch.tensor([1]), torch.tensor([0]), "dense")
    with pytest.raises(ValueError, match="completion_lengths"):
        A.build_layout(torch.tensor([2]), torch.tensor([1, 2]), torch.tensor([0]), "sdpa")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            A.check_backend("varlen", "cpu", torch.float32)


@pytest.fixture(scope="module")
def vlm():
    from tests.toy_task import sharpened

    return sharpened(load_model("tiny", seed=1), 4.0)


@pytest.mark.slow
def test_flex_model_forward_equals_repeated_prompts(vlm, batcher, pairs, gen):
    """The tiny VLM's no-gradient passes (reference, old log-probs, listener) on the flex backend."""
    texts, images = pairs
    prompts = batcher.reasoner_batch(texts, images)
    ids, mask = _completions(gen, 6, 9, 500)
    with torch.no_grad():
        got = completion_logprobs(vlm, prompts, ids, mask, 2, prefix_attention="flex")
        want = _truth_vlm(vlm, batcher, texts, images, ids, mask, 2)
    _assert_close(got[mask], want[mask], "log-probs")


# --- on a GPU (bench/gpu_check.sh runs these) --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen"])
def test_gpu_backend_forward_and_backward(backend, gen):
    """The real kernels (FlashAttention varlen, compiled flex) in bf16 against the fp32 truth."""
    for case in CASES:
        s = _case(case, "cuda")
        q, k, v = _qkv(s, gen, heads=8, kv_heads=2, dim=128)
        q, k, v = (x.cuda().bfloat16().requires_grad_() for x in (q, k, v))
        got = A.BACKENDS[backend].build(s).attend(q, k, v, 0.0, None)
        ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
        want = _truth(s, *ref)
        assert (got.float() - want).abs().max().item() < 2e-2, case
        w = torch.randn(want.shape, device="cuda")
        grads = torch.autograd.grad((got.float() * w).sum(), (q, k, v))
        for a, b in zip(grads, torch.autograd.grad((want * w).sum(), ref)):
            assert (a.float() - b).abs().max().item() <= 3e-2 * b.abs().max().item() + 1e-3, case


@pytest.mark.gpu
def test_gpu_auto_picks_a_checked_varlen():
    assert A.resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "varlen"
    assert A.resolve_backend("auto", torch.device("cuda"), torch.float32) == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen"])
def test_gpu_trainer_precision_on_the_tiny_vlm(backend, batcher, pairs, gen):
    """The single-GPU trainer's setting: fp32 weights, bf16 autocast, the fused loss backward. Log-probs
    and gradients of each backend against the repeated path in the same precision."""
    from lgrpo.group import GroupBatch
    from lgrpo.scoring import CompletionScorer

    model = load_model("tiny", seed=1, device="cuda", dtype=torch.float32)
    texts, images = pairs
    prompts = batcher.reasoner_batch(texts, images).to("cuda")
    ids, mask = _completions(gen, 6, 9, 500)
    batch = GroupBatch.grouped(prompts, ids.cuda(), mask.cuda(), 2)
    adv = torch.randn(3, generator=gen).repeat_interleave(2).cuda()
    out = {}
    for name, kw in (("repeated", dict(shared_prefix=False)), (backend, dict(prefix_attention=backend))):
        scorer = CompletionScorer(model, autocast_dtype=torch.bfloat16, **kw)
        loss, logp = scorer(batch, loss={"advantages": adv, "loss_type": "dapo"})[:2]
        loss.backward()
        out[name] = (logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    (lp, grads), (lp_ref, grads_ref) = out[backend], out["repeated"]
    m = mask.cuda()
    assert (lp - lp_ref)[m].abs().max().item() < 0.1
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        scale = grads_ref[n].abs().max().item()
        assert (grads[n] - grads_ref[n]).abs().max().item() <= 0.1 * scale + 1e-4, n
