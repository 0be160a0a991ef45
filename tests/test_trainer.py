"""The GRPO step on a tiny stand-in model: sampling, scoring, loss normalisation, non-finite handling."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lgrpo import distributed as D
from lgrpo.config import build_config
from lgrpo.group import GroupBatch, PromptBatch, completion_mask
from lgrpo.positions import text_positions
from lgrpo.rollout.hf import StopOnString, clean_generation_config, generate
from lgrpo.scoring import CompletionScorer
from lgrpo.trainer import Models, NonFiniteError, Trainer
from tests.toy_task import TINY_FAMILIES, ToyTask, char_tokenizer, tiny_lm


def make_trainer(tmp_path, seed=0, **overrides):
    tok = char_tokenizer()
    model = tiny_lm(tok, seed=seed)
    clean_generation_config(model, tok)
    base = {
        "train": {"steps": 3, "prompts_per_step": 4, "seed": seed},
        "rollout": {"group_size": 4, "max_new_tokens": 10},
        "loss": {"micro_batch_size": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "run": {"progress": False},
        "checkpoint": {"interval": 0},
        "data": {"synthetic_train_size": 32},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    cfg = build_config("tiny", base)
    task = ToyTask(tok)
    return Trainer(cfg, D.init("cpu"), task, Models(model, copy.deepcopy(model)), tmp_path)


# --- sampling -----------------------------------------------------------------------------------------


def test_rollouts_do_not_depend_on_batch_composition():
    tok = char_tokenizer()
    model = tiny_lm(tok)
    clean_generation_config(model, tok)
    enc = tok(["pick 1:", "pick 22:", "pick 1:"], return_tensors="pt", padding=True)
    batch = PromptBatch(enc["input_ids"], enc["attention_mask"])
    kw = dict(max_new_tokens=8, stop="</answer>", seed=3, step=5)
    full = generate(model, tok, batch, 2, **kw)
    assert full.group.tolist() == [0, 0, 1, 1, 2, 2] and len(full.prompts) == 3
    # prompt 1 alone, with a narrower padding, and through generate's own chunking
    alone_enc = tok(["pick 22:"], return_tensors="pt", padding=True)
    alone = generate(model, tok, PromptBatch(alone_enc["input_ids"], alone_enc["attention_mask"]), 2,
                     prompt_ids=torch.tensor([1]), **kw)
    chunked = generate(model, tok, batch, 2, batch_size=4, **kw)
    assert full.texts[2:4] == alone.texts
    assert full.texts == chunked.texts
    other_step = generate(model, tok, batch, 2, **dict(kw, stop=None, step=6))
    assert other_step.texts != full.texts


def test_static_kv_cache_gives_the_same_rollouts(monkeypatch):
    """rollout.static_cache only changes where keys/values live: the same tokens, for a text model and
    for the tiny Qwen2.5-VL with two images per prompt."""
    from transformers import cache_utils

    from lgrpo.task import build

    made = []
    init = cache_utils.StaticCache.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.StaticCache, "__init__", counting_init)

    tok = char_tokenizer()
    model = tiny_lm(tok)
    clean_generation_config(model, tok)
    enc = tok(["pick 1:", "pick 22:"], return_tensors="pt", padding=True)
    batch = PromptBatch(enc["input_ids"], enc["attention_mask"])
    kw = dict(max_new_tokens=8, stop="</answer>", seed=3, step=5)
    dynamic = generate(model, tok, batch, 2, **kw)
    assert not made
    static = generate(model, tok, batch, 2, static_cache=True, **kw)
    assert made, "no StaticCache was built"
    assert torch.equal(static.completion_ids, dynamic.completion_ids) and static.texts == dynamic.texts

    cfg = build_config("tiny", {"run": {"progress": False}, "train": {"steps": 0}})
    task, models, _ = build(cfg, D.init("cpu"))
    prompts = task.prompts("eval", [0, 1, 2])
    kw = dict(max_new_tokens=12, stop=None, seed=1, step=2)
    dynamic = generate(models.policy, task.tokenizer, prompts, 2, **kw)
    static = generate(models.policy, task.tokenizer, prompts, 2, static_cache=True, **kw)
    assert prompts.has_images and torch.equal(static.completion_ids, dynamic.completion_ids)


def test_stop_string_and_eos_set_the_mask():
    tok = char_tokenizer()
    text = "<think>x</think><answer>2</answer>zz"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    prompt_len = 3
    seq = torch.cat([torch.zeros(1, prompt_len, dtype=torch.long), ids], 1)
    stopper = StopOnString(tok, "</answer>", prompt_len)
    fired_at = None
    for length in range(prompt_len + 1, seq.shape[1] + 1):
        if stopper(seq[:, :length], None)[0] and fired_at is None:
            fired_at = length - prompt_len
    assert fired_at == len("<think>x</think><answer>2</answer>")
    mask = completion_mask(ids, [], stopper.stop_len)
    assert tok.decode(ids[0][mask[0]]) == "<think>x</think><answer>2</answer>"
    eos = tok.eos_token_id
    with_eos = torch.tensor([[5, 6, eos, 7], [5, 6, 7, 8], [eos, 5, eos, 6]])
    mask = completion_mask(with_eos, [eos])
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True], [True, False, False, False]]
    # a stop string seen after 2 tokens cuts row 1; -1: not seen
    mask = completion_mask(with_eos, [eos], torch.tensor([-1, 2, 3]))
    assert mask.int().tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]


def test_generate_reports_truncation():
    tok = char_tokenizer()
    model = tiny_lm(tok)
    clean_generation_config(model, tok)
    enc = tok(["pick 1:", "pick 2:"], return_tensors="pt", padding=True)
    out = generate(model, tok, PromptBatch(enc["input_ids"], enc["attention_mask"]), 3,
                   max_new_tokens=4, stop=None, seed=0)
    ended = torch.isin(out.completion_ids, torch.tensor([tok.eos_token_id])).any(-1)
    assert out.truncated.tolist() == (~ended).tolist()
    assert (out.completion_mask.sum(-1)[out.truncated] == 4).all()


def test_select_keeps_each_rows_images():
    grid = torch.tensor([[1, 1, 2], [1, 2, 2], [1, 1, 1], [1, 1, 3]])  # 2, 4, 1, 3 patches
    pv = torch.arange(10).float().unsqueeze(1)
    batch = PromptBatch(torch.tensor([[1], [2]]), torch.ones(2, 1), pixel_values=pv, image_grid_thw=grid,
                        extra={"examples": ["a", "b"]})
    out = batch.select([1, 1, 0])
    assert out.pixel_values.squeeze(1).tolist() == [6, 7, 8, 9] * 2 + [0, 1, 2, 3, 4, 5]
    assert out.image_grid_thw.tolist() == [[1, 1, 1], [1, 1, 3]] * 2 + [[1, 1, 2], [1, 2, 2]]
    assert out.extra["examples"] == ["b", "b", "a"] and out.images_per_row.tolist() == [2, 2, 2]
    with pytest.raises(IndexError, match="rows"):
        batch.select([2])


def test_group_batch_micro_batches_hold_each_prompt_once():
    """A micro-batch of completions carries the prompts it uses, once each, and points at them."""
    grid = torch.tensor([[1, 1, 2], [1, 2, 2], [1, 1, 1]])  # rows hold 1, 1, 1 image
    prompts = PromptBatch(torch.tensor([[0, 5], [6, 7], [8, 9]]), torch.tensor([[0, 1], [1, 1], [1, 1]]),
                          pixel_values=torch.arange(7).float()[:, None], image_grid_thw=grid,
                          extra={"label": torch.tensor([10, 11, 12])})
    ids = torch.arange(12).view(6, 2)
    batch = GroupBatch.grouped(prompts, ids, torch.ones(6, 2, dtype=torch.bool), 2)
    assert batch.group.tolist() == [0, 0, 1, 1, 2, 2]
    part = batch.select([5, 1, 4])
    assert part.prompts.extra["label"].tolist() == [10, 12] and part.group.tolist() == [1, 0, 1]
    assert part.prompts.pixel_values.squeeze(1).tolist() == [0, 1, 6]
    assert torch.equal(part.completion_ids, ids[[5, 1, 4]])
    assert batch.prompt_tokens() == 5 and batch.prompt_tokens(shared_prefix=False) == 10
    assert part.repeated_prompts().extra["label"].tolist() == [12, 10, 12]
    trimmed = batch.select([2, 3]).trim()  # prompt 1 alone has no left padding to drop
    assert trimmed.prompts.length == 2
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    narrow = GroupBatch(prompts.select([1, 2]), ids[:2], mask, torch.tensor([0, 1])).trim()
    assert narrow.completion_ids.shape == (2, 1) and narrow.prompts.length == 2
    with pytest.raises(ValueError, match="completion_ids"):
        GroupBatch.grouped(prompts, ids[:5], torch.ones(5, 2, dtype=torch.bool), 2)
    with pytest.raises(IndexError, match="group"):
        GroupBatch(prompts, ids[:1], torch.ones(1, 2, dtype=torch.bool), torch.tensor([3]))


# --- scoring --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_scorer_matches_the_models_own_logits(fused):
    """Log-probs from the hidden-state path equal log_softmax(model(...).logits / T) at the completion."""
    tok = char_tokenizer()
    model = tiny_lm(tok)
    enc = tok(["pick 1:", "pick 222:"], return_tensors="pt", padding=True)
    comp = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    cmask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    scorer = CompletionScorer(model, fused=fused)
    batch = GroupBatch.grouped(PromptBatch(enc["input_ids"], enc["attention_mask"]), comp, cmask, 1)
    logp = scorer(batch, temperature=0.8)
    ids = torch.cat([enc["input_ids"], comp], 1)
    attn = torch.cat([enc["attention_mask"], cmask.long()], 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=text_positions(attn)).logits
    p = enc["input_ids"].shape[1]
    want = (logits[:, p - 1 : -1] / 0.8).log_softmax(-1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logp[cmask], want[cmask], atol=1e-5)


@pytest.mark.usefixtures("reference_kernels")
def test_first_pass_is_on_policy(tmp_path):
    """Behaviour log-probs captured before the update give ratio 1 in the first minibatch (nothing clipped),
    and they equal the sampler's distribution: the completions were sampled from that very model."""
    trainer = make_trainer(tmp_path, loss={"epochs": 2, "minibatches": 2, "micro_batch_size": 4, "beta": 0.0})
    prompts, ids = trainer.next_prompts()
    rollout = trainer.rollouts(prompts, ids)
    old = trainer.logprobs(trainer.scorer, rollout)
    rows = torch.nonzero(torch.arange(len(rollout)) % 4 % 2 == 0).squeeze(-1)
    adv = torch.randn(len(rollout))
    stats = trainer.optimizer_step(rollout, rows, adv, old, None)
    assert stats["clip_sum"] == 0.0 and stats["tok_sum"] > 0
    stats2 = trainer.optimizer_step(rollout, rows, adv, old, None)  # weights moved (lr 1e-2): off-policy now
    assert stats2["clip_sum"] > 0


