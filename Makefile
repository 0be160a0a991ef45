# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install when the venv has none. On these machines torch==2.13.0 is a CPU
# wheel on local disk; a bare `torch` would pull a multi-GB CUDA build. Override on GPU hosts,
# e.g. `make test TORCH_SPEC='torch==2.11.0'`. Skipped entirely when torch already imports.
TORCH_SPEC ?= torch==2.13.0
# Optional extras, comma-separated: `make test EXTRAS=trl,verl` also installs TRL 1.16.0 and verl 0.9.1
# (verl without its dependencies: see pyproject.toml), so their integration tests run instead of skipping.
EXTRAS ?=
VERL_SPEC ?= verl==0.9.1
comma := ,
# verl's wheel also installs its own test suite as a top-level `tests` package, which shadows this
# repository's tests/ (imported as `tests.*`): removed when verl's file list says it is verl's.
DROP_VERL_TESTS := import importlib.metadata as md, shutil; d = md.distribution("verl"); \
	t = d.locate_file("tests"); mine = any(str(f) == "tests/__init__.py" for f in d.files or []); \
	shutil.rmtree(t) if mine and t.exists() else None
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lgrpo-installed$(if $(EXTRAS),-$(subst $(comma),-,$(EXTRAS)))
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)

.PHONY: install demo experiment test lint bench-cpu clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# No build isolation: the extension must build against the torch installed above.
	$(PY) -m pip install -q --no-build-isolation -e ".[dev$(if $(EXTRAS),$(comma)$(EXTRAS))]"
	$(if $(findstring verl,$(EXTRAS)),$(PY) -m pip install -q --no-deps "$(VERL_SPEC)")
	$(if $(findstring verl,$(EXTRAS)),$(PY) -c '$(DROP_VERL_TESTS)')
	touch $@

demo: install
	$(PY) -m lgrpo.train

# The listener experiment (README, "Does the listener help?"): 3 arms x 3 seeds, one process per seed,
# <= 30 min on 2 CPU cores.
experiment: install
	$(PY) -m lgrpo.experiments.listener --out runs/experiment-listener --jobs 3

test: install
	$(PY) -m pytest -q

bench-cpu: install
	for b in bench/bench_*.py; do $(PY) $$b --smoke || exit 1; done

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf build *.egg-info lgrpo/_C*.so $(VENV)/.lgrpo-installed*
