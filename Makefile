# mmbench-merge. Two commands on a fresh clone:  `make demo`  and  `make test`  (each installs what is missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench leaderboard clean

install: $(STAMP)

# The install is exact: requirements.lock pins every package (made by `make lock` from pyproject's ranges under
# constraints.txt). torch/torchvision come first through pip (this machine keeps its wheels on disk, where uv does
# not look; on a cluster pip takes your index), then everything else through uv without resolving anything.
# INSTALLER=pip does the second step with pip instead (slower, no uv needed).
INSTALLER ?= uv
UV_VERSION := 0.13.9
TORCH_LINES := ^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==
$(STAMP): requirements.lock constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	grep -vE '$(TORCH_LINES)' requirements.lock > $(VENV)/lock-without-torch.txt
ifeq ($(INSTALLER),pip)
	$(PY) -m pip install -q --no-deps -r $(VENV)/lock-without-torch.txt
else
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -r $(VENV)/lock-without-torch.txt
endif
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch, hydra, transformers, lmms_eval; print('installed: torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

# Regenerate requirements.lock from pyproject.toml's ranges (needs uv and the package index) and list what changed.
.PHONY: lock
lock:
	@command -v uv >/dev/null || $(PYTHON) -m pip install -q uv==$(UV_VERSION)
	@cp requirements.lock .lock.old 2>/dev/null || touch .lock.old
	uv pip compile pyproject.toml --extra all -c constraints.txt --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header --quiet -o requirements.lock
	@diff <(grep -E '^[A-Za-z0-9]' .lock.old | sort) <(grep -E '^[A-Za-z0-9]' requirements.lock | sort) \
		| sed -n 's/^< /  was: /p; s/^> /  now: /p' ; rm -f .lock.old; echo "requirements.lock written"

# evaluator=vllm's own environment (.venv-vllm): vLLM pins a torch/transformers pair the project's
# constraints.txt excludes (no released vLLM resolves beside torch 2.14.1), so it gets a venv of its own, installed
# exactly from requirements-vllm.txt (`make lock-vllm` recompiles it from requirements-vllm.in). The project runs
# lmms-eval there as a child process (src/mmbench_merge/evaluation/vllm_eval.py). GPU machines only.
VLLM_VENV ?= .venv-vllm
.PHONY: install-vllm lock-vllm
install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q uv==$(UV_VERSION)
	$(VLLM_VENV)/bin/uv pip install -q --python $(VLLM_VENV)/bin/python -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -c "import vllm, lmms_eval; print('installed: vllm', vllm.__version__)"
	touch $@

lock-vllm:
	@command -v uv >/dev/null || $(PYTHON) -m pip install -q uv==$(UV_VERSION)
	uv pip compile requirements-vllm.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--quiet -o requirements-vllm.txt
	@grep -E '^(vllm|torch|transformers|lmms-eval)==' requirements-vllm.txt

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

# Empty the merge cache ($$MMBENCH_CACHE, else runs/merge_cache; entries in use by a running job are kept).
.PHONY: clean-cache
clean-cache:
	PYTHONPATH=src $(PYTHON) -m mmbench_merge.merge_cache clear

# Rebuild the shipped MiniBench (tiny trained models + datasets) in prebuilt/minibench/: ~80 min on 2 cores.
.PHONY: minibench
minibench: install
	$(PY) -m mmbench_merge.minibench build --profile default --out prebuilt/minibench