@pytest.mark.usefixtures("reference_kernels")
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_loss_does_not_depend_on_micro_batch_size(tmp_path, loss_type):
    runs = []
    for mb in (3, 16):
        trainer = make_trainer(tmp_path / f"mb{mb}", loss={"micro_batch_size": mb, "loss_type": loss_type})
        runs.append([m["loss"] for m in trainer.fit()])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5, abs=1e-7)
    assert any(abs(v) > 1e-6 for v in runs[0])


@pytest.mark.usefixtures("reference_kernels")
def test_shared_prefix_on_and_off_train_alike(tmp_path):
    """--loss.shared_prefix: the same losses, KL and clip statistics over a few steps (reference pass,
    behaviour log-probs for 2 minibatches, groups split across micro-batches of 3), with
    each prompt computed once per micro-batch instead of once per completion."""
    runs = {}
    for shared in (True, False):
        # A small lr: AdamW normalises each coordinate, so at lr 1e-2 rounding-level gradient differences
        # (1e-7) move near-zero coordinates by +-lr and the two runs drift apart after the first update.
        trainer = make_trainer(tmp_path / str(shared), optim={"lr": 1e-5}, train={"steps": 2},
                               loss={"micro_batch_size": 3, "minibatches": 2, "shared_prefix": shared})
        runs[shared] = trainer.fit()
    for key, rel, abs_ in (("loss", 1e-5, 1e-8), ("grad_norm", 1e-5, 0), ("kl", 0, 1e-7), ("clip_frac", 0, 1e-7),
                           ("reward", 0, 0)):
        on, off = [m[key] for m in runs[True]], [m[key] for m in runs[False]]
        assert on == pytest.approx(off, rel=rel, abs=abs_), key
    assert any(abs(m["loss"]) > 1e-6 for m in runs[True])
    for on, off in zip(runs[True], runs[False]):
        assert 0 < on["prompt_tokens/update"] < off["prompt_tokens/update"]
        assert 0 < on["prompt_tokens/reference"] < off["prompt_tokens/reference"]


