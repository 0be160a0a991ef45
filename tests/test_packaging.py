"""What a user gets from pip: the sdist and the wheel hold the whole package, and the installed wheel
runs from a folder outside the checkout. Also: the repository root never shadows an installed package.

The wheel is built the way a user builds one from the sdist (so a file missing from the sdist fails
here), installed without its dependencies into a fresh venv whose only other packages are this
test's own venv's (a .pth line; no editable finder, no checkout on the path), and driven from a
temporary folder.
"""

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every command-line entry point the README lists.
CLIS = ["lgrpo.train", "lgrpo.eval", "lgrpo.judge", "lgrpo.data", "lgrpo.experiments.listener"]


def _run(cmd, cwd, env=None, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _listed(*paths: str) -> list[str]:
    """The files git tracks (or would: untracked, not ignored) under ``paths``."""
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *paths], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split()


def _tree_files() -> set[str]:
    """The files the wheel must hold, as paths inside it, read from the checkout (git's view)."""
    files = set()
    for f in _listed("lgrpo", "kernels"):
        if f.startswith("kernels/"):
            files.add("lgrpo/" + f)  # installed under its import name
        elif f.endswith(".py") or f.startswith("lgrpo/assets/"):
            files.add(f)
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel built from the unpacked sdist)."""
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("needs the git checkout (the tree's file list)")
    tmp = tmp_path_factory.mktemp("dist")
    backend = ("import sys; from setuptools import build_meta as b; "
               "print(getattr(b, sys.argv[1])(sys.argv[2]))")
    # PEP 517's hooks, called in this venv: the extension builds against the installed torch.
    sdist = tmp / _run([sys.executable, "-c", backend, "build_sdist", str(tmp)], ROOT).stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "src", filter="data")
    src = next((tmp / "src").iterdir())
    wheel_dir = tmp / "wheel"
    wheel_dir.mkdir()
    wheel = wheel_dir / _run([sys.executable, "-c", backend, "build_wheel", str(wheel_dir)], src).stdout.split()[-1]
    return sdist, wheel


@pytest.mark.slow
def test_sdist_holds_the_native_sources(built):
    sdist, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    native = _listed("csrc")
    assert native and any(f.endswith(".h") for f in native) and any("/cuda/" in f for f in native)
    assert set(native) <= names, f"missing from the sdist: {sorted(set(native) - names)}"
    assert {"setup.py", "pyproject.toml", "requirements/lock.txt"} <= names


@pytest.mark.slow
def test_wheel_holds_the_whole_tree(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as zf:
        names = {n for n in zf.namelist() if not n.startswith("lgrpo-") and not n.endswith("/")}
    native = {n for n in names if n.startswith("lgrpo/_C") and n.endswith(".so")}
    assert native, "the wheel has no lgrpo._C extension"
    assert names - native == _tree_files()


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """(python of a fresh venv with the wheel installed, a working folder outside the checkout)."""
    _, wheel = built
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _run([sys._base_executable, "-m", "venv", str(venv)], tmp)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip())
    # The dependencies: this venv's packages, as a plain path entry (its .pth files, among them the
    # editable install's finder, are not processed from there).
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp)
    work = tmp / "work"
    work.mkdir()
    return py, work


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(installed, tmp_path):
    py, work = installed
    env = _clean_env()
    where = _run([str(py), "-c", "import lgrpo, lgrpo.kernels; print(lgrpo.__file__); print(lgrpo.kernels.__file__)"],
                 work, env).stdout.split()
    assert all(str(py.parents[1]) in w for w in where), where
    for cli in CLIS:
        out = _run([str(py), "-m", cli, "--help"], work, env)
        assert "usage" in out.stdout.lower(), (cli, out.stdout[:500])
    # Every module imports; one whose optional extra is absent says which extra to install.
    probe = (
        "import importlib, pkgutil, lgrpo, torch\n"
        "from lgrpo.extras import MissingExtra\n"
        "names = [m.name for m in pkgutil.walk_packages(lgrpo.__path__, 'lgrpo.') if not m.name.endswith('__main__')]\n"
        "skipped = []\n"
        "for n in names:\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except MissingExtra as err:\n"
        "        assert 'pip install' in str(err), err\n"
        "        skipped.append(n)\n"
        "assert hasattr(torch.ops.lgrpo, 'listener_confidence'), 'lgrpo._C did not load'\n"
        "print(len(names), 'modules;', 'extra missing:', skipped)\n"
    )
    out = _run([str(py), "-c", probe], work, env)
    assert int(out.stdout.split()[0]) > 50, out.stdout
    # Two GRPO steps of the tiny default, from the installed package's own assets.
    run_dir = tmp_path / "runs"
    out = _run([str(py), "-m", "lgrpo.train", "--sft.steps", "0", "--train.steps", "2",
                "--train.prompts_per_step", "2", "--rollout.group_size", "4", "--data.synthetic_eval_size", "4",
                "--run.dir", str(run_dir), "--run.progress", "false"], work, env)
    (folder,) = run_dir.iterdir()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2], out.stdout[-2000:]
    assert (folder / "final" / "model.safetensors").exists()


def _import_kernels_from_root(env):
    probe = ("import kernels, lgrpo.kernels, transformers; print(kernels.__file__); "
             "print(getattr(kernels, '__version__', None)); print(lgrpo.kernels.__file__)")
    return _run([sys.executable, "-c", probe], ROOT, env).stdout.split()


def test_repository_root_does_not_shadow_hf_kernels():
    """From the root (``python -c``/``-m`` put it first on sys.path; torchrun ranks get it through
    PYTHONPATH), ``import kernels`` is Hugging Face's package when installed, and lgrpo.kernels ours."""
    import importlib.metadata as md

    env = _clean_env()
    for extra in ({}, {"PYTHONPATH": str(ROOT)}):
        hf, version, ours = _import_kernels_from_root({**env, **extra})
        assert Path(ours) == ROOT / "kernels" / "__init__.py"
        try:
            dist = md.distribution("kernels")
        except md.PackageNotFoundError:
            # Nothing to hand over to: an empty placeholder that transformers reads as "not installed".
            assert Path(hf) == ROOT / "kernels" / "__init__.py" and version == "None"
        else:
            assert Path(hf) == Path(dist.locate_file("kernels/__init__.py")), hf
            assert version == dist.version
