"""The reference itself, checked against a slow scalar transcription of SPEC §2.

Everything else is tested against the reference, so the reference is tested against loops that
follow the written formulas one token at a time, in Python floats.
"""

import math

import pytest
import torch
from lgrpo.kernels import reference as ref


def naive_grpo(logits, targets, adv, mask, old, refl, *, temperature, eps_low, eps_high, delta, beta,
               loss_type, level, max_len=None, num_items=None, kl_bias_correction=False):
    """SPEC §2, token by token. Padded inputs: logits [B,T,V], everything else [B,T] / [B]."""
    B, T, _ = logits.shape
    logp = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if mask[i][t]:
                row = [float(v) / temperature for v in logits[i, t]]
                mx = max(row)
                lse = mx + math.log(sum(math.exp(v - mx) for v in row))
                logp[i][t] = row[int(targets[i, t])] - lse
    per_tok = [[0.0] * T for _ in range(B)]
    for i in range(B):
        n_i = sum(int(mask[i][t]) for t in range(T))
        seq_lr = sum(logp[i][t] - (float(old[i, t]) if old is not None else logp[i][t])
                     for t in range(T) if mask[i][t]) / max(n_i, 1)
        for t in range(T):
            if not mask[i][t]:
                continue
            lr = logp[i][t] - (float(old[i, t]) if old is not None else logp[i][t])
            r = math.exp(seq_lr if level == "sequence" else lr)
            a = float(adv[i]) if adv.dim() == 1 else float(adv[i, t])
            r_hat = min(r, delta) if delta is not None else r
            loss = -min(r_hat * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if beta > 0:
                d = float(refl[i, t]) - logp[i][t]
                loss += beta * (r if kl_bias_correction else 1.0) * (math.exp(d) - d - 1)
            per_tok[i][t] = loss
    total = sum(sum(row) for row in per_tok)
    n = sum(int(mask[i][t]) for i in range(B) for t in range(T))
    if loss_type == "grpo":
        return sum(sum(per_tok[i]) / max(sum(int(m) for m in mask[i]), 1) for i in range(B)) / B
    if loss_type == "bnpo":
        return total / max(n, 1)
    if loss_type == "dapo":
        return total / max(num_items if num_items is not None else n, 1)
    return total / (B * (max_len if max_len is not None else T))


@pytest.mark.parametrize("kl_bias_correction", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_reference_matches_scalar_formula(gen, loss_type, level, kl_bias_correction):
    B, T, V = 3, 5, 7
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[2] = False  # an all-masked sequence
    old = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3 - 2
    refl = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3 - 2
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    opts = dict(temperature=0.7, eps_low=0.2, eps_high=0.28, delta=1.5, beta=0.04, loss_type=loss_type,
                kl_bias_correction=kl_bias_correction)
    out = ref.grpo_loss(logits, targets, adv, mask, old, refl, importance_level=level, **opts)
    expect = naive_grpo(logits, targets, adv, mask.tolist(), old, refl, level=level, **opts)
    assert out.loss.item() == pytest.approx(expect, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_reference_kl_bias_correction_gradient(gen, level, on_policy):
    """The ratio that weights the KL carries gradient (TRL multiplies by its differentiable coef_1):
    autograd on the reference equals finite differences of the value, which it would not if the
    ratio were detached; on-policy (ratio 1) the loss is unchanged but the gradient is not."""
    B, T, V = 2, 3, 5
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        lp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    old = None if on_policy else lp + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    refl = lp + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    opts = dict(beta=0.3, importance_level=level, loss_type="grpo")
    pinned = lp if on_policy else old  # on-policy, old = logp.detach() = lp at these logits

    def loss(z, correction, old_logp=pinned):
        return ref.grpo_loss(z, targets, adv, mask, old_logp, refl, kl_bias_correction=correction, **opts).loss

    assert torch.autograd.gradcheck(lambda z: loss(z, True), (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)
    (g_pinned,) = torch.autograd.grad(loss(logits, True), logits)
    (g_plain,) = torch.autograd.grad(loss(logits, False), logits)
    (g,) = torch.autograd.grad(loss(logits, True, old), logits)  # old=None when on-policy
    torch.testing.assert_close(g, g_pinned, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(g, g_plain), "the correction must change the KL gradient"
    if on_policy:  # ratio 1: same value, different gradient
        torch.testing.assert_close(loss(logits, True, None), loss(logits, False, None), rtol=1e-12, atol=1e-12)


def test_reference_per_token_advantages_and_overrides(gen):
    B, T, V = 2, 4, 6
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    for loss_type, kw in (("dapo", dict(num_items=17)), ("dr_grpo", dict(max_len=9))):
        out = ref.grpo_loss(logits, targets, adv, mask, loss_type=loss_type, **kw)
        expect = naive_grpo(logits, targets, adv, mask.tolist(), None, None, temperature=1.0, eps_low=0.2,
                            eps_high=0.2, delta=None, beta=0.0, loss_type=loss_type, level="token",
                            max_len=kw.get("max_len"), num_items=kw.get("num_items"))
        assert out.loss.item() == pytest.approx(expect, rel=1e-10)


def test_reference_on_policy_loss_is_minus_mean_advantage(gen):
    # Ratio 1 everywhere: the surrogate is -A, whatever the logits.
    B, T, V = 4, 3, 5
    logits = torch.randn(B, T, V, generator=gen)
    adv = torch.randn(B, generator=gen)
    out = ref.grpo_loss(logits, torch.randint(0, V, (B, T), generator=gen), adv, loss_type="grpo")
    assert out.loss.item() == pytest.approx(-adv.mean().item(), rel=1e-5, abs=1e-6)
    assert not out.clipped.any()


def test_reference_packed_equals_padded(gen):
    lengths = [3, 1, 4]
    B, T, V = len(lengths), max(lengths), 9
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    old = torch.randn(B, T, generator=gen, dtype=torch.float64) - 2
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    for level in ("token", "sequence"):
        for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
            padded = ref.grpo_loss(logits, targets, adv, mask, old, importance_level=level, loss_type=loss_type)
            packed = ref.grpo_loss(logits[mask], targets[mask], adv, None, old[mask], cu_seqlens=cu,
                                   importance_level=level, loss_type=loss_type)
            torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(packed.logp, padded.logp[mask])
            torch.testing.assert_close(packed.entropy, padded.entropy[mask])


def test_reference_outputs(gen):
    B, T, V = 2, 3, 11
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    logits[0, 0, 3] = -math.inf  # entropy must stay finite with a zero-probability token
    targets = torch.randint(4, V, (B, T), generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    refl = torch.randn(B, T, generator=gen, dtype=torch.float64) - 2
    out = ref.grpo_loss(logits, targets, torch.ones(B, dtype=torch.float64), mask, ref_logp=refl, temperature=2.0)
    lsm = (logits / 2.0).log_softmax(-1)
    p = lsm.exp()
    ent = -(p * lsm.nan_to_num(neginf=0.0)).sum(-1)
    lp = lsm.gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(out.logp, torch.where(mask, lp, 0))
    torch.testing.assert_close(out.entropy, torch.where(mask, ent, 0))
    d = refl - lp
    torch.testing.assert_close(out.kl, torch.where(mask, d.exp() - d - 1, 0))
    assert torch.isfinite(out.entropy).all()


def test_reference_clipped_flags():
    # One token per sequence, V = 2, so logp is set exactly through the logits.
    logits = torch.zeros(4, 1, 2, dtype=torch.float64)
    targets = torch.zeros(4, 1, dtype=torch.long)
    logp = math.log(0.5)
    old = torch.tensor([[logp - math.log(1.5)], [logp - math.log(0.5)], [logp - math.log(1.5)], [logp]],
                       dtype=torch.float64)  # ratios 1.5, 0.5, 1.5, 1.0
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    out = ref.grpo_loss(logits, targets, adv, None, old)
    # clipped active: ratio above 1+eps with A > 0, ratio below 1-eps with A < 0; never inside the range
    assert out.clipped[:, 0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_formula(gen, scale):
    G = 4
    rewards = torch.rand(12, generator=gen)
    rewards[4:8] = 0.5  # an all-equal group
    got = ref.group_advantages(rewards, G, scale)
    r = rewards.double().view(-1, G)
    centred = r - r.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (r.std() + 1e-4)
    centred[1] = 0
    torch.testing.assert_close(got.double(), centred.view(-1), rtol=1e-5, atol=1e-6)
    assert (got[4:8] == 0).all()


def test_listener_confidence_reference(gen):
    B, T, V = 3, 4, 10
    logits = torch.randn(B, T, V, generator=gen)
    pos = torch.tensor([0, 3, 1])
    cands = torch.tensor([2, 7])
    probs, logp = ref.listener_confidence(logits, pos, cands, temperature=0.5)
    for b in range(B):
        z = logits[b, pos[b]].double() / 0.5
        torch.testing.assert_close(probs[b].double(), z[cands].softmax(-1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(logp[b].double(), z.log_softmax(-1)[cands], rtol=1e-6, atol=1e-6)
    assert probs.dtype == torch.float32 and logp.dtype == torch.float32
