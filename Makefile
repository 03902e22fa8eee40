# Two entry points that work on a fresh machine: `make demo` and `make test`.
# The CPU torch wheel is installed first so that no multi-GB CUDA build is pulled in;
# on a GPU machine, install your own torch build first and set TORCH= (empty) to keep it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The demo starts fresh each time (runs/hydra-tiny is its own directory).
demo: setup
	rm -rf runs/hydra-tiny
	$(BIN)/hydra-pretrain train --config configs/hydra-tiny.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q --durations=25

clean:
	rm -rf $(VENV) runs .pytest_cache
