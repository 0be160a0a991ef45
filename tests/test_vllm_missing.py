"""Without vLLM installed (the main venv), ``--rollout.engine vllm`` is refused at start-up, naming the extra.
(With vLLM, tests/test_vllm_rollout.py runs the engine itself.)"""

import importlib.util

import pytest

from lgrpo.config import ConfigError, parse_args


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_names_the_extra():
    expected = r"rollout.engine vllm needs vllm, which is not installed: pip install 'lgrpo\[vllm\]'"
    with pytest.raises(ConfigError, match=expected):
        parse_args(["--rollout.engine", "vllm"])


def test_vllm_memory_fraction_is_checked():
    with pytest.raises(ConfigError, match="rollout.vllm_gpu_memory_utilization"):
        parse_args(["--rollout.vllm_gpu_memory_utilization", "1.5"])


def test_the_vllm_rollout_refuses_qwen3_vl():
    """vLLM is handed each image's merged vision output, which lacks Qwen3-VL's DeepStack features: refused,
    naming the engine that serves it (before vLLM is even needed)."""
    from lgrpo.model import load_model, load_tokenizer
    from lgrpo.rollout.vllm import VLLMRollout

    with pytest.raises(ValueError, match="Qwen3-VL: .*DeepStack.*--rollout.engine engine"):
        VLLMRollout(load_model("tiny-qwen3-vl"), load_tokenizer("tiny-qwen3-vl"), max_new_tokens=4, stop=None)
