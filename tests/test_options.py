"""Every option does what its --help text says: each one changes what it claims to change."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from lgrpo import distributed as D
from lgrpo.config import JobConfig, build_config
from tests.test_trainer import make_trainer

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_is_read_outside_the_config():
    """A field nothing reads is an option that does nothing (``--help`` would list it)."""
    src = "\n".join(p.read_text() for p in (ROOT / "lgrpo").rglob("*.py") if p.name != "config.py")
    cfg = JobConfig()
    unread = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(JobConfig)
        if dataclasses.is_dataclass(getattr(cfg, section.name))
        for f in dataclasses.fields(getattr(cfg, section.name))
        if not re.search(rf"\.{f.name}\b", src)
    ]
    assert unread == []


@pytest.mark.usefixtures("reference_kernels")
@pytest.mark.parametrize("swap", [True, False])
def test_swap_augment_decides_whether_pairs_are_swapped(tmp_path, swap):
    trainer = make_trainer(tmp_path, data={"swap_augment": swap}, sft={"steps": 2, "batch_size": 4})
    seen = []
    prompts = trainer.task.prompts

    def recording(split, indices, swaps=None):
        seen.extend(swaps or [])
        return prompts(split, indices, swaps)

    trainer.task.prompts = recording
    trainer.warmup()
    trainer.train_step()
    assert len(seen) == 2 * 4 + 4
    assert any(seen) if swap else not any(seen)


@pytest.mark.usefixtures("reference_kernels")
def test_loss_chunk_size_reaches_linear_grpo_loss(tmp_path, monkeypatch):
    import lgrpo.scoring as S

    seen = []
    real = S.linear_grpo_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("chunk_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "linear_grpo_loss", spy)
    make_trainer(tmp_path / "a", loss={"chunk_size": 5}).train_step()
    make_trainer(tmp_path / "b").train_step()
    assert seen and set(seen) == {5, None} and seen[0] == 5


def test_image_size_bounds_change_the_visual_tokens_and_are_written():
    from lgrpo.run import resolve_auto
    from lgrpo.task import build

    def tokens(**data):
        cfg = build_config("tiny", {"data": data, "train": {"steps": 0}, "reward": {"w_listener": 0.0}})
        resolve_auto(cfg, D.Dist())
        task, _, _ = build(cfg, D.Dist())
        batch = task.prompts("eval", [0])
        return int(batch.mm_token_type_ids.sum()), (cfg.data.min_pixels, cfg.data.max_pixels)

    default, bounds = tokens()
    assert default == 2 * 4 and bounds == (3136, 12544)  # two 56x56 images, the folder's bounds
    small, bounds = tokens(min_pixels=784, max_pixels=1568)
    assert small == 2 * 1 and bounds == (784, 1568)
    large, _ = tokens(min_pixels=112 * 112, max_pixels=112 * 112)
    assert large == 2 * 16


def test_attention_auto_resolves_once_for_every_model(tmp_path):
    from lgrpo.run import resolve_auto
    from lgrpo.task import build

    cfg = build_config("tiny", {"train": {"steps": 0}})
    assert cfg.model.attn_implementation == "auto"
    resolve_auto(cfg, D.Dist())
    assert cfg.model.attn_implementation == "sdpa"  # no CUDA, no flash_attn here
    task, models, listener = build(cfg, D.Dist())
    ran = {m.config._attn_implementation for m in (models.policy, models.reference, listener.model)}
    assert ran == {"sdpa"}
    with pytest.raises(ValueError, match="flash_attention_2"):
        resolve_auto(build_config("tiny", {"model": {"attn_implementation": "flash_attention_2"}}), D.Dist())


@pytest.mark.usefixtures("reference_kernels")
def test_prefix_attention_reaches_every_shared_prefix_pass(tmp_path, monkeypatch):
    """Reference, old-log-prob, update and listener forwards all build their layout for the chosen backend;
    auto resolves at start-up, and a backend that cannot run the update here is refused there."""
    import lgrpo.scoring as S
    from lgrpo.run import resolve_auto
    from lgrpo.task import build

    seen = []
    real = S.build_layout

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(S, "build_layout", spy)
    make_trainer(tmp_path, loss={"prefix_attention": "sdpa", "beta": 0.04, "epochs": 2}).train_step()
    assert len(seen) >= 3 and set(seen) == {"sdpa"}  # reference, old log-probs, update
    _, _, listener = build(build_config("tiny", {"loss": {"prefix_attention": "sdpa"}}), D.Dist())
    assert listener.scorer.prefix_attention == "sdpa"

    from lgrpo import attention
    from lgrpo.config import PREFIX_ATTENTION

    assert PREFIX_ATTENTION == attention.CHOICES
    cfg = build_config("tiny", {"train": {"steps": 0}})
    assert cfg.loss.prefix_attention == "auto"
    assert resolve_auto(cfg, D.Dist()).loss.prefix_attention == "sdpa"  # CPU
    for backend in ("flex", "varlen"):
        with pytest.raises(ValueError, match=f"prefix_attention {backend} cannot run the update on CPU"):
            resolve_auto(build_config("tiny", {"loss": {"prefix_attention": backend}}), D.Dist())
    with pytest.raises(ValueError, match="loss.prefix_attention"):
        build_config("tiny", {"loss": {"prefix_attention": "flash"}})


@pytest.mark.parametrize("on", [True, False])
def test_gradient_checkpointing_reaches_the_policy_only(on):
    from lgrpo.task import build

    def checkpointing(model):  # the property's name before transformers 5.2x
        name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
            "is_gradient_checkpointing"
        return getattr(model, name)

    _, models, listener = build(build_config("tiny", {"model": {"gradient_checkpointing": on}}), D.Dist())
    assert checkpointing(models.policy) is on
    assert not checkpointing(models.reference) and not checkpointing(listener.model)


def test_one_stop_set_for_rollouts_masks_and_the_batcher():
    from lgrpo.batching import VLBatcher
    from lgrpo.model import load_policy, load_tokenizer
    from lgrpo.prompts import stop_token_ids
    from lgrpo.rollout.hf import clean_generation_config, generate

    tok = load_tokenizer("tiny")
    stops = stop_token_ids(tok)
    vocab = tok.get_vocab()
    assert set(stops) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    assert VLBatcher.from_pretrained("tiny").eos_ids == list(stops)
    model = load_policy("tiny")
    clean_generation_config(model, tok)
    assert sorted(model.generation_config.eos_token_id) == list(stops)

    # generate stops at either one, and the mask ends there: force <|endoftext|> as the 3rd token
    from transformers import LogitsProcessor

    class ForceAt(LogitsProcessor):
        def __init__(self, at, token):
            self.at, self.token, self.n = at, token, 0

        def __call__(self, input_ids, scores):
            self.n += 1
            if self.n == self.at:
                scores = torch.full_like(scores, -1e9)
                scores[:, self.token] = 0.0
            return scores

    seen = {}
    real = model.generate

    def generate_with_forcing(*args, **kwargs):
        seen["eos"] = list(kwargs["generation_config"].eos_token_id)
        kwargs["logits_processor"].append(ForceAt(3, vocab["<|endoftext|>"]))
        return real(*args, **kwargs)

    model.generate = generate_with_forcing
    batcher = VLBatcher.from_pretrained("tiny")
    from lgrpo.synthetic import SyntheticTask

    ex = SyntheticTask().example("train", 0)
    prompt = batcher.reasoner_batch([ex.prompt], [list(ex.images)])
    out = generate(model, tok, prompt, max_new_tokens=8, stop=None, greedy=True)
    assert seen["eos"] == list(stops)
    assert out.lengths.tolist() == [3] and not bool(out.truncated[0])
    assert int(out.completion_ids[0, 2]) == vocab["<|endoftext|>"]
