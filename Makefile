# Set-up and the main jobs. `make test` on a fresh machine builds .venv and runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch for the reference tests (install it first so nothing pulls a CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: setup test
setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q
