"""The seeded sampler: exact inverse-CDF sampling on fixed-point probabilities, independent of the batch."""

from __future__ import annotations

import pytest
import torch

from lgrpo.rollout.hf import BanTokens, CounterSampler
from lgrpo.rollout.sampler import NonFiniteLogitsError
from lgrpo.rollout.top_p import PROB_ONE, counter_uniform, fixed_point_probs, row_cumsum, sample_from_logits


def _chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square against probs, on the cells expected >= 5 times; within 5 sigma of its mean."""
    n = counts.sum()
    expected = probs.double() * n
    cells = expected >= 5
    stat = ((counts[cells].double() - expected[cells]) ** 2 / expected[cells]).sum().item()
    dof = int(cells.sum()) - 1
    return stat < dof + 5 * (2 * dof) ** 0.5, (stat, dof)


def test_sampler_follows_the_softmax():
    """Inverse-CDF sampling with counter-based uniforms draws from softmax(logits / T)."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]])
    n = 20000
    u = counter_uniform(7, 3, torch.arange(n), 5)
    ids, empty = sample_from_logits(logits.expand(n, -1), u, temperature=0.7)
    assert not empty.any()
    freq = torch.bincount(ids, minlength=5).double() / n
    probs = torch.softmax(logits[0].double() / 0.7, -1)
    assert torch.allclose(freq, probs, atol=0.015), (freq, probs)
    # counter uniforms are uniform: mean 1/2, variance 1/12
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003


def test_sampler_follows_the_softmax_across_scan_blocks(gen):
    """A vocabulary of several scan blocks (not a multiple of the block): chi-square against the softmax."""
    vocab, n = 3001, 40000
    logits = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5
    hot = torch.randperm(vocab, generator=gen)[:40]  # heavy tokens spread over every block
    logits[hot] += 6.0
    u = counter_uniform(int(torch.randint(0, 2**40, (1,), generator=gen)), 1, torch.arange(n), 0)
    ids, _ = sample_from_logits(logits.float().expand(n, -1), u, temperature=1.0)
    counts = torch.bincount(ids, minlength=vocab)
    probs = torch.softmax(logits.float().double(), -1)
    ok, detail = _chi_square_ok(counts, probs)
    assert ok, detail


@pytest.mark.parametrize("width", [1, 7, 1023, 1024, 1025, 5000])
def test_row_cumsum_is_exact(gen, width):
    x = torch.randint(0, 2**50, (3, width), generator=gen)
    for blocked in (True, False):
        assert torch.equal(row_cumsum(x, blocked=blocked), x.cumsum(-1))
        assert torch.equal(row_cumsum(x, block=16, blocked=blocked), x.cumsum(-1))
        padded = row_cumsum(x, keep_padding=True, blocked=blocked)
        assert padded.is_contiguous() and padded.shape[1] % 1024 == 0
        assert torch.equal(padded[:, :width], x.cumsum(-1)) and (padded[:, width:] == padded[:, -1:]).all()


def test_blocked_scan_samples_the_same_tokens(gen, monkeypatch):
    """The CUDA path (blocked scan) and the CPU path (one scan) give the same ids: integer sums."""
    import lgrpo.rollout.top_p as sampling

    logits = torch.randn(5, 4099, generator=gen) * 2
    u = counter_uniform(11, 0, torch.arange(5), 3)
    flat = [sample_from_logits(logits, u, 1.0, top_p=p)[0] for p in (1.0, 0.8)]
    plain = sampling.row_cumsum
    monkeypatch.setattr(sampling, "row_cumsum", lambda x, **kw: plain(x, block=64, blocked=True, **kw))
    blocked = [sample_from_logits(logits, u, 1.0, top_p=p)[0] for p in (1.0, 0.8)]
    assert all(torch.equal(a, b) for a, b in zip(flat, blocked))


def test_fixed_point_probs_are_the_softmax(gen):
    logits = torch.randn(4, 777, generator=gen) * 4
    w = fixed_point_probs(logits, temperature=1.3)
    exact = torch.softmax(logits.double() / 1.3, -1)
    assert torch.allclose(w.double() / PROB_ONE, exact, rtol=1e-5, atol=1e-18)  # fp32 softmax
    assert (w.sum(-1) < 2 * PROB_ONE).all()  # no int64 overflow in any prefix sum


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    ids, _ = sample_from_logits(
        logits.expand(4000, -1), counter_uniform(1, 0, torch.arange(4000), 0), 1.0, top_p=0.75
    )
    counts = torch.bincount(ids, minlength=4)
    assert counts[2] == 0 and counts[3] == 0  # mass above token 2 is 0.8 >= 0.75: outside the nucleus
    assert abs(counts[0].item() / 4000 - 0.625) < 0.03  # renormalised 0.5 / 0.8


def test_top_p_breaks_ties_by_token_id():
    """Equal probabilities at the nucleus edge: the lower ids are in, whatever the sort would pick."""
    logits = torch.zeros(1, 10)  # ten tokens of 0.1
    w = fixed_point_probs(logits, 1.0, top_p=0.35)
    assert (w[0, :4] > 0).all() and (w[0, 4:] == 0).all()
    # the most likely token is always kept, however small top_p
    assert (fixed_point_probs(torch.tensor([[0.0, 3.0, 1.0]]), 1.0, top_p=1e-9)[0] > 0).tolist() == [
        False,
        True,
        False,
    ]