@pytest.mark.usefixtures("reference_kernels")
def test_fit_writes_metrics_and_learns_something(tmp_path):
    trainer = make_trainer(tmp_path, loss={"beta": 0.04})
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    history = trainer.fit()
    assert len(history) == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "reward",
        "reward/format",
        "reward/accuracy",
        "reward/listener",
        "accuracy",
        "contradiction",
        "kl",
        "clip_frac",
        "entropy",
        "completion_len",
        "time/rollout",
        "time/update",
        "tokens_per_s/rollout",
        "tokens_per_s/update",
        "peak_mem_gib",
        "loss",
        "grad_norm",
        "lr",
    ):
        assert key in rows[0], key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9)  # policy == reference before the first update
    assert rows[-1]["kl"] > 0
    assert all(r["entropy"] > 0 and r["completion_len"] > 0 for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


@pytest.mark.usefixtures("reference_kernels")
def test_non_finite_gradient_stops_before_the_weights_move(tmp_path):
    trainer = make_trainer(tmp_path)
    param = trainer.policy.get_output_embeddings().weight
    handle = param.register_hook(lambda g: g * float("nan"))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    with pytest.raises(NonFiniteError, match="step 1"):
        trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    assert not trainer.optimizer.state  # AdamW never stepped
    handle.remove()


@pytest.mark.usefixtures("reference_kernels")
def test_non_finite_warmup_gradient_stops_before_the_weights_move(tmp_path):
    """The warm-up takes the update's gradient step: a NaN gradient stops it, even in skip mode."""
    trainer = make_trainer(tmp_path, sft={"steps": 3, "batch_size": 4}, train={"on_nonfinite": "skip"})
    param = trainer.policy.get_output_embeddings().weight
    seen = []  # the weights each backward saw (one micro-batch per warm-up step)

    def nan_from_step_2(grad):
        seen.append(param.detach().clone())
        return grad * float("nan") if len(seen) == 2 else grad

    handle = param.register_hook(nan_from_step_2)
    with pytest.raises(NonFiniteError, match=r"warm-up step 2: non-finite loss \(.*\) or gradient norm \(nan\)"):
        trainer.warmup()
    handle.remove()
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])  # step 1 stepped
    assert torch.equal(seen[1], param) and param.grad is None  # step 2 left the weights, dropped its gradients


