"""The memory plan (lgrpo.plan) against what really gets allocated: saved activations counted with
saved-tensor hooks on the tiny and a small random Qwen2.5-VL, the weights, gradients and AdamW state of a
real policy after a step, transformers' KV cache, and the H100 measurement of the 3B-sized update."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lgrpo.config import build_config
from lgrpo.group import GroupBatch
from lgrpo.model import TINY_DIR
from lgrpo.plan import GiB, format_plan, plan, read_shapes, update_activation_bytes
from lgrpo.scoring import CompletionScorer

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}


def _random_model(tmp_path, dtype: torch.dtype, text: dict | None = None):
    """The tiny folder, optionally with other text shapes, as a model with random weights (sdpa)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = tmp_path / "model"
    shutil.copytree(TINY_DIR, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(text or {})
    raw["vision_config"]["out_hidden_size"] = raw["hidden_size"]
    (folder / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(folder))
    model.set_attn_implementation("sdpa")
    return folder, model.to(dtype).train()


def _saved_bytes(model, fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn`` runs, weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for ptr, n in seen.items() if ptr not in weights)


@pytest.mark.parametrize("text", [None, SMALL], ids=["tiny", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", [(2, 4, 48), (1, 8, 96)], ids=["2x4x48", "1x8x96"])
def test_update_activations_match_what_autograd_saves(tmp_path, batcher, dtype, text, layout):
    """An update micro-batch through the real scorer and fused loss (shared prefix, images of the
    synthetic task): the plan's activation bytes within 10% of the storages autograd keeps."""
    from lgrpo.synthetic import SyntheticTask

    prompts_n, group, completion_len = layout
    folder, model = _random_model(tmp_path, dtype, text)
    task = SyntheticTask(seed=1)
    exs = [task.example("train", i) for i in range(prompts_n)]
    prompts = batcher.reasoner_batch([e.prompt for e in exs], [list(e.images) for e in exs])
    gen = torch.Generator().manual_seed(0)
    n = prompts_n * group
    ids = torch.randint(20, 500, (n, completion_len), generator=gen)
    batch = GroupBatch.grouped(prompts, ids, torch.ones_like(ids, dtype=torch.bool), group)
    scorer = CompletionScorer(model, shared_prefix=True)
    loss = {"advantages": torch.randn(n, generator=gen), "loss_type": "grpo"}
    real = _saved_bytes(model, lambda: scorer(batch, temperature=1.0, loss=loss))
    parts = update_activation_bytes(
        read_shapes(folder), dtype.itemsize, prompts=prompts_n, prompt_len=prompts.input_ids.shape[1],
        completions=n, completion_len=completion_len, patches=prompts.pixel_values.shape[0])
    assert abs(sum(parts.values()) / real - 1) < 0.10, (sum(parts.values()), real, parts)


@pytest.mark.parametrize("text", [None, SMALL], ids=["tiny", "small"])
def test_lora_update_activations_match_what_autograd_saves(tmp_path, batcher, text):
    """The same with LoRA adapters on the language model (the default targets) only: the frozen vision
    tower saves nothing, frozen norms less, each adapter its rank-8 intermediate."""
    pytest.importorskip("peft")
    from lgrpo.config import ModelConfig
    from lgrpo.lora import add_adapters
    from lgrpo.synthetic import SyntheticTask

    folder, model = _random_model(tmp_path, torch.float32, text)
    add_adapters(model, 8, None, 0.0, ModelConfig().lora_targets, seed=0, dtype=torch.float32)
    task = SyntheticTask(seed=1)
    exs = [task.example("train", i) for i in range(2)]
    prompts = batcher.reasoner_batch([e.prompt for e in exs], [list(e.images) for e in exs])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 500, (8, 48), generator=gen)
    batch = GroupBatch.grouped(prompts, ids, torch.ones_like(ids, dtype=torch.bool), 4)
    # The plain loss (logits, then the GRPO loss): the plan's CPU path, whatever Triton the test runs on
    scorer = CompletionScorer(model, shared_prefix=True, fused=False)
    loss = {"advantages": torch.randn(8, generator=gen), "loss_type": "grpo"}
    real = _saved_bytes(model, lambda: scorer(batch, temperature=1.0, loss=loss))
    parts = update_activation_bytes(
        read_shapes(folder), 4, prompts=2, prompt_len=prompts.input_ids.shape[1], completions=8,
        completion_len=48, patches=prompts.pixel_values.shape[0], vision_trains=False, lora=(8, 7))
    assert parts["vision blocks"] == parts["image patches"] == 0
    assert abs(sum(parts.values()) / real - 1) < 0.10, (sum(parts.values()), real, parts)


def test_weights_gradients_adamw_and_frozen_copies_are_what_a_real_policy_holds():
    """The tiny policy in fp32 after one AdamW step, the frozen copies in the compute dtype: exact."""
    from lgrpo.model import load_policy, load_reference
    from lgrpo.optim import build_optimizer

    cfg = build_config("tiny", {"model": {"dtype": "bfloat16", "master_weights": "float32"}})
    p = plan(cfg, 1, device="cpu")
    policy = load_policy("tiny", dtype="float32", device="cpu")
    opt = build_optimizer(policy, cfg.optim)
    sum(q.float().sum() for q in policy.parameters()).backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert p.rows["policy weights"] == nbytes(policy.parameters())
    assert p.rows["gradients"] == nbytes(q.grad for q in policy.parameters())
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    assert p.rows["AdamW state"] == nbytes(states)
    reference = load_reference("tiny", dtype="bfloat16", device="cpu")
    assert p.rows["frozen reference + listener"] == nbytes(reference.parameters())  # one module for both
    assert p.rows["compute copy"] == nbytes(reference.parameters())  # autocast's bf16 casts, one rank


def test_a_lora_policy_trains_its_adapters_alone_and_needs_no_frozen_copies():
    """LoRA (lgrpo.lora): the base frozen in bf16, fp32 adapters with their gradients and AdamW state, the
    reference and the listener the base itself; a listener from another folder is a copy again."""
    pytest.importorskip("peft", reason="LoRA needs the lora extra (peft)")
    from lgrpo.lora import lora_base
    from lgrpo.model import load_policy
    from lgrpo.optim import build_optimizer

    lora = {"dtype": "bfloat16", "master_weights": "float32", "lora_rank": 4,
            "lora_targets": "q_proj,v_proj,down_proj,visual.qkv"}
    cfg = build_config("tiny", {"model": lora})
    p = plan(cfg, 1, device="cpu")
    policy = load_policy("tiny", dtype="bfloat16", device="cpu")
    lora_base(cfg, policy)
    adapters = [q for q in policy.parameters() if q.requires_grad]
    opt = build_optimizer(policy, cfg.optim)
    sum(q.float().sum() for q in adapters).backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert p.rows["policy weights"] == nbytes(policy.parameters())
    assert p.rows["gradients"] == nbytes(q.grad for q in adapters) == nbytes(adapters)
    assert all(q.dtype == torch.bfloat16 for q in policy.parameters() if not q.requires_grad)
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    assert p.rows["AdamW state"] == nbytes(states) == 2 * nbytes(adapters)
    assert p.rows["compute copy"] == nbytes(adapters) // 2  # autocast's bf16 casts of the fp32 adapters
    assert not any(name.startswith("frozen") for name in p.rows)
    other = plan(build_config("tiny", {"model": {**lora, "listener": str(TINY_DIR)}}), 1, device="cpu")
    assert other.rows["frozen listener"] > 0 and "frozen reference" not in other.rows
    assert p.peak < plan(build_config("tiny", {"model": lora | {"lora_rank": 0}}), 1, device="cpu").peak
    # The rollouts' KV cache is the base's dtype: peft casts an adapted projection's output back to it.
    v_proj = policy.model.language_model.layers[0].self_attn.v_proj
    assert v_proj(torch.zeros(1, v_proj.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16
    bf16 = plan(build_config("tiny", {"model": {"dtype": "bfloat16", "master_weights": "compute"}}), 1, device="cpu")
    assert p.rows["KV cache"] == bf16.rows["KV cache"]


def test_kv_cache_per_token_is_what_transformers_allocates(tmp_path):
    """The plan's KV bytes for one row of a given length equal transformers' cache after a prefill."""
    folder, model = _random_model(tmp_path, torch.float32, SMALL)
    length = 37
    with torch.no_grad():
        out = model(input_ids=torch.randint(20, 500, (1, length)), use_cache=True)
    cache = out.past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    s = read_shapes(folder)
    assert real == s.layers * 2 * s.kv_heads * s.head_dim * 4 * length


def test_plan_of_the_3b_update_matches_the_h100_measurement():
    """bench/results/h100-2026-11-26: the 3B-sized update (8 x 1024 tokens, bf16 weights, no optimizer)
    peaked at 43.9 GiB; the plan's weights + the larger of activations and gradients within 10%."""
    measured = json.loads((ROOT / "bench/results/h100-2026-11-26/train_step.json").read_text())["phases"]
    s = read_shapes("qwen2.5-vl-3b")
    assert s.params == measured["params"]  # the bench built the same shapes
    from lgrpo.kernels.linear_grpo import default_chunk_rows

    parts = update_activation_bytes(s, 2, prompts=8, prompt_len=1, completions=8, completion_len=1023,
                                    patches=0, backend="varlen", loss_rows=default_chunk_rows(s.vocab, 2))
    weights = grads = s.params * 2
    planned = (weights + max(sum(parts.values()), grads)) / GiB
    peak = measured["update_8x1024"]["peak_gib"]
    assert abs(planned / peak - 1) < 0.10, (planned, peak)


def test_the_paper_setup_on_eight_80gb_gpus_and_the_table(tmp_path):
    """Qwen2.5-VL-7B at the paper's settings (G 8, two 1024x1024 images, 512 new tokens), full fine-tune
    sharded over 8 ranks: fits 80 GB; unsharded on one it does not. The table names every part. The
    folder holds only config.json: a plan reads nothing else."""
    from lgrpo.plan import PUBLISHED

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", **PUBLISHED["qwen2.5-vl-7b"]}))
    over = {"model": {"policy": str(tmp_path)}, "data": {"max_pixels": 1024 * 1024},
            "rollout": {"group_size": 8, "max_new_tokens": 512}, "train": {"prompts_per_step": 16}}
    cfg = build_config("qwen2.5-vl-7b", over)
    shapes = read_shapes(tmp_path)
    assert shapes == read_shapes("qwen2.5-vl-7b")
    eight, one = plan(cfg, 8, fsdp=True), plan(cfg, 1, fsdp=False)
    assert eight.peak < 80e9 < one.peak
    assert eight.rows["policy weights"] * 8 == one.rows["policy weights"] == shapes.params * 4
    text = format_plan(eight, device_gib=80e9 / GiB)
    for name in ("policy weights", "AdamW state", "frozen reference + listener", "KV cache",
                 "update activations", "peak", "fits in 74.5 GiB"):
        assert name in text
    assert "does NOT fit" in format_plan(one, device_gib=80e9 / GiB)


def test_train_plan_prints_the_table_and_touches_nothing(tmp_path, capsys):
    from lgrpo.train import main

    assert main(["--plan", "--plan.ranks", "2", "--plan.gpu_gib", "24", "--run.dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan per rank (2 rank(s), FSDP2 sharded;") and "fits in 24.0 GiB" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("reference_kernels")
def test_a_run_writes_its_plan_into_the_run_folder(tmp_path, monkeypatch):
    from lgrpo.train import main
    from lgrpo.trainer import Trainer

    def stop(self, on_step=None):
        raise RuntimeError("stopped after start-up")

    monkeypatch.setattr(Trainer, "fit", stop)
    with pytest.raises(RuntimeError, match="after start-up"):
        main(["--sft.steps", "0", "--data.eval", "none", "--run.progress", "false", "--run.dir", str(tmp_path),
              "--run.name", "p"])
    text = (tmp_path / "p" / "memory_plan.txt").read_text()
    assert text.startswith("memory plan per rank (1 rank(s), unsharded;") and "policy weights" in text


@pytest.mark.parametrize("name,params,vision", [("qwen3-vl-4b", 4_437_815_808, 24), ("qwen3-vl-8b", 8_767_123_696, 27)])
def test_qwen3_vl_presets_plan_from_their_published_shapes(name, params, vision):
    """The published Qwen3-VL-4B/8B shapes (4.44B / 8.77B parameters, as their model cards count them):
    16-px patches, 32 x 32 pixels per visual token, 36 decoder layers of 8 key/value heads of 128; the
    preset of the same name plans with them and its family's image bound, nothing loaded."""
    s = read_shapes(name)
    assert s.params == params and s.vision_layers == vision
    assert (s.patch, s.merge, s.pixels_per_token) == (16, 2, 32 * 32)
    assert (s.layers, s.kv_heads, s.head_dim) == (36, 8, 128)
    cfg = build_config(name, {"model": {"policy": name}, "data": {"max_pixels": 1024 * 1024}})
    eight = plan(cfg, 8, fsdp=True)
    assert eight.rows["policy weights"] * 8 == s.params * 4
    # two 1024 x 1024 images are 2 x 1024 visual tokens at 32 x 32 pixels each
    assert "2176 prompt tokens" in format_plan(eight)