def test_never_draws_a_token_of_probability_zero():
    """-inf logits (banned ids) and tokens outside the nucleus, at the extremes of u."""
    logits = torch.full((1, 3000), float("-inf"))
    live = torch.tensor([0, 1023, 1024, 2999])  # first/last of scan blocks
    logits[0, live] = torch.tensor([0.0, -30.0, 1.0, -80.0])
    u = torch.tensor([2.0**-33, 1e-12, 0.5, 1 - 2.0**-33, 1 - 1e-15])
    ids, empty = sample_from_logits(logits.expand(len(u), -1), u, 1.0)
    assert not empty.any()
    assert set(ids.tolist()) <= set(live.tolist())
    # the ends of the CDF: the first live token, and the last one of non-zero fixed-point weight
    # (token 2999's e^-80 is below 2^-61: weight 0, never drawn)
    assert ids[0].item() == 0 and ids[-2:].tolist() == [1024, 1024]
    ids_p, _ = sample_from_logits(logits.expand(len(u), -1), u, 1.0, top_p=0.5)
    assert set(ids_p.tolist()) == {1024}  # p(1024) = 0.73 covers the nucleus alone


def test_a_row_does_not_depend_on_the_rest_of_the_batch(gen):
    logits = torch.randn(6, 2049, generator=gen) * 3
    u = counter_uniform(5, 2, torch.arange(6), 9)
    ids, _ = sample_from_logits(logits, u, 0.9, top_p=0.95)
    for r in range(6):
        alone, _ = sample_from_logits(logits[r : r + 1], u[r : r + 1], 0.9, top_p=0.95)
        assert alone.item() == ids[r].item()


def test_rows_without_a_finite_logit_are_reported():
    logits = torch.randn(3, 50)
    logits[1] = float("-inf")
    logits[2, 7] = float("nan")
    ids, empty = sample_from_logits(logits, torch.full((3,), 0.5), 1.0)
    assert empty.tolist() == [False, True, True]
    assert ids[1].item() == 0 and ids[2].item() == 0

    sampler = CounterSampler(0, 0, torch.tensor([10, 11, 12]), 1.0, 1.0, prompt_len=4, max_new_tokens=3)
    sampler(torch.zeros(3, 4, dtype=torch.long), logits[[0, 0, 0]])
    sampler.check()  # all finite so far
    sampler(torch.zeros(3, 5, dtype=torch.long), logits)
    with pytest.raises(NonFiniteLogitsError, match=r"rows \[11, 12\]"):
        sampler.check()


def test_counter_sampler_uses_the_completion_position():
    """The uniform of a step is indexed by the position in the completion, not the padded length."""
    sampler = CounterSampler(3, 4, torch.tensor([0, 5]), 1.0, 1.0, prompt_len=6, max_new_tokens=4)
    assert torch.equal(sampler.uniforms[:, 2], counter_uniform(3, 4, torch.tensor([0, 5]), 2))
    logits = torch.randn(2, 40)
    out = sampler(torch.zeros(2, 8, dtype=torch.long), logits)
    expected, _ = sample_from_logits(logits, counter_uniform(3, 4, torch.tensor([0, 5]), 2), 1.0)
    assert torch.equal(out.argmax(-1), expected)
    assert torch.isinf(out).sum().item() == 2 * 39  # one 0 per row, -inf elsewhere


def test_ban_tokens_ignores_ids_beyond_the_vocabulary():
    ban = BanTokens([3, 1, 3, 99])
    out = ban(None, torch.zeros(2, 10))
    assert torch.isinf(out[:, [1, 3]]).all() and torch.isfinite(out[:, [0, 2, 4, 9]]).all()
    out = ban(None, torch.zeros(1, 100))  # another vocabulary size: the cached ids are rebuilt
    assert torch.isinf(out[0, 99])


def test_bench_sampler_smoke(run_bench):
    """bench/bench_sampler.py end to end at smoke sizes: the JSON gpu_check.sh collects."""
    data = run_bench("bench_sampler", "bench_sampler")
    names = [r["name"] for r in data["rows"]]
    assert len(names) == 10 and all(r["ms"] == r["ms"] and r["ms"] > 0 for r in data["rows"]), data["rows"]
    assert "[64,V] flat fp64 cumsum (before)" in names


@pytest.mark.gpu
def test_gpu_blocked_scan_and_sampler_match_the_cpu(gen):
    """On CUDA (blocked scan): the same prefix sums and, from the same weights, the same tokens as on CPU."""
    x = torch.randint(0, 2**52, (16, 152064), generator=gen)
    assert torch.equal(row_cumsum(x.cuda()).cpu(), x.cumsum(-1))  # blocked by default on CUDA
    logits = (torch.randn(64, 152064, generator=gen) * 3).cuda()
    u = counter_uniform(3, 1, torch.arange(64), 0)
    for top_p in (1.0, 0.9):
        weights = fixed_point_probs(logits, 1.0, top_p)
        ids, empty = sample_from_logits(logits, u.cuda(), 1.0, top_p)
        cdf = weights.cpu().cumsum(-1)
        target = (u * cdf[:, -1].double()).long()
        assert torch.equal(ids.cpu(), torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1))
        assert not empty.any()
