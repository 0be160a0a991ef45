"""A toy stand-in for the model/data pipeline, for the trainer's own tests.

A character-level tokenizer, a tiny randomly initialised causal LM (Qwen2 architecture, built from
a config: no download), and a task whose prompts are ``"pick 1:"`` / ``"pick 2:"`` and whose reward
counts how often the completion holds the label digit. Rewards vary within a group from the first
step, so advantages are non-zero and the update path is exercised for real.
"""

from __future__ import annotations

import re
import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from lgrpo.group import PromptBatch
from lgrpo.rewards import Rewards

SPECIALS = ["<pad>", "<eos>"]
CHARS = list(string.ascii_lowercase + string.digits + " <>/:.")


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "left"
    return fast


def tiny_lm(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float()
    return model


ANSWER_RE = re.compile(r"^<think>[^<]*</think><answer>([12])</answer>$")


class ToyTask:
    """Prompts "pick L:" with label L in {1, 2}; the Task protocol of lgrpo.trainer."""

    def __init__(self, tokenizer, n_train: int = 32, n_eval: int = 8):
        self.tokenizer = tokenizer
        self.labels = {
            "train": [1 + i % 2 for i in range(n_train)],
            "eval": [1 + i % 2 for i in range(n_eval)],
        }

    def num_prompts(self, split: str) -> int:
        return len(self.labels[split])

    def prompts(self, split, indices, swap=None):
        labels = [self.labels[split][i] for i in indices]
        if swap is not None:
            labels = [3 - lab if s else lab for lab, s in zip(labels, swap)]
        enc = self.tokenizer([f"pick {lab}:" for lab in labels], return_tensors="pt", padding=True)
        return PromptBatch(enc["input_ids"], enc["attention_mask"], extra={"label": torch.tensor(labels)})

    def rewards(self, rollout):
        labels = rollout.completion_prompts("label").tolist()
        fmt, acc, digits, answers = [], [], [], []
        for text, lab in zip(rollout.texts, labels):
            m = ANSWER_RE.match(text)
            answer = int(m.group(1)) if m else 0
            fmt.append(float(m is not None))
            acc.append(float(answer == lab))
            answers.append(answer)
            digits.append(text.count(str(lab)) / max(len(text), 1))
        fmt, acc, digits = (torch.tensor(x) for x in (fmt, acc, digits))
        # "listener" stand-in: a dense signal in [0, 1] that varies within every group.
        return Rewards(total=fmt + 0.5 * acc + 0.5 * digits, format=fmt, accuracy=acc, listener=digits,
                       contradiction=torch.zeros_like(acc), answer=torch.tensor(answers))

    def sft_targets(self, prompts):
        return [f"<think>it is {lab}</think><answer>{lab}</answer>" for lab in prompts.extra["label"].tolist()]


def sharpened(model, scale: float):
    """``model`` with every weight multiplied by ``scale``: a larger init than the default run's makes
    the tiny model's outputs depend strongly on every input, so a mix-up of rows, positions or images
    cannot hide inside a test's tolerance."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


# The built-in tiny model of each family (lgrpo.models): the per-family tests run on each.
TINY_FAMILIES = ("tiny", "tiny-qwen2-vl", "tiny-qwen3-vl")


def ragged_vl_batch(model_name: str):
    """The model ``model_name`` (fp32) and three synthetic prompts, two images each of different sizes
    (4 to 16 visual tokens), left padded to different lengths: (model, tokenizer, PromptBatch)."""
    from lgrpo.batching import VLBatcher
    from lgrpo.model import load_model
    from lgrpo.rollout.hf import clean_generation_config
    from lgrpo.synthetic import SyntheticTask

    model = load_model(model_name, seed=0)
    batcher = VLBatcher.from_pretrained(model_name)
    clean_generation_config(model, batcher.tokenizer)
    task = SyntheticTask(seed=0)
    exs = [task.example("train", i) for i in range(3)]
    images = [list(e.images) for e in exs]
    images[1][0] = images[1][0].resize((84, 56))
    images[2][1] = images[2][1].resize((112, 112))
    pb = batcher.reasoner_batch([e.prompt for e in exs], images)
    assert len(set(pb.attention_mask.sum(-1).tolist())) == 3 and len(set(map(tuple, pb.image_grid_thw.tolist()))) > 1
    return model, batcher.tokenizer, pb
