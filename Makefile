# Two entry points that work on a fresh machine: `make demo` and `make test`.
# The CPU torch wheel is installed first so that no multi-GB CUDA build is pulled in;
# on a GPU machine, install your own torch build first and set TORCH= (empty) to keep it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean text-data ui

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

# The MLflow UI on a run's store (default: the demo's), at http://127.0.0.1:$(UI_PORT); setup
# installs the full mlflow package it needs (the dev extra). Ctrl-C stops it.
RUN ?= runs/hydra-tiny
UI_PORT ?= 5000
ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(RUN)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# Real text for configs/hydra-29m-text.yaml (docs/data.md, "From text files to a training run"):
# the standard library's .py sources (no tests, no site-packages) and the plain-text copyright,
# README* and *.txt files under /usr/share/doc (where present), binary files and byte-identical
# copies left out, prepared with a BPE trained on them and 2% of the files held out as `val`.
# One prepare over all the files: xargs -x fails rather than split the list into several runs.
TEXT_DATA ?= data/stdlib-text
TEXT_VOCAB ?= 8192
TEXT_SEQ_LEN ?= 512
text-data: setup
	mkdir -p $(TEXT_DATA).tmp
	STDLIB=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])"); \
	{ find "$$STDLIB" \( -name site-packages -o -name dist-packages -o -name test -o -name tests \
	    -o -name idle_test -o -name __pycache__ \) -prune -o -type f -name '*.py' -print0; \
	  if [ -d /usr/share/doc ]; then find /usr/share/doc -type f \( -name copyright \
	    -o -name 'README*' -o -name '*.txt' \) ! -name '*.gz' -print0; fi; } \
	| LC_ALL=C xargs -0 grep -IlZ . | xargs -0 sha256sum | LC_ALL=C sort -s -u -k1,1 \
	| cut -c67- | LC_ALL=C sort > $(TEXT_DATA).tmp/files.txt
	tr '\n' '\0' < $(TEXT_DATA).tmp/files.txt | xargs -0 -x -n 1000000 -s 2000000 \
	  $(BIN)/hydra-pretrain prepare -o $(TEXT_DATA) --overwrite --format text --text-unit file \
	  --train-bpe $(TEXT_VOCAB) --seq-len $(TEXT_SEQ_LEN) --samples-per-shard 64 \
	  --val-fraction 0.02 --seed 0 --workers 2
	mv $(TEXT_DATA).tmp/files.txt $(TEXT_DATA)/files.txt && rmdir $(TEXT_DATA).tmp

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q --durations=25

# The fault drills of docs/reliability.md: real signals at random moments, 5 trials of each drill
# (6-7 min on a busy 2-core VM; the disk-full drill needs the right to mount a tmpfs, else skipped).
# Writes docs/results/drills.json and .md. More: make drills DRILLS_ARGS="--trials 10 --seed 1".
.PHONY: drills
drills: setup
	$(BIN)/python benchmarks/drills.py $(DRILLS_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
