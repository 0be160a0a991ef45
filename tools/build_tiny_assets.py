"""Regenerate lgrpo/assets/tiny-*/: one tiny model per family (tokenizer, chat template and configs).

    .venv/bin/python tools/build_tiny_assets.py                          # rewrite every shipped folder
    .venv/bin/python tools/build_tiny_assets.py OUT_DIR                  # the default family (qwen2_5_vl)
    .venv/bin/python tools/build_tiny_assets.py OUT_DIR --family qwen3_vl  # another family (the tests compare)

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the synthetic task's text and
the prompt templates, with Qwen2.5-VL's special tokens and its pre-tokenizer (digits split one by one, so
``1`` and ``2`` after ``<answer>`` are single tokens, as in the real vocabulary). Training is
single-threaded on a fixed corpus, so the output is the same on every run.

Every family's tiny model has the same tokenizer (the Qwen-VL special tokens are the same) and the same
small text model (2 layers, hidden 64); each has its family's chat template, vision tower, patch size and
``config.json`` layout as its real models publish it: Qwen2-VL and Qwen2.5-VL flat text fields plus
``vision_config``, Qwen3-VL ``text_config`` plus ``vision_config`` (16-px patches, DeepStack from both
vision blocks into both decoder layers, interleaved M-RoPE). Weights are not shipped:
``lgrpo.model.load_model("tiny")`` (or a tiny folder) initialises them from a seed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# One thread for BPE training, set before tokenizers starts its pool: reproducible run to run.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lgrpo.prompts import DEFAULT_FORMAT, reasoner_messages  # noqa: E402
from lgrpo.synthetic import COLOURS, SHAPES, SPLITS, SyntheticTask, reference_completion  # noqa: E402

ASSET_DIR = REPO / "lgrpo" / "assets" / "tiny-qwen2.5-vl"
FOLDERS = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl", "qwen3_vl": "tiny-qwen3-vl"}
VOCAB_SIZE = 640

# Qwen2.5-VL's special tokens, in its order.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer pattern (as in transformers' Qwen2Tokenizer): numbers split into single digits.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2-VL's chat layout (ChatML; each image item becomes <|vision_start|><|image_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# Qwen3-VL's layout: the system turn only when the messages hold one (no default instruction).
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}", "")
assert QWEN3_CHAT_TEMPLATE != CHAT_TEMPLATE


def corpus() -> list[str]:
    """Every text the tiny model reads or writes in the synthetic task, plus the chat scaffolding."""
    fmt = DEFAULT_FORMAT
    texts = [fmt.system, "You are a helpful assistant.", "system", "user", "assistant",
             *fmt.image_labels, "0 1 2 3 4 5 6 7 8 9"]
    texts += [fmt.question.format(prompt=f"a {c} {s}") for c in COLOURS for s in SHAPES]
    for m in reasoner_messages("a red circle", fmt):
        texts += [item["text"] for item in m["content"] if item["type"] == "text"]
    # Words a reasoner about image pairs tends to use beyond the templates, so free text stays short.
    texts += [
        "The first image matches the prompt better than the second one because the colour and the shape "
        "are right. The second image does not match: its colour is wrong and its shape is different.",
        "Both images show a shape on a light background. Neither image is perfect, but people prefer the one "
        "that shows what the prompt describes. I think image one is better; image two is worse.",
        "Looking at the details: composition, lighting, colours, style, quality, realism and how well each "
        "picture follows the text. Therefore the answer is the image that people would choose.",
    ]
    task = SyntheticTask(seed=0)
    for split in SPLITS:
        for i in range(len(task.configurations(split)) * 2):
            texts.append(reference_completion(task.example(split, i), fmt))
    return texts


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def tokenizer_config(tok, model_type: str = "qwen2_5_vl") -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 8192,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
        "chat_template": QWEN3_CHAT_TEMPLATE if model_type == "qwen3_vl" else CHAT_TEMPLATE,
    }


def model_config(tok) -> dict:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    hidden, heads = 64, 4
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        # mrope sections split head_dim / 2 = 8 rotary frequencies into (temporal, height, width).
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 2,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "hidden_act": "silu",
            "in_chans": 3,
            "in_channels": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "initializer_range": 0.02,
        },
    }


def token_ids(tok) -> dict:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return {
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def qwen2_vl_config(tok) -> dict:
    """Qwen2-VL: Qwen2.5-VL's text model; a vision tower without windows (``embed_dim`` wide, MLP
    ``mlp_ratio`` times that, ``hidden_size`` the LLM's width)."""
    cfg = model_config(tok)
    cfg.update(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl")
    cfg["vision_config"] = {
        "depth": 2,
        "embed_dim": 32,
        "mlp_ratio": 2,
        "num_heads": 2,
        "hidden_act": "quick_gelu",
        "in_chans": 3,
        "in_channels": 3,
        "hidden_size": cfg["hidden_size"],
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": 0.02,
    }
    return cfg


def qwen3_vl_config(tok) -> dict:
    """Qwen3-VL (dense): a Qwen3 text model (q/k norms, explicit head_dim, interleaved M-RoPE) under
    ``text_config``; a 16-px vision tower whose blocks 0 and 1 feed DeepStack into decoder layers 0 and 1."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    hidden = 64
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        **token_ids(tok),
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": tok.get_vocab_size(),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            # head_dim / 2 = 8 rotary frequencies, interleaved T H W T H W T T (the real [24, 20, 20] of 64).
            "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [4, 2, 2]},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "out_hidden_size": hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,  # an 8 x 8 grid, interpolated to each image's
            "deepstack_visual_indexes": [0, 1],
            "initializer_range": 0.02,
        },
    }


def preprocessor_config(model_type: str = "qwen2_5_vl") -> dict:
    # Qwen2VLImageProcessor's settings; min/max pixels keep synthetic images tiny (56x56 -> 4 merged tokens,
    # at most 112x112 -> 16).
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    if model_type == "qwen3_vl":
        # Qwen3-VL's layout and settings (16-px patches, mean/std 0.5, bounds under "size"): 64x64 -> 4
        # merged tokens, at most 128x128 -> 16.
        del cfg["min_pixels"], cfg["max_pixels"]
        cfg.update(image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=16,
                   size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128})
    return cfg


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


CONFIGS = {"qwen2_vl": qwen2_vl_config, "qwen2_5_vl": model_config, "qwen3_vl": qwen3_vl_config}


def build(out_dir: Path, model_type: str = "qwen2_5_vl", tok=None) -> None:
    """Write one family's tiny folder (``tok``: the trained tokenizer, to train it once for several)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tok or build_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(tok, model_type))
    write_json(out_dir / "config.json", CONFIGS[model_type](tok))
    write_json(out_dir / "preprocessor_config.json", preprocessor_config(model_type))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="tools/build_tiny_assets.py")
    p.add_argument("out", nargs="?", type=Path, help="write one family's folder here (default: every shipped one)")
    p.add_argument("--family", default="qwen2_5_vl", choices=sorted(CONFIGS), help="model_type (with OUT)")
    args = p.parse_args()
    if args.out is not None:
        build(args.out, args.family)
        print(f"wrote {args.out}")
    else:
        tokenizer = build_tokenizer()
        for model_type, folder in FOLDERS.items():
            build(ASSET_DIR.parent / folder, model_type, tokenizer)
            print(f"wrote {ASSET_DIR.parent / folder}")
