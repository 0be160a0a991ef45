"""fused_ppo_loss against verl 0.9.1's own ppo_loss / agg_loss (``pip install -e .[verl]`` and
``pip install --no-deps verl==0.9.1``; skipped without them).

The micro-batch is built the way verl's engine builds it (``left_right_2_no_padding``: nested ``input_ids``,
left-padded prompts, right-padded responses); verl's side gets log-probs from full logits of the same packed
hidden states (``logprobs_from_logits`` at a temperature), ours the hidden states and the lm_head weight.
Loss, both gradients and every metric agree, for each aggregation, both loss modes, with the k3 KL, rollout
importance weights and verl's data-parallel normalisers. The kernels run through the Triton interpreter.

``shared_prefix_hidden_states`` (each distinct prompt computed once) against the tiny Qwen2 LM's plain forward
on every sequence alone: the same states at every row the loss reads, and through ``fused_ppo_loss`` the
loss and every parameter gradient of verl's ``ppo_loss`` on the plain forward's full logits.
"""

import pytest
import torch

pytest.importorskip("tensordict")
verl = pytest.importorskip("verl")
if verl.__version__ != "0.9.1":
    pytest.skip(f"the adapter targets verl 0.9.1, found {verl.__version__}", allow_module_level=True)

from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.torch_functional import logprobs_from_logits  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from lgrpo.integrations.verl import fused_ppo_loss, shared_prefix_hidden_states, unsupported_settings  # noqa: E402

B, P, R, V, H = 5, 4, 6, 37, 16
TEMPERATURE = 0.7


def micro_batch(gen, per_sequence=False):
    """A verl micro-batch (no-padding layout) around random tokens; old/ref log-probs near the policy's.
    ``per_sequence``: one advantage and one rollout weight per response (GRPO's, and what GSPO needs)."""
    attention = torch.ones(B, P + R, dtype=torch.long)
    attention[1, :1] = 0
    attention[3, :3] = 0  # left-padded prompts
    response_lens = torch.tensor([6, 3, 1, 5, 0])  # the last row has no response
    for b in range(B):
        attention[b, P + response_lens[b]:] = 0
    response_mask = attention[:, P:].clone()
    response_mask[0, 2] = 0  # a masked token inside a response
    input_ids = torch.randint(0, V, (B, P + R), generator=gen)
    data = TensorDict(dict(
        input_ids=input_ids, attention_mask=attention, response_mask=response_mask,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompts=input_ids[:, :P], responses=input_ids[:, P:],
        advantages=torch.randn(B, 1 if per_sequence else R, generator=gen).expand(B, R).contiguous(),
        rollout_is_weights=(torch.rand(B, 1 if per_sequence else R, generator=gen) * 1.5).expand(B, R).contiguous(),
    ), batch_size=[B])
    data = left_right_2_no_padding(data)
    n = data["input_ids"].values().shape[0]
    hidden = torch.randn(n, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    with torch.no_grad():
        lp = response_log_probs(hidden, weight, data)
    # responses 0 and 3 at ratio e^0.6 = 1.82 with A > 0 and A < 0: the clip and the dual clip (c = 1.6) act
    noise = 0.3 * torch.randn(B, R, generator=gen)
    noise[[0, 3]] = -0.6
    data["old_log_probs"] = lp + noise
    data["advantages"][0] = data["advantages"][0].abs()
    data["advantages"][3] = -data["advantages"][3].abs()
    data["ref_log_prob"] = lp + 0.5 * torch.randn(B, R, generator=gen)
    tu.assign_non_tensor(data, temperature=TEMPERATURE)
    return data, hidden, weight


def verl_log_probs(hidden, weight, data):
    """What verl's engine hands ppo_loss: log-probs of every packed row's next token, nested."""
    logits = (hidden @ weight.T) / TEMPERATURE
    labels = torch.roll(data["input_ids"].values(), -1)
    return torch.nested.nested_tensor_from_jagged(logprobs_from_logits(logits, labels), data["input_ids"].offsets())


def response_log_probs(hidden, weight, data):
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(verl_log_probs(hidden, weight, data), data)


def actor_config(**overrides):
    kw = dict(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=2, use_kl_loss=True, kl_loss_coef=0.05,
              kl_loss_type="low_var_kl", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1.6,
              calculate_entropy=True)
    kw["policy_loss"] = PolicyLossConfig(loss_mode=overrides.pop("loss_mode", "vanilla"))
    kw.update(overrides)
    return FSDPActorConfig(**kw)


CASES = [
    dict(loss_agg_mode="token-mean"),
    dict(loss_agg_mode="token-mean", dp_size=2, batch_num_tokens=29, global_batch_size=9),
    dict(loss_agg_mode="token-sum", dp_size=2, batch_num_tokens=29, global_batch_size=9),
    dict(loss_agg_mode="seq-mean-token-mean", loss_mode="gspo"),
    dict(loss_agg_mode="seq-mean-token-mean", dp_size=2, batch_num_tokens=29, global_batch_size=9),
    dict(loss_agg_mode="seq-mean-token-sum"),
    dict(loss_agg_mode="seq-mean-token-sum-norm", loss_mode="gspo"),
    dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=11, use_kl_loss=False),
]


