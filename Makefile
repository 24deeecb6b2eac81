# raymoe developer targets. Every target sets itself up on a fresh machine (Python 3.11 only).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test test-slow serve install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch first: the CPU build of 2.13.0 lies on this machine's disk; a bare range would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

test-slow: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
