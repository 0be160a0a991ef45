"""LoRA policies (lgrpo.lora): which layers adapt, the adapters-off base as reference and listener, the update
against a hand-built peft model, the warm-up's merge, exact resume, the exports, 2 ranks == 1, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", reason="LoRA needs the lora extra (peft)")

from lgrpo import distributed as D  # noqa: E402
from lgrpo.config import ConfigError, build_config  # noqa: E402
from lgrpo.lora import (  # noqa: E402
    adapters_disabled,
    effective_weight,
    lora_base,
    lora_layers,
    merge_adapters,
    target_names,
)
from lgrpo.metrics import Timer  # noqa: E402
from lgrpo.rollout.hf import clean_generation_config  # noqa: E402
from lgrpo.scoring import completion_logprobs  # noqa: E402
from lgrpo.task import Models  # noqa: E402
from lgrpo.trainer import Trainer  # noqa: E402
from tests.launch import torchrun  # noqa: E402
from tests.toy_task import ToyTask, char_tokenizer, tiny_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_kernels")

LORA = {"lora_rank": 4, "lora_alpha": 8.0}


def lora_config(**overrides):
    base = {
        "model": dict(LORA),
        "train": {"steps": 3, "prompts_per_step": 4, "seed": 0},
        "rollout": {"group_size": 4, "max_new_tokens": 10},
        "loss": {"micro_batch_size": 16, "beta": 0.04},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "run": {"progress": False},
        "checkpoint": {"interval": 0},
        "data": {"synthetic_train_size": 32},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return build_config("tiny", base)


def lora_trainer(tmp_path, **overrides) -> Trainer:
    """The toy task's text policy with adapters; its reference is the adapters-off base."""
    cfg = lora_config(**overrides)
    tok = char_tokenizer()
    model = tiny_lm(tok, seed=cfg.train.seed)
    clean_generation_config(model, tok)
    base = lora_base(cfg, model)
    return Trainer(cfg, D.init("cpu"), ToyTask(tok), Models(model, None, base), tmp_path)


def perturb_adapters(model, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero B (peft starts it at zero), so the adapters change what the policy computes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * scale)


def one_rollout(trainer):
    prompts, ids = trainer.next_prompts()
    rollout = trainer.rollouts(prompts, ids)
    from lgrpo.kernels import group_advantages

    adv = group_advantages(trainer.task.rewards(rollout).total.float(), trainer.G, "group")
    return rollout, adv


# --- which layers ------------------------------------------------------------------------------------------


def test_targets_are_the_language_models_projections_unless_named():
    from lgrpo.model import load_policy

    model = load_policy("tiny", device="cpu")
    default = target_names(model, build_config("tiny").model.lora_targets)
    layers = model.config.text_config.num_hidden_layers
    assert len(default) == 7 * layers
    assert all(".language_model.layers." in n for n in default)  # no vision block, no lm_head
    assert target_names(model, "lm_head") == ["lm_head"]
    vision = target_names(model, "visual.qkv,visual.mlp.down_proj")
    assert vision and all(n.startswith("model.visual.blocks.") for n in vision)
    assert not any(n.startswith("model.visual") for n in target_names(model, "down_proj"))
    with pytest.raises(ValueError, match="'nope' names no Linear"):
        target_names(model, "q_proj,nope")


def test_only_adapters_train_and_the_base_is_in_the_compute_dtype():
    cfg = lora_config(model={"dtype": "bfloat16"})
    from lgrpo.task import policy_weights_dtype

    assert policy_weights_dtype(cfg) == "bfloat16"  # the frozen base: no fp32 master copy
    model = tiny_lm(char_tokenizer()).to(torch.bfloat16)
    lora_base(cfg, model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # master weights: the adapters'
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in trainable)


def test_adapter_init_depends_on_the_seed_alone():
    cfg = lora_config()
    a, b = tiny_lm(char_tokenizer()), tiny_lm(char_tokenizer())
    torch.manual_seed(123)
    lora_base(cfg, a)
    torch.manual_seed(456)  # another global RNG state: the same adapters
    lora_base(cfg, b)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert any(float(layer.lora_A["default"].weight.abs().sum()) > 0 for layer in lora_layers(a))