@pytest.mark.parametrize("case", CASES, ids=[
    "-".join(str(v) for k, v in c.items() if k in ("loss_agg_mode", "loss_mode", "dp_size", "loss_scale_factor"))
    for c in CASES])
def test_matches_verl_ppo_loss(gen, case):
    case = dict(case)
    global_info = {k: case.pop(k, None) for k in ("dp_size", "batch_num_tokens", "global_batch_size")}
    data, hidden, weight = micro_batch(gen, per_sequence=case.get("loss_mode") == "gspo")
    tu.assign_non_tensor(data, dp_size=global_info["dp_size"] or 1, batch_num_tokens=global_info["batch_num_tokens"],
                         global_batch_size=global_info["global_batch_size"])

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    want, want_metrics = ppo_loss(actor_config(**case), {"log_probs": verl_log_probs(h, w, data)}, data)
    want.backward()
    hg = hidden.clone().requires_grad_()
    wg = weight.clone().requires_grad_()
    got, got_metrics = fused_ppo_loss(actor_config(**case), {"hidden_states": hg, "lm_head_weight": wg}, data)
    got.backward()

    torch.testing.assert_close(got, want.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hg.grad, h.grad, rtol=2e-5, atol=2e-5 * h.grad.abs().max().item())
    torch.testing.assert_close(wg.grad, w.grad, rtol=2e-5, atol=2e-5 * w.grad.abs().max().item())
    assert h.grad.abs().sum() > 0
    assert set(want_metrics) <= set(got_metrics), set(want_metrics) - set(got_metrics)
    for name, metric in want_metrics.items():
        if name == "actor/entropy_loss":
            continue  # verl computes entropy only when the engine passes it (model_output has none here)
        value = metric if isinstance(metric, float) else metric.aggregate()
        mine = got_metrics[name] if isinstance(got_metrics[name], float) else got_metrics[name].aggregate()
        assert mine == pytest.approx(value, rel=2e-5, abs=2e-6), name
        if not isinstance(metric, float):
            assert got_metrics[name].aggregation == metric.aggregation, name
    if case.get("use_kl_loss", True):
        assert got_metrics["lgrpo/kl_beyond_verl_clamp"].aggregate() == 0.0
    assert want_metrics["actor/pg_clipfrac"].aggregate() > 0, "the case must clip"
    if case.get("loss_mode", "vanilla") == "vanilla":
        assert want_metrics["actor/pg_clipfrac_lower"].aggregate() > 0, "the dual clip must act"


def test_entropy_metric_matches_verl_agg_loss(gen):
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.workers.utils.padding import no_padding_2_padding

    data, hidden, weight = micro_batch(gen)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    _, metrics = fused_ppo_loss(actor_config(loss_agg_mode="seq-mean-token-mean"),
                                {"hidden_states": hidden, "lm_head_weight": weight}, data)
    logits = (hidden @ weight.T).double() / TEMPERATURE
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    entropy = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(entropy, data["input_ids"].offsets()), data)
    mask = data["response_mask"].bool()
    want = agg_loss(entropy, mask, "seq-mean-token-mean").item()
    assert metrics["actor/entropy_loss"].aggregate() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("overrides,named", [
    (dict(loss_mode="sapo"), "loss_mode='sapo'"),
    (dict(kl_loss_type="k3+"), "kl_loss_type='k3+'"),
    (dict(kl_loss_type="mse"), "kl_loss_type='mse'"),
    (dict(entropy_coeff=0.01), "entropy_coeff=0.01"),
    (dict(clip_ratio_c=1.1), "clip_ratio_c=1.1"),
])
def test_unsupported_settings_are_named(gen, overrides, named):
    config = actor_config(loss_agg_mode="token-mean", **overrides)
    assert any(named in f for f in unsupported_settings(config))
    data, hidden, weight = micro_batch(gen)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    with pytest.raises(ValueError, match=named.replace("+", r"\+")):
        fused_ppo_loss(config, {"hidden_states": hidden, "lm_head_weight": weight}, data)