@pytest.mark.usefixtures("reference_kernels")
def test_non_finite_skip_mode_drops_the_update_and_goes_on(tmp_path):
    trainer = make_trainer(tmp_path, train={"on_nonfinite": "skip", "steps": 2})
    param = trainer.policy.get_output_embeddings().weight
    handle = param.register_hook(lambda g: g * float("nan") if trainer.step == 0 else g)
    before = param.detach().clone()
    history = trainer.fit()
    handle.remove()
    assert len(history) == 2 and history[0]["grad_norm"] != history[0]["grad_norm"]  # NaN logged
    assert history[1]["grad_norm"] == history[1]["grad_norm"]
    assert not torch.equal(before, param)  # the second step did update


@pytest.mark.usefixtures("reference_kernels")
def test_warmup_teaches_the_format(tmp_path):
    """The supervised warm-up alone makes the tiny model write the templated answer."""
    trainer = make_trainer(
        tmp_path, sft={"steps": 300, "batch_size": 8, "lr": 1e-2}, loss={"micro_batch_size": 8}
    )
    losses = trainer.warmup()
    assert losses[-1] < 0.25 * losses[0]
    prompts = trainer.task.prompts("eval", list(range(4)))
    out = generate(
        trainer.policy, trainer.task.tokenizer, prompts, max_new_tokens=40, stop="</answer>", greedy=True
    )
    rewards = trainer.task.rewards(out)
    assert rewards.format.mean() == 1.0, out.texts


