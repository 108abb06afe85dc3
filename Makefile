# On a fresh machine: `make demo` (set-up, then the demo) and `make test` (set-up, then the tests).
# torch==2.13.0 is installed first, on its own: on this project's machines that exact version is a local CPU build,
# while any looser spec would pull gigabytes of CUDA packages. pyproject keeps torch>=2.5 so GPU users bring their own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast demo lint clean

$(BIN)/cryoflex: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/cryoflex

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/cryoflex demo --out cryoflex_demo --overwrite

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
