"""Fused GRPO kernels, imported as ``lgrpo.kernels`` (never as a top-level ``kernels``).

Until the Triton versions land, the public names point at the pure-PyTorch reference.
"""

if __name__ == "lgrpo.kernels":
    from ._api import GRPOLossOutput
    from .reference import group_advantages, grpo_loss, linear_grpo_loss, token_logprobs

    __all__ = ["GRPOLossOutput", "group_advantages", "grpo_loss", "linear_grpo_loss", "token_logprobs"]
# Else this folder was found as a top-level `kernels` because the repository root is on sys.path
# (e.g. `python -m ...` run from the checkout). transformers probes `kernels` for the Hugging Face
# kernel hub; staying an empty module without __version__ makes that probe answer "not installed"
# instead of importing (and registering custom ops) a second time under another name.
