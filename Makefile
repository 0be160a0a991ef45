# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install when the venv has none. On these machines torch==2.13.0 is a CPU
# wheel on local disk; a bare `torch` would pull a multi-GB CUDA build. Override on GPU hosts,
# e.g. `make test TORCH_SPEC='torch==2.11.0'`. Skipped entirely when torch already imports.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lgrpo-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)

.PHONY: install demo test lint bench-cpu clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# No build isolation: the extension must build against the torch installed above.
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

demo: install
	$(PY) -m lgrpo.train

test: install
	$(PY) -m pytest -q

bench-cpu: install
	for b in bench/bench_*.py; do $(PY) $$b --smoke || exit 1; done

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf build *.egg-info lgrpo/_C*.so $(STAMP)