def test_gspo_needs_one_advantage_per_response(gen):
    data, hidden, weight = micro_batch(gen)  # per-token advantages: verl's token-wise GSPO differs
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    with pytest.raises(ValueError, match="constant within each response"):
        fused_ppo_loss(actor_config(loss_agg_mode="seq-mean-token-mean", loss_mode="gspo"),
                       {"hidden_states": hidden, "lm_head_weight": weight}, data)


def test_wrong_layout_and_temperatures_are_named(gen):
    data, hidden, weight = micro_batch(gen)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    config = actor_config(loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match="hidden_states must be the packed rows"):
        fused_ppo_loss(config, {"hidden_states": hidden[1:], "lm_head_weight": weight}, data)
    with pytest.raises(ValueError, match="per-sample temperatures"):
        fused_ppo_loss(config, {"hidden_states": hidden, "lm_head_weight": weight}, data,
                       temperature=torch.tensor([0.7, 1.0]))


# --- shared_prefix_hidden_states: each distinct prompt once ------------------------------------------------

PAD_P, PAD_R = 7, 6
# Three prompts (5, 3 and 6 real tokens: left padding 2, 4, 1); rows interleaved, repeated 3, 3 and 1 times
# (the last a group of one); ragged responses, one empty.
PROMPT_LENS = [5, 3, 6]
ROW_PROMPTS = torch.tensor([0, 1, 0, 2, 1, 0, 1])
RESPONSE_LENS = torch.tensor([6, 4, 0, 5, 6, 1, 3])


@pytest.fixture(scope="module")
def lm():
    from toy_task import char_tokenizer, tiny_lm

    return tiny_lm(char_tokenizer(), seed=3)


def lm_micro_batch(gen, model, per_sequence=False):
    """A verl micro-batch of grouped prompts for ``model``; old/ref log-probs near its own."""
    vocab = model.config.vocab_size
    prompts = torch.randint(2, vocab, (len(PROMPT_LENS), PAD_P), generator=gen)
    prompt_mask = (torch.arange(PAD_P)[None] >= PAD_P - torch.tensor(PROMPT_LENS)[:, None]).long()
    prompts = prompts.masked_fill(prompt_mask == 0, 0)
    b = len(ROW_PROMPTS)
    responses = torch.randint(2, vocab, (b, PAD_R), generator=gen)
    response_attention = (torch.arange(PAD_R)[None] < RESPONSE_LENS[:, None]).long()
    responses = responses.masked_fill(response_attention == 0, 0)
    response_mask = response_attention.clone()
    response_mask[0, 2] = 0  # a token inside a response that does not count (verl's tool tokens)
    attention = torch.cat([prompt_mask[ROW_PROMPTS], response_attention], 1)
    input_ids = torch.cat([prompts[ROW_PROMPTS], responses], 1)
    width = 1 if per_sequence else PAD_R
    data = TensorDict(dict(
        input_ids=input_ids, attention_mask=attention, response_mask=response_mask,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompts=input_ids[:, :PAD_P], responses=responses,
        advantages=torch.randn(b, width, generator=gen).expand(b, PAD_R).contiguous(),
        rollout_is_weights=(0.5 + torch.rand(b, width, generator=gen)).expand(b, PAD_R).contiguous(),
    ), batch_size=[b])
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, temperature=TEMPERATURE, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    with torch.no_grad():
        lp = response_log_probs(plain_hidden_states(model, data), model.lm_head.weight, data)
    data["old_log_probs"] = lp + 0.3 * torch.randn(b, PAD_R, generator=gen)
    data["ref_log_prob"] = lp + 0.3 * torch.randn(b, PAD_R, generator=gen)
    return data


