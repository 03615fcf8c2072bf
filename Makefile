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
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF $(LLAMA_CPU_ARGS)
# On x86-64, a portable AVX2 build instead of -march=native: a native build on a CPU
# that lists AMX compiles AMX tile kernels, which die with SIGILL where the kernel
# or sandbox does not enable AMX state (seen on this project's machines).
ifeq ($(shell uname -m),x86_64)
LLAMA_CPU_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
# The built wheel is kept under a key of the release and the build flags, so a
# second setup installs it in seconds and a change of flags never reuses a stale
# build (pip's own wheel cache keys on the release alone).
LLAMA_WHEELS := $(HOME)/.cache/guardrail/llama-wheels/$(shell echo '$(LLAMA_CPP_PYTHON) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-16)
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test test-fast typecheck bench clean

setup: $(VENV)/.guardrail-installed

$(VENV)/.llama-installed:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "setuptools>=75" "scikit-build-core>=0.9.2" "cmake>=3.21" ninja numpy typing-extensions diskcache jinja2
	ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || sysctl -n hw.ncpu) \
		$(PIP) wheel --no-deps --no-cache-dir --no-build-isolation -w $(LLAMA_WHEELS) "$(LLAMA_CPP_PYTHON)"
	$(PIP) install --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	touch $@

$(VENV)/.guardrail-installed: $(VENV)/.llama-installed pyproject.toml native/capture.c
	# The distribution was called "guardrail" before it became guardrail-llm: drop the old record.
	$(PY) -m pip uninstall -y -q guardrail 2>/dev/null || true
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/guardrail demo

test: setup
	$(PY) -m pytest -q

# Every test that loads no model with weights and compiles nothing (the `model` marker): about 30 s.
# Bytecode caching on even where the environment turns it off: pytest then keeps the assert-rewritten
# modules of its plugins (hypothesis: hundreds) instead of redoing them at every start.
test-fast: setup
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -m "not model"

# mypy over guardrail/ (pyproject.toml [tool.mypy]: strict on the head, the server and the runtime's vocabulary).
typecheck: setup
	$(PY) -m mypy

bench: setup
	$(VENV)/bin/guardrail bench

clean:
	rm -rf $(VENV) build *.egg-info guardrail/runtime/_capture*.so