@pytest.mark.parametrize("overrides, field", [
    ({"model": {"lora_rank": -1}}, "model.lora_rank"),
    ({"model": {"lora_rank": 4, "lora_targets": "q_proj,"}}, "model.lora_targets"),
    ({"model": {"lora_alpha": 0.0}}, "model.lora_alpha"),
    ({"model": {"lora_dropout": 1.0}}, "model.lora_dropout"),
])
def test_bad_lora_options_are_refused_naming_the_option(overrides, field):
    with pytest.raises(ConfigError, match=f"--{field}"):
        build_config("tiny", overrides)


def test_vllm_with_lora_is_refused(monkeypatch):
    import lgrpo.extras as extras

    monkeypatch.setattr(extras, "missing", lambda extra: [])  # as if vllm were installed
    with pytest.raises(ConfigError, match="--rollout.engine: vllm with --model.lora_rank"):
        build_config("tiny", {"model": {"lora_rank": 4}, "rollout": {"engine": "vllm"}})


def test_missing_peft_names_the_install(monkeypatch):
    import lgrpo.extras as extras

    monkeypatch.setattr(extras, "missing", lambda extra: ["peft"] if extra == "lora" else [])
    with pytest.raises(ConfigError, match=r"--model.lora_rank: .*pip install 'lgrpo\[lora\]' \(or pip install peft\)"):
        build_config("tiny", {"model": {"lora_rank": 4}})


def test_dropout_on_an_adapted_lm_head_is_refused():
    cfg = lora_config(model={"lora_targets": "q_proj,lm_head", "lora_dropout": 0.1})
    with pytest.raises(ValueError, match="lora_dropout > 0 with lm_head"):
        lora_base(cfg, tiny_lm(char_tokenizer()))


# --- the base: reference and listener ------------------------------------------------------------------------


def test_behaviour_logprobs_have_no_adapter_dropout(tmp_path):
    """The old-log-prob pass (off-policy minibatches) is the policy that sampled, in eval mode: with
    dropout it would differ from pass to pass, so the first minibatch's ratio would not be 1."""
    trainer = lora_trainer(tmp_path, model={"lora_dropout": 0.5})
    perturb_adapters(trainer.policy)
    rollout, _ = one_rollout(trainer)
    trainer.policy.train()  # as in the update
    first, again = (trainer.logprobs(trainer.scorer, rollout) for _ in range(2))
    assert torch.equal(first, again) and trainer.policy.training  # and back in train mode for the update
    with torch.no_grad():  # the same pass in train mode does draw the adapters' dropout
        noisy = trainer.scorer(rollout.trim(), temperature=trainer.cfg.rollout.temperature).float()
    mask = rollout.trim().completion_mask
    assert not torch.allclose(noisy[mask], first[:, : mask.shape[1]][mask])


def test_adapters_off_logprobs_equal_the_base_models(tmp_path):
    """Bit for bit: the same modules, the same ops, the adapters skipped; with them on, other numbers."""
    trainer = lora_trainer(tmp_path, model={"lora_targets": "q_proj,v_proj,down_proj,lm_head"})
    perturb_adapters(trainer.policy)
    plain = tiny_lm(char_tokenizer(), seed=0)  # the same weights, never adapted
    rollout, _ = one_rollout(trainer)
    with torch.no_grad():
        want = trainer.logprobs(trainer.scorer.__class__(plain, shared_prefix=True), rollout)
        off = trainer.logprobs(trainer.ref_scorer, rollout)
        on = trainer.logprobs(trainer.scorer, rollout)
    assert torch.equal(off, want)
    assert not torch.allclose(on, want, atol=1e-3)
    assert all(p.requires_grad for layer in lora_layers(trainer.policy) for p in layer.lora_A.parameters())


