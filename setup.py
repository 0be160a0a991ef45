"""Build script: the pure-Python packages, plus the native extension lgrpo._C once csrc/ exists.

The top-level ``kernels/`` folder is installed as ``lgrpo.kernels``. It must never become an
importable top-level ``kernels`` module: transformers treats one as the Hugging Face kernel hub.
"""

from setuptools import setup

setup(
    packages=["lgrpo", "lgrpo.kernels"],
    package_dir={"lgrpo": "lgrpo", "lgrpo.kernels": "kernels"},
    package_data={"lgrpo": ["assets/**/*"]},
)
