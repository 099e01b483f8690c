# Set-up and the main jobs; each target builds .venv on first use.
#   make demo    super-resolve the bundled photos (tiny random model unless MODEL=dir)
#   make test    the test suite (installs the PyTorch references too)
# On a GPU machine add EXTRAS=cuda (installs jax[cuda12]).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?=
MODEL ?= tiny

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	# torch and torchvision for the reference tests (lpips needs torchvision), pinned together.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	# basicsr's degradations, the reference of tsdsr_jax/data (its own requirements pull a
	# second OpenCV and tb-nightly; the functions we compare need neither).
	$(PY) -m pip install -q --no-deps basicsr-fixed==1.4.2
	touch $@

comma := ,

.PHONY: demo test
demo: $(VENV)/.runtime
	$(PY) infer.py --model $(MODEL) -i tests/data -o outputs/demo --compare

test: $(VENV)/.test
	$(PY) -m pytest -q
