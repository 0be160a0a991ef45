"""Give the top-level name ``kernels`` back to the installed package that owns it.

Imported only when this folder was found as a top-level ``kernels`` (see ``__init__.py``).
Python's import system returns ``sys.modules[name]`` after a package's ``__init__`` has run, so
replacing that entry with the installed package, executed under the same name, makes
``import kernels`` and ``from kernels import X`` (and every ``kernels.<sub>`` import after it)
resolve to Hugging Face's package exactly as they would from any other folder.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _installed_spec(name: str, shadow_root: str):
    """The spec of ``name`` found on sys.path with the folder holding this checkout left out."""
    def is_shadow(entry: str) -> bool:
        return os.path.realpath(entry or os.curdir) == shadow_root

    return importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if not is_shadow(p)])


def hand_over(name: str, init_file: str) -> None:
    shadow_root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    spec = _installed_spec(name, shadow_root)
    if spec is None or spec.loader is None:
        return  # nothing installed under that name: stay the empty placeholder
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