def plain_hidden_states(model, data):
    """The plain forward verl runs, packed: every sequence (prompt + response) alone, its positions from 0."""
    ids, offsets = data["input_ids"].values(), data["input_ids"].offsets()
    rows = [ids[int(a): int(z)] for a, z in zip(offsets[:-1], offsets[1:])]
    return torch.cat([model.model(input_ids=r[None], position_ids=torch.arange(len(r))[None]).last_hidden_state[0]
                      for r in rows])


def read_rows(data):
    """[total_nnz] bool: the rows from each sequence's last prompt token to its end (what the loss reads)."""
    offsets = data["input_ids"].offsets()
    rows = torch.zeros(int(offsets[-1]), dtype=torch.bool)
    for b, end in enumerate(offsets[1:].tolist()):
        rows[end - int(RESPONSE_LENS[b]) - 1: end] = True
    return rows


def test_shared_prefix_states_match_the_plain_forward(gen, lm):
    data = lm_micro_batch(gen, lm)
    seen = []
    handle = lm.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        with torch.no_grad():
            got = shared_prefix_hidden_states(lm, data)
    finally:
        handle.remove()
    assert seen == [sum(PROMPT_LENS) + int(RESPONSE_LENS.sum())]  # one forward, each prompt once
    with torch.no_grad():
        want = plain_hidden_states(lm, data)
    rows = read_rows(data)
    assert got.shape == want.shape
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert not got[~rows].any()  # the other prompt rows: zeros, as documented


@pytest.mark.parametrize("case", [dict(loss_agg_mode="token-mean"),
                                  dict(loss_agg_mode="seq-mean-token-mean", loss_mode="gspo")],
                         ids=["token-mean", "seq-mean-gspo"])
def test_shared_prefix_loss_and_gradients_match_verl(gen, lm, case):
    data = lm_micro_batch(gen, lm, per_sequence=case.get("loss_mode") == "gspo")
    lm.zero_grad(set_to_none=True)
    want, _ = ppo_loss(actor_config(**case),
                       {"log_probs": verl_log_probs(plain_hidden_states(lm, data), lm.lm_head.weight, data)}, data)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)
    got, _ = fused_ppo_loss(actor_config(**case), {"hidden_states": shared_prefix_hidden_states(lm, data),
                                                   "lm_head_weight": lm.lm_head.weight}, data)
    got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=2e-5, atol=2e-6)
    for name, param in lm.named_parameters():
        scale = want_grads[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(param.grad, want_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    lm.zero_grad(set_to_none=True)


def test_shared_prefix_bad_inputs_are_named(gen, lm):
    from tensordict import NonTensorStack

    data = lm_micro_batch(gen, lm)
    shifted = data.clone()
    shifted["position_ids"] = torch.nested.nested_tensor_from_jagged(data["position_ids"].values() + 1,
                                                                     data["position_ids"].offsets())
    with pytest.raises(ValueError, match="position_ids must number each sequence"):
        shared_prefix_hidden_states(lm, shifted)
    images = data.clone()
    images["multi_modal_inputs"] = NonTensorStack(*([{}] * 6 + [{"pixel_values": torch.zeros(4, 3)}]))
    with pytest.raises(ValueError, match="multi_modal_inputs"):
        shared_prefix_hidden_states(lm, images)
    text = data.clone()
    text["multi_modal_inputs"] = NonTensorStack(*([{}] * 7))  # verl's text rows: empty dicts, accepted
    assert shared_prefix_hidden_states(lm, text).shape == (int(data["input_ids"].offsets()[-1]), lm.config.hidden_size)
    padded = data.clone()
    padded["input_ids"] = data["input_ids"].to_padded_tensor(0)
    with pytest.raises(ValueError, match="input_ids must be verl's nested"):
        shared_prefix_hidden_states(lm, padded)


def test_benchmark_smoke(run_bench, reference_kernels):
    # bench/bench_verl_step.py runs end to end at smoke sizes and every variant's loss agrees with verl's
    result = run_bench("bench_verl_step", "bench_verl_step")
    names = [r["name"] for r in result["rows"]]
    assert names[0].startswith("verl ppo_loss") and names[-1].startswith("shared_prefix_hidden_states")
    assert all(r["ms"] > 0 for r in result["rows"])
    want = result["losses"][names[0]]
    for name in names[1:]:
        assert result["losses"][name] == pytest.approx(want, rel=1e-4, abs=1e-7), name
