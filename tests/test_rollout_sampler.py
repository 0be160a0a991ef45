"""The rollout engine's sampler kernel (lgrpo.kernels.sampler): Triton (interpreted on CPU) == its
PyTorch twin, the present sampler's distribution, banned ids, empty rows, batch independence."""

from __future__ import annotations

import pytest
import torch
from lgrpo.kernels import reference
from lgrpo.kernels import sampler as S

from lgrpo.rollout.top_p import fixed_point_probs
from tests.test_sampling import _chi_square_ok


def _draw(logits, seed=1, step=2, row_ids=None, positions=None, temperature=1.0, banned=None, greedy=False,
          twin=False):
    n = logits.shape[0]
    row_ids = torch.arange(n) if row_ids is None else row_ids
    positions = torch.zeros(1, dtype=torch.long).expand(n) if positions is None else positions
    fn = reference.sample_tokens if twin else S.sample_tokens
    return fn(logits, S.key_tensor(seed, step), row_ids, positions, torch.tensor([temperature]), banned, greedy)


def test_kernel_equals_the_pytorch_twin(gen, monkeypatch):
    """Odd vocabularies over several tiles (ragged last one), banned ids, ids >= 2^32, per-row positions,
    and the edge rows: all -inf, a NaN, a +inf, a single allowed id. Same ids, same empty flags."""
    monkeypatch.setattr(S, "MAX_BLOCK_V", 64)
    for vocab in (1, 37, 301):
        logits = torch.randn(7, vocab, generator=gen) * 3
        banned = torch.rand(vocab, generator=gen) < 0.2
        banned[0] = banned[-1] = False  # the NaN and the +inf rows' ids (a banned NaN is never read)
        if vocab > 2:
            banned[1] = True
            logits[5, 1] = float("nan")  # banned: the row samples as if it were not there
        logits[1] = float("-inf")
        logits[2, -1] = float("nan")
        logits[3, 0] = float("inf")
        logits[4, 1:] = float("-inf")
        row_ids = torch.randint(0, 2**40, (7,), generator=gen)
        positions = torch.randint(0, 600, (7,), generator=gen)
        for greedy in (False, True):
            for temperature in (1.0, 0.37):
                kw = dict(seed=int(torch.randint(0, 2**62, (1,), generator=gen)), step=3, row_ids=row_ids,
                          positions=positions, temperature=temperature, banned=banned, greedy=greedy)
                ids, empty = _draw(logits, **kw)
                ids_t, empty_t = _draw(logits, twin=True, **kw)
                assert torch.equal(ids, ids_t) and torch.equal(empty, empty_t), (vocab, greedy, temperature)
                assert empty[1:4].all() and not empty[0] and not empty[4] and not empty[5]
                assert ids[1:4].tolist() == [0, 0, 0] and ids[4].item() == 0
                assert not banned[ids[~empty]].any()


def test_kernel_follows_the_present_samplers_distribution(gen):
    """Chi-square of 20000 draws (one row id each) against the fixed-point sampler's probabilities
    (lgrpo.rollout.top_p), temperature 0.7, with a banned id that holds the largest logit."""
    vocab, n = 11, 20000
    logits = torch.randn(vocab, generator=gen) * 1.5
    banned = torch.zeros(vocab, dtype=torch.bool)
    banned[3] = True
    logits[3] = 9.0
    ids, empty = _draw(logits.expand(n, -1).contiguous(), seed=int(torch.randint(0, 2**31, (1,), generator=gen)),
                       temperature=0.7, banned=banned)
    assert not empty.any()
    counts = torch.bincount(ids, minlength=vocab)
    assert counts[3] == 0
    weights = fixed_point_probs(logits.masked_fill(banned, float("-inf")).unsqueeze(0), 0.7)[0]
    ok, detail = _chi_square_ok(counts, weights.double() / weights.sum())
    assert ok, detail


def test_a_row_does_not_depend_on_the_batch_and_positions_change_the_draw(gen):
    logits = torch.randn(6, 50, generator=gen)
    row_ids = torch.tensor([5, 9, 2**33 + 1, 0, 7, 3])
    positions = torch.full((6,), 4)
    ids, _ = _draw(logits, row_ids=row_ids, positions=positions)
    for r in range(6):
        alone, _ = _draw(logits[r:r + 1], row_ids=row_ids[r:r + 1], positions=positions[r:r + 1])
        assert alone.item() == ids[r].item()
    # the same logits in every row: the draws follow (row id, position, seed, step), not the row's slot
    same = logits[:1].expand(64, -1).contiguous()
    base, _ = _draw(same, positions=torch.full((64,), 4))
    assert len(set(base.tolist())) > 5
    assert not torch.equal(base, _draw(same, positions=torch.full((64,), 5))[0])
    assert not torch.equal(base, _draw(same, positions=torch.full((64,), 4), step=3)[0])
    assert torch.equal(base, _draw(same, positions=torch.full((64,), 4))[0])


def test_greedy_is_torch_argmax_with_the_ban():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 1.0, 1.0, 1.0], [1.0, 3.0, 3.0, 3.0]])
    banned = torch.tensor([False, False, False, False])
    banned2 = torch.tensor([True, False, False, False])
    ids, _ = _draw(logits, greedy=True, banned=banned)
    assert ids.tolist() == logits.argmax(-1).tolist() == [1, 0, 1]
    ids, _ = _draw(logits, greedy=True, banned=banned2)
    assert ids.tolist() == [1, 1, 1]


def test_bad_arguments_are_rejected():
    logits = torch.zeros(2, 5)
    key, t = S.key_tensor(0, 0), torch.tensor([1.0])
    rows, pos = torch.arange(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="logits"):
        S.sample_tokens(torch.zeros(5), key, rows, pos, t)
    with pytest.raises(ValueError, match="row_ids"):
        S.sample_tokens(logits, key, torch.arange(3), pos, t)
    with pytest.raises(ValueError, match="positions"):
        S.sample_tokens(logits, key, rows, torch.zeros(1, dtype=torch.long), t)
    with pytest.raises(ValueError, match="key"):
        S.sample_tokens(logits, torch.zeros(2), rows, pos, t)
    with pytest.raises(ValueError, match="banned"):
        S.sample_tokens(logits, key, rows, pos, t, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="vocabulary"):
        S.sample_tokens(torch.zeros(5, 2).T, key, rows, pos, t)


@pytest.mark.gpu
def test_gpu_kernel_equals_the_twin(gen):
    """Compiled on CUDA, bf16 logits at Qwen's vocabulary: the same ids as the twin on the CPU."""
    vocab = 152064
    logits = (torch.randn(16, vocab, generator=gen) * 3).to(torch.bfloat16)
    banned = torch.zeros(vocab, dtype=torch.bool)
    banned[151652:151657] = True
    rows, pos = torch.arange(16) * 8 + 3, torch.full((16,), 17)
    for greedy in (False, True):
        kw = dict(seed=5, step=9, row_ids=rows, positions=pos, temperature=0.8, banned=banned, greedy=greedy)
        ids_t, empty_t = _draw(logits, twin=True, **kw)
        ids, empty = S.sample_tokens(logits.cuda(), S.key_tensor(5, 9, "cuda"), rows.cuda(), pos.cuda(),
                                     torch.tensor([0.8], device="cuda"), banned.cuda(), greedy)
        assert torch.equal(ids.cpu(), ids_t) and torch.equal(empty.cpu(), empty_t)
