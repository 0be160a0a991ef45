"""The tiny built-in Qwen2.5-VL, loading options, and processor-free batching (CPU)."""

import importlib.resources
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from lgrpo import model as lm
from lgrpo.batching import VLBatcher
from lgrpo.group import GroupBatch, encode_completions
from lgrpo.model import final_hidden_states, lm_head_weight, load_image_processor, load_model, load_tokenizer
from lgrpo.models import FAMILIES
from lgrpo.scoring import CompletionScorer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy():
    return load_model("tiny", seed=0)


# -- assets, tokenizer, image processor ----------------------------------------------------------------

def test_assets_ship_with_the_package():
    folder = importlib.resources.files("lgrpo") / "assets" / "tiny-qwen2.5-vl"
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "preprocessor_config.json"):
        assert (folder / name).is_file(), name
    assert Path(str(folder)).resolve() == lm.TINY_DIR.resolve()
    for family in FAMILIES.values():  # one tiny model per family, each of its own type
        shipped = importlib.resources.files("lgrpo") / "assets" / family.tiny.name
        assert json.loads((shipped / "config.json").read_text())["model_type"] == family.model_type


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_assets_regenerate_identically(tmp_path, model_type):
    spec = importlib.util.spec_from_file_location("build_tiny_assets", REPO / "tools/build_tiny_assets.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    shipped_dir = FAMILIES[model_type].tiny
    builder.build(tmp_path, model_type)
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((shipped_dir / name).read_text()), name
    new, shipped = (json.loads((d / "tokenizer.json").read_text()) for d in (tmp_path, shipped_dir))
    assert new["model"]["vocab"] == shipped["model"]["vocab"]
    assert new["model"]["merges"] == shipped["model"]["merges"]
    assert new["added_tokens"] == shipped["added_tokens"]


def test_tiny_tokenizer_matches_config_and_qwen_conventions():
    tok = load_tokenizer("tiny")
    cfg = json.loads((lm.TINY_DIR / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"] and 512 <= len(tok) <= 1000
    for token, key in (("<|image_pad|>", "image_token_id"), ("<|video_pad|>", "video_token_id"),
                       ("<|vision_start|>", "vision_start_token_id"), ("<|im_end|>", "eos_token_id")):
        assert tok.convert_tokens_to_ids(token) == cfg[key]
    assert (tok.pad_token, tok.eos_token, tok.padding_side) == ("<|endoftext|>", "<|im_end|>", "left")
    # Special tokens stay whole; text around them goes through the byte-level BPE.
    ids = tok.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>",
                     add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:1] == ["<|im_start|>"]
    assert ids.count(cfg["image_token_id"]) == 1
    text = "Any text, even ÄÖ 123!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_image_processor_sizes():
    proc = load_image_processor("tiny")
    b = VLBatcher(load_tokenizer("tiny"), proc)
    small, wide, big = b.process_images([Image.new("RGB", (56, 56)), Image.new("RGB", (84, 56)),
                                         Image.new("RGB", (640, 480))])
    assert small.grid_thw.tolist() == [1, 4, 4] and small.num_tokens(2) == 4
    assert wide.grid_thw.tolist() == [1, 4, 6] and wide.num_tokens(2) == 6
    assert int(big.grid_thw.prod()) * 14 * 14 <= 112 * 112  # max_pixels bounds large images
    assert small.pixel_values.shape == (16, 3 * 2 * 14 * 14)
    bigger = VLBatcher(b.tokenizer, load_image_processor("tiny", max_pixels=224 * 224)).process_images(
        [Image.new("RGB", (640, 480))])[0]
    assert int(bigger.grid_thw.prod()) > int(big.grid_thw.prod())
    with pytest.raises(ValueError, match="min_pixels"):
        load_image_processor("tiny", min_pixels=10_000, max_pixels=5_000)
    # Loading with bounds must not change the class defaults other loads start from.
    assert lm._pil_image_processor_class().size == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}


def test_models_are_never_fetched_from_a_hub():
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_model("Qwen/Qwen2.5-VL-3B-Instruct")


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "qwen3_5", "llava"])
def test_other_model_types_are_rejected(tmp_path, model_type):
    """MoE variants, Qwen3.5's linear-attention layers, any other VLM: refused, naming what is supported."""
    cfg = json.loads((lm.TINY_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    with pytest.raises(ValueError, match=rf"'{model_type}' model; lgrpo supports .*Qwen2.5-VL \(qwen2_5_vl\)"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=model_type):
        VLBatcher.from_pretrained(tmp_path)


# -- loading options -----------------------------------------------------------------------------------

def test_tiny_weights_come_from_the_seed_and_leave_the_caller_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (load_model("tiny", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_policy_trains_and_reference_listener_are_frozen():
    policy = lm.load_policy("tiny")
    assert policy.training and all(p.requires_grad for p in policy.parameters())
    for frozen in (lm.load_reference("tiny"), lm.load_listener("tiny", dtype="bfloat16")):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert next(frozen.parameters()).dtype == torch.bfloat16


def test_attention_choice_on_cpu():
    assert lm.resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert lm.resolve_attn_implementation("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match="flash_attn"):
        lm.resolve_attn_implementation("flash_attention_2", "cpu")
    with pytest.raises(ValueError, match="attn_implementation"):
        lm.resolve_attn_implementation("flex", "cpu")
    m = load_model("tiny", attn_implementation="eager")
    assert m.config._attn_implementation == "eager"


@pytest.fixture
def importable_flash_attn(tmp_path, monkeypatch):
    """A ``flash_attn`` package that imports (nothing in it): ``flash_attn_available()`` runs its own
    find_spec + import and says yes, as on a GPU machine with flash-attn installed."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("# stand-in for tests/test_model.py\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lm.flash_attn_available()
    yield
    sys.modules.pop("flash_attn", None)  # later tests see this machine's own answer again


def test_auto_attention_takes_the_weights_dtype_into_account(importable_flash_attn):
    """flash-attn runs fp16/bf16 only: fp32 weights (the trainer's master weights, decoded without autocast
    in the rollouts) resolve to SDPA even where flash_attn imports, instead of crashing at the first
    rollout; an explicit request for it in fp32 is refused up front."""
    for dtype in (torch.float32, "float32", "fp32"):
        assert lm.resolve_attn_implementation("auto", "cuda", dtype) == "sdpa", dtype
    for dtype in (torch.bfloat16, torch.float16, "bfloat16"):
        assert lm.resolve_attn_implementation("auto", "cuda", dtype) == "flash_attention_2", dtype
    assert lm.resolve_attn_implementation("auto", "cuda") == "flash_attention_2"  # load_model's CUDA default: bf16
    assert lm.resolve_attn_implementation("auto", "cpu", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="fp16/bf16 weights, got torch.float32"):
        lm.resolve_attn_implementation("flash_attention_2", "cuda", torch.float32)
    assert lm.resolve_attn_implementation("flash_attention_2", "cuda", torch.bfloat16) == "flash_attention_2"


def test_the_trainer_resolves_auto_attention_for_the_policy_weights(importable_flash_attn):
    """``--model.attn_implementation auto`` is resolved once, before any model loads, for every model of
    the run: with fp32 master weights (the default) that is SDPA; with the weights in bf16, flash-attn."""
    from lgrpo import distributed as D
    from lgrpo.config import build_config
    from lgrpo.run import resolve_auto

    cuda = D.Dist(device=torch.device("cuda"))
    for overrides, want in (({}, "sdpa"),
                            ({"master_weights": "compute", "dtype": "bfloat16"}, "flash_attention_2")):
        cfg = build_config("tiny", {"model": overrides, "loss": {"shared_prefix": False}})
        assert resolve_auto(cfg, cuda).model.attn_implementation == want, overrides


def test_dtype_names():
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="float8")


def test_liger_switch(monkeypatch, policy):
    assert lm._resolve_liger(None, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="CUDA"):
        load_model("tiny", liger=True)
    # The kernels it asks liger for: never the fused cross-entropy (the trainer owns the loss).
    calls = []
    monkeypatch.setattr(lm, "liger_available", lambda: True)
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen2_5_vl = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    assert lm._maybe_apply_liger(policy, None, torch.device("cuda"))[:2] == ["rms_norm", "swiglu"]
    assert len(calls) == 1 and calls[0]["model"] is policy
    assert calls[0]["fused_linear_cross_entropy"] is False and calls[0]["cross_entropy"] is False
    assert calls[0]["rms_norm"] and calls[0]["swiglu"] and calls[0]["rope"]
    assert lm._maybe_apply_liger(policy, False, torch.device("cuda")) == [] and len(calls) == 1


def test_liger_that_cannot_patch_this_transformers(monkeypatch, policy, caplog):
    def broken(**kw):
        raise ImportError("cannot import name 'LigerQwen2_5_VLCausalLMOutputWithPast'")

    monkeypatch.setattr(lm, "liger_available", lambda: True)
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen2_5_vl = broken
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    with pytest.raises(RuntimeError, match="cannot patch"):
        lm._maybe_apply_liger(policy, True, torch.device("cuda"))
    assert lm._maybe_apply_liger(policy, None, torch.device("cuda")) == []  # auto: warn, go on without
    assert "continuing without liger" in caplog.text


# -- batching ------------------------------------------------------------------------------------------

def test_prompt_batch_layout(batcher, pairs):
    prompts, images = pairs
    batch = batcher.reasoner_batch(prompts, images)
    img_id = batcher.image_token_id
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 6], [1, 4, 4], [1, 4, 4], [1, 8, 8]]
    assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(-1).sum())
    assert (batch.input_ids == img_id).sum(1).tolist() == [8, 10, 20]
    assert torch.equal(batch.mm_token_type_ids.bool(), batch.input_ids == img_id)
    lengths = batch.attention_mask.sum(1)
    for row, n in enumerate(lengths.tolist()):  # left padding: pads first, then the prompt
        assert batch.attention_mask[row, -n:].all() and not batch.attention_mask[row, :-n].any()
        assert (batch.input_ids[row, :-n] == batcher.pad_id).all()
    assert lengths.max() == batch.length and lengths.min() < batch.length
    # Every row ends with the opened assistant turn.
    tail = batcher.tokenizer.decode(batch.input_ids[0, -4:])
    assert tail.endswith("assistant\n")


def test_placeholder_count_must_match_images(batcher):
    img = Image.new("RGB", (56, 56))
    with pytest.raises(ValueError, match="placeholders"):
        batcher.encode(["<|image_pad|> only one"], [[img, img]])
    with pytest.raises(ValueError, match="texts"):
        batcher.encode(["a"], [])


def test_images_of_different_sizes_in_one_batch_match_one_by_one(policy, batcher, pairs):
    prompts, images = pairs
    batch = batcher.reasoner_batch(prompts, images)
    with torch.no_grad():
        together = policy(**batch.model_inputs(), logits_to_keep=1).logits[:, -1]
        for b in range(len(prompts)):
            alone = batcher.reasoner_batch([prompts[b]], [images[b]])
            single = policy(**alone.model_inputs(), logits_to_keep=1).logits[0, -1]
            torch.testing.assert_close(together[b], single, rtol=1e-5, atol=1e-5)
    # The images matter: swapping them changes the output by far more than the tolerance.
    with torch.no_grad():
        swapped = batcher.reasoner_batch(prompts[:1], [images[0][::-1]])
        other = policy(**swapped.model_inputs(), logits_to_keep=1).logits[0, -1]
    assert (other - together[0]).abs().max() > 1e-3


def test_select_with_repeats_equals_encoding_the_repeated_inputs(batcher, pairs):
    prompts, images = pairs
    batch = batcher.reasoner_batch(prompts, images).select(torch.arange(3).repeat_interleave(3))
    expected = batcher.reasoner_batch([p for p in prompts for _ in range(3)],
                                      [i for i in images for _ in range(3)])
    for key, value in expected.model_inputs().items():
        assert torch.equal(batch.model_inputs()[key], value), key
    assert batch.images_per_row.tolist() == [2] * 9


def test_processed_images_can_be_reused(batcher, pairs):
    prompts, images = pairs
    processed = [batcher.process_images(pair) for pair in images]
    a = batcher.reasoner_batch(prompts, processed).model_inputs()
    b = batcher.reasoner_batch(prompts, images).model_inputs()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_final_hidden_states_give_the_model_logits(policy, batcher, pairs):
    prompts, images = pairs
    inputs = batcher.reasoner_batch(prompts, images).model_inputs()
    with torch.no_grad():
        hidden = final_hidden_states(policy, inputs)
        logits = policy(**inputs).logits
    assert hidden.shape == (*inputs["input_ids"].shape, policy.config.text_config.hidden_size)
    torch.testing.assert_close(hidden @ lm_head_weight(policy).T, logits, rtol=1e-5, atol=1e-5)


def test_scorer_aligns_targets_and_matches_unpadded_logprobs(policy, batcher, pairs):
    """The repeated (plain transformers) scoring path on the tiny VLM: left-padded prompts with images of
    different sizes, completions of different lengths; equal to each row alone with full logits."""
    prompts, images = pairs
    prompt_batch = batcher.reasoner_batch(prompts, images)
    tok = batcher.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    texts = ["<think>a red circle</think><answer>1</answer>", "<think>no</think>", "<answer>2</answer> extra"]
    ids, mask = encode_completions(tok, texts, end)
    n_valid = [len(tok.encode(t, add_special_tokens=False)) + 1 for t in texts]
    assert mask.sum(1).tolist() == n_valid and (ids[torch.arange(3), mask.sum(1) - 1] == end).all()
    assert tok.batch_decode([i[m] for i, m in zip(ids, mask)], skip_special_tokens=True) == texts

    batch = GroupBatch.grouped(prompt_batch, ids, mask, 1)
    logp = CompletionScorer(policy, fused=False)(batch)
    logp[mask].sum().backward()
    assert policy.model.visual.patch_embed.proj.weight.grad is not None  # gradients reach the vision tower
    policy.zero_grad(set_to_none=True)

    # Slow truth: each row alone, no padding, full logits, shift by hand.
    with torch.no_grad():
        for b in range(3):
            alone = batcher.reasoner_batch([prompts[b]], [images[b]])
            seq = torch.cat([alone.input_ids[0], ids[b, : n_valid[b]]])
            inputs = alone.model_inputs()
            inputs.update(input_ids=seq[None], attention_mask=torch.ones_like(seq)[None],
                          mm_token_type_ids=(seq == batcher.image_token_id).int()[None])
            logits = policy(**inputs).logits[0]
            p = alone.length
            expected = logits[p - 1: p - 1 + n_valid[b]].log_softmax(-1).gather(
                1, seq[p:, None]).squeeze(1)
            torch.testing.assert_close(logp[b, : n_valid[b]].detach(), expected, rtol=1e-4, atol=1e-5)


def test_load_from_a_local_folder(tmp_path, policy):
    """The path a real Qwen2.5-VL checkpoint takes: from_pretrained on a folder, offline."""
    folder = tmp_path / "ckpt"
    policy.save_pretrained(folder)
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (folder / name).write_bytes((lm.TINY_DIR / name).read_bytes())
    # Like Qwen2.5-VL processor folders: the chat template in its own file, not in tokenizer_config.json.
    tok_cfg = json.loads((lm.TINY_DIR / "tokenizer_config.json").read_text())
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": tok_cfg.pop("chat_template")}))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    loaded = lm.load_reference(folder)
    assert not loaded.training
    a, b = policy.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batcher = VLBatcher.from_pretrained(folder)
    tiny = VLBatcher.from_pretrained("tiny")
    img = [Image.new("RGB", (56, 56), (200, 0, 0))] * 2
    assert torch.equal(batcher.reasoner_batch(["a red circle"], [img]).input_ids,
                       tiny.reasoner_batch(["a red circle"], [img]).input_ids)
    (folder / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(folder)
