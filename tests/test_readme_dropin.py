"""The README's drop-in examples, run as written (each ```python block after an ``<!-- example: NAME -->``
marker), on tiny models with the inputs each block says it is given; their results checked against the
fp64 reference or the libraries' own code."""

import re
from pathlib import Path

import pytest
import torch
from lgrpo.kernels import reference as ref

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(encoding="utf-8"),
                      flags=re.DOTALL)
    assert match, f"README has no example {name!r}"
    return match.group(1)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is 10x faster than two on a loaded machine
    yield
    torch.set_num_threads(threads)


def test_kernels_example(gen):
    from toy_task import char_tokenizer, tiny_lm

    model = tiny_lm(char_tokenizer(), seed=4)
    B, P, C, V, G = 4, 3, 5, model.config.vocab_size, 2
    completion_ids = torch.randint(2, V, (B, C), generator=gen)
    mask = torch.ones(B, C, dtype=torch.bool)
    mask[1, 3:] = False
    given = dict(model=model, prompt_ids=torch.randint(2, V, (B, P), generator=gen), completion_ids=completion_ids,
                 completion_mask=mask, rewards=torch.rand(B, generator=gen), G=G,
                 old_logp=-3.8 + 0.2 * torch.randn(B, C, generator=gen),
                 ref_logp=-3.8 + 0.2 * torch.randn(B, C, generator=gen))
    scope = dict(given)
    exec(example("kernels"), scope)

    # the last loss, recomputed from the same hidden states in fp64, logits materialised
    hidden = scope["hidden"].detach().double()[:, P - 1:-1]
    want = ref.linear_grpo_loss(hidden, model.lm_head.weight.detach().double(), completion_ids,
                                scope["adv"].double(), mask, given["old_logp"].double(), given["ref_logp"].double(),
                                beta=0.04, kl_bias_correction=True)
    assert scope["out"].loss.item() == pytest.approx(want.loss.item(), rel=2e-5, abs=2e-6)  # abs: see test_verl_example
    # row P-1+c predicts completion token c: the per-token log-probs are those of the completion
    logits = scope["logits"].detach().double()
    direct = logits.log_softmax(-1)[torch.arange(B)[:, None], torch.arange(P - 1, P - 1 + C), completion_ids]
    torch.testing.assert_close(scope["out"].logp, torch.where(mask, direct, 0).float(), rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_trl_example(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from toy_task import char_tokenizer, tiny_lm
    from trl import GRPOConfig

    from lgrpo.synthetic import SyntheticTask

    tok = char_tokenizer()
    tiny_lm(tok).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    pairs = [SyntheticTask(seed=2).example("train", i) for i in range(2)]
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in pairs], "caption": [p.prompt for p in pairs],
                                 "pair": [list(p.images) for p in pairs], "preferred": [p.preferred for p in pairs]})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=1, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", bf16=False, disable_tqdm=True, gradient_checkpointing=False, beta=0.04)
    scope = dict(policy=str(tmp_path / "policy"), listener="tiny", args=args, dataset=dataset)
    exec(example("trl"), scope)
    (log,) = [h for h in scope["trainer"].state.log_history if "grad_norm" in h]
    assert {"rewards/listener/mean", "rewards/answered/mean", "kl", "entropy"} <= set(log)
    assert torch.isfinite(torch.tensor([log["loss"], log["grad_norm"]])).all()


def test_verl_example(gen):
    pytest.importorskip("tensordict")
    pytest.importorskip("verl")
    from test_integration_verl import actor_config, micro_batch, verl_log_probs
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    data, hidden, weight = micro_batch(gen)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    config = actor_config(loss_agg_mode="token-mean")
    scope = dict(actor_config=config, data=data, hidden=hidden.clone().requires_grad_(), lm_head_weight=weight)
    exec(example("verl"), scope)
    want, _ = ppo_loss(actor_config(loss_agg_mode="token-mean"), {"log_probs": verl_log_probs(hidden, weight, data)},
                       data)
    # the absolute part as in test_integration_verl: terms of order 1 can cancel to a loss near 0 (a seed gave
    # -1.85e-4, 8.5e-9 apart: fp32 rounding of the sum, 4.6e-5 of that value)
    assert scope["loss"].item() == pytest.approx(want.item(), rel=2e-5, abs=2e-6)
    assert scope["hidden"].grad is not None and "actor/pg_clipfrac" in scope["metrics"]