def test_effective_weight_of_an_adapted_head_is_what_its_forward_applies():
    cfg = lora_config(model={"lora_targets": "lm_head"})
    model = tiny_lm(char_tokenizer())
    lora_base(cfg, model)
    perturb_adapters(model)
    head = model.get_output_embeddings()
    x = torch.randn(3, head.in_features)
    torch.testing.assert_close(x @ effective_weight(head).T, head(x))
    with adapters_disabled(model):
        assert effective_weight(head) is head.base_layer.weight


def test_a_lora_step_equals_a_hand_built_peft_models(tmp_path):
    """The trainer's update (shared prefix, fused loss, KL to the adapters-off base) against peft's own
    model on the same rollout: logits of the whole sequence, the GRPO loss written out, AdamW."""
    from peft import LoraConfig, get_peft_model

    trainer = lora_trainer(tmp_path, model={"lora_targets": "q_proj,k_proj,o_proj,up_proj,down_proj,lm_head"})
    perturb_adapters(trainer.policy)
    cfg = trainer.cfg
    names = target_names(tiny_lm(char_tokenizer()), cfg.model.lora_targets)
    hand = get_peft_model(tiny_lm(char_tokenizer(), seed=0),
                          LoraConfig(r=4, lora_alpha=8.0, target_modules=names, lora_dropout=0.0))
    ours = dict(trainer.policy.named_parameters())
    with torch.no_grad():
        for n, p in hand.named_parameters():
            if p.requires_grad:
                p.copy_(ours[n.removeprefix("base_model.model.")])
    rollout, adv = one_rollout(trainer)
    assert float(adv.abs().sum()) > 0  # something to learn from

    # The plain computation: each completion after its own (unpadded) prompt, full logits.
    def logps(model):
        out = []
        for n in range(len(rollout)):
            p = rollout.prompts.input_ids[rollout.group[n]][rollout.prompts.attention_mask[rollout.group[n]].bool()]
            c = rollout.completion_ids[n][rollout.completion_mask[n]]
            logits = model(input_ids=torch.cat([p, c])[None]).logits[0, len(p) - 1: -1]
            out.append(torch.log_softmax(logits.float(), -1).gather(-1, c[:, None])[:, 0])
        return out

    with torch.no_grad(), hand.disable_adapter():
        ref = logps(hand)
    new = logps(hand)
    tokens = sum(len(t) for t in new)
    beta = cfg.loss.beta
    loss = 0.0
    for n, (lp, r) in enumerate(zip(new, ref)):
        ratio = torch.exp(lp - lp.detach())
        d = r - lp
        loss = loss + (-(ratio * adv[n]) + beta * (torch.exp(d) - d - 1)).sum() / tokens
    loss.backward()
    params = [p for p in hand.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                      weight_decay=0.0).step()

    before = {n: p.detach().clone() for n, p in ours.items() if p.requires_grad}
    stats = trainer.policy_update(rollout, adv, Timer())
    assert stats["loss"] == pytest.approx(float(loss), rel=1e-5, abs=1e-7)
    for n, p in hand.named_parameters():
        if p.requires_grad:
            mine = ours[n.removeprefix("base_model.model.")]
            # one Adam step moves each coordinate by about lr: compared to a small fraction of it
            torch.testing.assert_close(mine, p, rtol=0, atol=cfg.optim.lr * 1e-3, msg=n)
    assert all(not torch.equal(p, before[n]) for n, p in ours.items() if n in before)  # every adapter moved
    base = {n: p for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    fresh = dict(tiny_lm(char_tokenizer(), seed=0).named_parameters())
    for n, p in base.items():  # the base did not move
        assert torch.equal(p, fresh[n.replace(".base_layer.", ".")]), n


def test_gradient_checkpointing_gives_the_adapters_the_same_update(tmp_path):
    """Recomputed layers with a frozen base (inputs that need no gradient) still reach the adapters."""
    from lgrpo.model import enable_activation_checkpointing

    plain, ckpt = lora_trainer(tmp_path / "a"), lora_trainer(tmp_path / "b")
    enable_activation_checkpointing(ckpt.policy)
    for t in (plain, ckpt):
        perturb_adapters(t.policy)
    rollout, adv = one_rollout(plain)
    start = {n: p.detach().clone() for n, p in plain.policy.named_parameters() if p.requires_grad}
    a, b = plain.policy_update(rollout, adv, Timer()), ckpt.policy_update(rollout, adv, Timer())
    assert a["grad_norm"] > 0 and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for (n, p), q in zip(plain.policy.named_parameters(), ckpt.policy.parameters()):
        if n in start:
            assert not torch.equal(p, start[n])
            torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=n)


