# mmbench-merge. Two commands on a fresh clone:  `make demo`  and  `make test`  (each installs what is missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench leaderboard clean

install: $(STAMP)

# torch/torchvision are pinned here (constraints.txt), not in pyproject.toml, so cluster users keep their build.
# lmms-eval's latex2sympy2 pins antlr4 4.7.2 while Hydra needs 4.9.*: 4.9.3 is put back last (both work with it).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	$(PY) -m pip install -q antlr4-python3-runtime==4.9.3 2>&1 | grep -v "latex2sympy2 .* requires antlr4" || true
	$(PY) -c "import torch, hydra, transformers, lmms_eval; print('installed: torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

# The main job on its embedded default: the offline MiniBench (mini_qwen2vl, optmerge, suite=minibench).
demo: install
	$(PY) run.py

test: install
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests bench run.py

bench: install
	$(PY) bench/merge_memory.py

# Every results.jsonl under runs/ -> runs/leaderboard/{leaderboard.md, leaderboard.html, *.png}
leaderboard: install
	$(PY) -m mmbench_merge.leaderboard runs/

clean:
	rm -rf .cache runs .pytest_cache

# Rebuild the shipped MiniBench (tiny trained models + datasets) in prebuilt/minibench/: ~80 min on 2 cores.
.PHONY: minibench
minibench: install
	$(PY) -m mmbench_merge.minibench build --profile default --out prebuilt/minibench