def test_throughput_benchmark_smoke_runs(run_bench):
    """bench/bench_train_step.py runs its every phase on a tiny Qwen2.5-VL (images included) on CPU."""
    result = run_bench("bench_train_step", "train_step")
    assert result["phases"]["grpo_step"]["completion_len"] == 8
    assert {"generate_16x256", "generate_static_16x256", "hf_generate_16x256"} <= set(result["phases"])
    assert all(r["ms"] > 0 for r in result["rows"])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_throughput_benchmark_times_the_other_families_step(run_bench, family):
    """``--family``: the same GRPO step on another family's model (gpu_check.sh runs it at 3B/4B size)."""
    result = run_bench("bench_train_step", f"train_step_{family}", "--family", family)
    assert result["phases"]["grpo_step"]["completion_len"] == 8 and "update_8x1024" not in result["phases"]
    assert [r["name"] for r in result["rows"]][0].startswith(f"GRPO step {family}")
    assert all(r["ms"] > 0 for r in result["rows"])


@pytest.mark.slow
@pytest.mark.usefixtures("reference_kernels")  # as `make demo` runs on CPU
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_preset_warmup_teaches_the_synthetic_task(tmp_path, family):
    """The default run's warm-up (preset ``tiny``) makes each family's tiny VLM read the prompt and both
    images.

    The GRPO phase of ``make demo`` only has something to work with when the reasoning it samples says
    what the images show: with the old 120-step warm-up the model wrote one fixed text whatever the
    images (it did not even copy the prompt) and answered "1" on every held-out pair.
    """
    from lgrpo.prompts import parse_completion
    from lgrpo.synthetic import reference_reasoning
    from lgrpo.task import build

    cfg = build_config("tiny", {"run": {"progress": False}, "train": {"steps": 0},
                                "model": {"policy": None if family == "tiny" else family}})
    dist = D.init("cpu")
    task, models, _ = build(cfg, dist)
    trainer = Trainer(cfg, dist, task, models, tmp_path)
    trainer.warmup()

    indices = list(range(32))  # held-out configurations: never seen in the warm-up
    prompts = task.prompts("eval", indices)
    out = generate(trainer.policy, task.tokenizer, prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                   stop="</answer>", greedy=True)
    parsed = [parse_completion(t, task.batcher.fmt) for t in out.texts]
    examples = prompts.extra["examples"]
    # The whole reasoning as the template writes it for this pair: prompt, both descriptions, verdict.
    exact = sum(p.reasoning == reference_reasoning(ex) for p, ex in zip(parsed, examples)) / len(examples)
    accuracy = sum(p.answer == ex.preferred for p, ex in zip(parsed, examples)) / len(examples)
    answers = {p.answer for p in parsed}
    print(f"held-out: reasoning as the template {exact:.3f}, accuracy {accuracy:.3f}")
    assert exact >= 0.7 and accuracy >= 0.7, (exact, accuracy, out.texts[:4])
    assert answers == {1, 2}, answers  # not one constant answer


@pytest.mark.usefixtures("reference_kernels")
def test_train_main_runs_end_to_end_with_periodic_eval(tmp_path):
    """`python -m lgrpo.train` on the built-in task, shortened: every stage runs and leaves its files."""
    from lgrpo.train import main

    argv = ["--run.dir", str(tmp_path), "--run.name", "smoke", "--run.progress", "false",
            "--sft.steps", "2", "--train.steps", "2", "--train.eval_every", "1", "--data.eval_size", "4",
            "--data.synthetic_train_size", "16", "--train.prompts_per_step", "2", "--rollout.group_size", "2"]
    assert main(argv) == 0
    run = tmp_path / "smoke"
    stages = [json.loads(line)["stage"] for line in (run / "eval.jsonl").read_text().splitlines()]
    assert stages == ["held-out, initial weights", "held-out, before GRPO", "held-out, step 1",
                      "held-out, after GRPO"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "config.json").is_file() and (run / "final" / "config.json").is_file()