def test_the_warm_up_trains_adapters_then_merges_them_into_the_base(tmp_path):
    trainer = lora_trainer(tmp_path, sft={"steps": 4, "batch_size": 4, "lr": 1e-2})
    start = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    rollout, _ = one_rollout(trainer)
    losses = trainer.warmup()
    assert len(losses) == 4
    moved = [n for n, p in trainer.policy.named_parameters() if not torch.equal(p, start[n])]
    assert any(".base_layer." in n for n in moved)  # the merge wrote the warm-up into the base
    assert all(float(layer.lora_B["default"].weight.abs().max()) == 0 for layer in lora_layers(trainer.policy))
    with torch.no_grad():
        policy = trainer.logprobs(trainer.scorer, rollout)
        base = trainer.logprobs(trainer.ref_scorer, rollout)
    torch.testing.assert_close(policy, base)  # GRPO starts with the policy equal to its reference


def test_merge_keeps_what_the_policy_computes(tmp_path):
    trainer = lora_trainer(tmp_path, model={"lora_targets": "q_proj,gate_proj,lm_head"})
    perturb_adapters(trainer.policy)
    rollout, _ = one_rollout(trainer)
    with torch.no_grad():
        before = trainer.logprobs(trainer.scorer, rollout)
        merge_adapters(trainer.policy, seed=5)
        after = trainer.logprobs(trainer.scorer, rollout)
        base = trainer.logprobs(trainer.ref_scorer, rollout)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, before, rtol=1e-5, atol=1e-5)


# --- checkpoints, exports -------------------------------------------------------------------------------------


