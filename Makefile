# Two commands for a newcomer: `make demo` and `make test`.
# Both set up .venv first: llama-cpp-python is built from source ONCE, in this
# venv (no isolated build env, so pip's wheel cache makes the next build free),
# with the parts guardrail never uses switched off.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
# Off: multimodal (mtmd/llava), llama.cpp's tests, examples, tools, server.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test bench clean

setup: $(VENV)/.guardrail-installed

$(VENV)/.llama-installed:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "setuptools>=75" "scikit-build-core>=0.9.2" "cmake>=3.21" ninja numpy typing-extensions diskcache jinja2
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || sysctl -n hw.ncpu) \
		$(PIP) install --no-build-isolation "$(LLAMA_CPP_PYTHON)"
	touch $@

$(VENV)/.guardrail-installed: $(VENV)/.llama-installed pyproject.toml native/capture.c
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/guardrail demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/guardrail bench

clean:
	rm -rf $(VENV) build *.egg-info guardrail/_capture*.so
