"""Regenerate lgrpo/assets/tiny-qwen2.5-vl/: the tiny model's tokenizer, chat template and configs.

    .venv/bin/python tools/build_tiny_assets.py            # rewrite the shipped folder
    .venv/bin/python tools/build_tiny_assets.py OUT_DIR    # write elsewhere (the tests compare)

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the synthetic task's text and
the prompt templates, with Qwen2.5-VL's special tokens and its pre-tokenizer (digits split one by one, so
``1`` and ``2`` after ``<answer>`` are single tokens, as in the real vocabulary). Training is
single-threaded on a fixed corpus, so the output is the same on every run.

The model config is written in the layout of a real Qwen2.5-VL ``config.json`` from the hub (flat text
fields plus ``vision_config``), which every transformers 5.x release reads. Weights are not shipped:
``lgrpo.model.load_model("tiny")`` initialises them from a seed.
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


def tokenizer_config(tok) -> dict:
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
        "chat_template": CHAT_TEMPLATE,
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


def preprocessor_config() -> dict:
    # Qwen2VLImageProcessor's settings; min/max pixels keep synthetic images tiny (56x56 -> 4 merged tokens,
    # at most 112x112 -> 16).
    return {
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


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(tok))
    write_json(out_dir / "config.json", model_config(tok))
    write_json(out_dir / "preprocessor_config.json", preprocessor_config())


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSET_DIR
    build(target)
    print(f"wrote {target}")
