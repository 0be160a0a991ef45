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