def test_resume_is_exact_and_checkpoints_hold_the_adapters_only(tmp_path):
    kw = dict(train={"steps": 4}, checkpoint={"interval": 2}, sft={"steps": 2, "batch_size": 4, "lr": 1e-2})
    straight = lora_trainer(tmp_path / "straight", **kw)
    straight.warmup()
    losses = [m["loss"] for m in straight.fit()]

    first = lora_trainer(tmp_path / "resumed", **kw)
    first.warmup()
    from lgrpo.checkpoint import save_weights

    save_weights(tmp_path / "resumed" / "warmup", first.policy, first.dist, {"steps": 2})
    head = []

    def crash_after_step_2(trainer, metrics):
        head.append(metrics["loss"])
        if trainer.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.fit(on_step=crash_after_step_2)
    torch.manual_seed(12345)
    from lgrpo.run import warm_up_or_restore

    second = lora_trainer(tmp_path / "resumed", **kw)
    warm_up_or_restore(second.cfg, second.dist, second, [], tmp_path / "resumed", lambda title: None)
    assert second.step == 2
    tail = [m["loss"] for m in second.fit()]
    assert head + tail == losses
    for (n, a), b in zip(straight.policy.named_parameters(), second.policy.parameters()):
        assert torch.equal(a, b), n

    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(tmp_path / "resumed" / "checkpoints" / "step_0000004")).read_metadata()
    model_keys = [k.removeprefix("model.") for k in saved.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    optim_keys = [k for k in saved.state_dict_metadata if k.startswith("optimizer.state.")]
    assert optim_keys and all(".lora_A." in k or ".lora_B." in k for k in optim_keys)


def test_the_export_is_the_merged_policy_plus_peft_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lgrpo.export import export_pretrained

    trainer = lora_trainer(tmp_path, model={"lora_targets": "q_proj,v_proj,up_proj,lm_head"})
    trainer.fit()
    rollout, _ = one_rollout(trainer)
    out = export_pretrained(trainer.policy, tmp_path / "final", trainer.dist)
    mask = rollout.completion_mask
    with torch.no_grad():
        want = trainer.logprobs(trainer.scorer, rollout).masked_fill(~mask, 0.0)  # the scorer leaves pads be
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        got = completion_logprobs(merged, rollout.prompts, rollout.completion_ids, rollout.completion_mask,
                                  trainer.G)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        adapted = PeftModel.from_pretrained(tiny_lm(char_tokenizer(), seed=0), out / "adapter").eval()
        again = completion_logprobs(adapted.get_base_model(), rollout.prompts, rollout.completion_ids,
                                    rollout.completion_mask, trainer.G)
        torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"


# --- two ranks, the CLI -------------------------------------------------------------------------------------


DIST = dict(train={"steps": 2, "prompts_per_step": 4}, loss={"micro_batch_size": 3},
            sft={"steps": 3, "batch_size": 4, "lr": 1e-2})


def dist_run(out_dir: Path) -> dict:
    """Warm-up (merged under FSDP2 on two ranks), two GRPO steps, the export; what rank 0 saw."""
    from lgrpo.export import export_pretrained

    trainer = lora_trainer(out_dir, **DIST)
    warm = trainer.warmup()
    history = trainer.fit()
    export_pretrained(trainer.policy, out_dir / "final", trainer.dist)
    result = {"warmup": warm, "losses": [m["loss"] for m in history], "rewards": [m["reward"] for m in history],
              "grad_norms": [m["grad_norm"] for m in history], "world": trainer.dist.world_size,
              "fsdp": trainer.fsdp}
    D.close()
    return result


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    one = dist_run(tmp_path / "one")
    assert one["world"] == 1 and not one["fsdp"]
    proc = torchrun(__file__, str(tmp_path / "two"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world"] == 2 and two["fsdp"]
    assert two["warmup"] == pytest.approx(one["warmup"], rel=1e-5)
    assert two["rewards"] == pytest.approx(one["rewards"], rel=1e-6)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)
    from safetensors.torch import load_file

    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "one" / "final" / name), load_file(tmp_path / "two" / "final" / name)
        assert a.keys() == b.keys()
        for k in a:  # AdamW: weights agree closely, not to rounding (lgrpo.distributed: what equals what)
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-5, msg=k)


def test_cli_lora_run_of_the_default_task_trains_resumes_and_exports(tmp_path, capsys):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lgrpo.train import main

    args = ["--model.lora_rank", "8", "--run.dir", str(tmp_path), "--run.name", "lora", "--run.progress", "false",
            "--sft.steps", "6", "--sft.batch_size", "4", "--train.prompts_per_step", "2", "--rollout.group_size",
            "2", "--rollout.max_new_tokens", "8", "--loss.micro_batch_size", "4", "--checkpoint.interval", "1",
            "--data.synthetic_eval_size", "2", "--run.tensorboard", "off"]
    assert main(args + ["--train.steps", "1"]) == 0
    run = tmp_path / "lora"
    assert "warm-up: 6 steps" in capsys.readouterr().out
    assert main(args + ["--train.steps", "2", "--run.allow_config_change", "true"]) == 0
    out = capsys.readouterr().out
    assert "[resume] from" in out and "at step 1" in out and "warm-up:" not in out
    assert "reference/listener rebuilt from the warm-up weights" in out  # the merged base, adapters off
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None][-2:] == [1, 2]
    assert (run / "warmup" / "DONE").is_file() and (run / "checkpoints" / "step_0000002" / "DONE").is_file()
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "final")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["lora_rank"] == 8
    assert isinstance(PeftModel.from_pretrained(merged, run / "final" / "adapter"), PeftModel)


if __name__ == "__main__":  # one rank of test_two_ranks_match_one_process under torchrun
    import os

    os.environ.setdefault("TRITON_INTERPRET", "0")
    out = Path(sys.argv[1])
    res = dist_run(out)
    if res is not None and int(os.environ.get("RANK", 0)) == 0:
        (out / "result.json").write_text(json.dumps(res))
