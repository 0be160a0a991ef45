"""Fused GRPO kernels, imported as ``lgrpo.kernels`` (never as a top-level ``kernels``).

``token_logprobs``, ``grpo_loss``, ``linear_grpo_loss`` and ``group_advantages`` run Triton kernels
on CUDA tensors (or under ``TRITON_INTERPRET=1``) and fall back to the pure-PyTorch ``reference``
elsewhere.
``linear_grpo_loss`` does the same from hidden states and the lm_head weight, chunk by chunk,
never holding the full logits.
``loss_options`` maps a loss type and its normaliser to those functions' options.
"""

if __name__ == "lgrpo.kernels":
    from ._api import GRPOLossOutput
    from .advantages import group_advantages
    from .grpo import grpo_loss
    from .linear_grpo import linear_grpo_loss
    from .logprobs import token_logprobs
    from .loss_options import PER_SEQUENCE, loss_options

    __all__ = [
        "PER_SEQUENCE", "GRPOLossOutput", "group_advantages", "grpo_loss", "linear_grpo_loss", "loss_options",
        "token_logprobs",
    ]
else:
    # This folder was found as a top-level `kernels` because the repository root is on sys.path
    # (`python -m ...` or pytest started from the checkout, torchrun ranks with PYTHONPATH=<root>).
    # That name belongs to Hugging Face's `kernels` package, which transformers (>= 5.25) imports at
    # import time. Hand the name over to the installed distribution when there is one; without one,
    # stay an empty module without __version__, which transformers' probe reads as "not installed".
    from ._shadow import hand_over

    hand_over(__name__, __file__)
