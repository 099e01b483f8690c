# Set-up and the main jobs; each target builds .venv on first use.
#   make demo    super-resolve the bundled photos (tiny random model unless MODEL=dir)
#   make serve   the web page and API on http://127.0.0.1:7860/ (tiny unless MODEL=dir)
#   make test    the test suite (installs the PyTorch references and the GPU compiler too)
# On a GPU machine add EXTRAS=cuda (installs jax[cuda12]); on a Cloud TPU VM, EXTRAS=tpu.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The GPU and TPU compilers for compiling without a GPU or TPU (tsdsr_jax/aot, the fit check):
# Python 3.12 and the jax release of the GPU machines, with its CUDA plugin and cuDNN, and libtpu
# (no GPU or TPU needed).
PYTHON_GPU ?= python3.12
JAX_GPU := 0.11.2
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

.venv-gpu/.aot: pyproject.toml
	PYENV_VERSION=$${PYENV_VERSION:-$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -n 1)} \
	  $(PYTHON_GPU) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q --upgrade pip
	.venv-gpu/bin/python -m pip install -q jax==$(JAX_GPU) jaxlib==$(JAX_GPU)
	.venv-gpu/bin/python -m pip install -q --no-deps jax-cuda13-plugin==$(JAX_GPU) \
	  jax-cuda13-pjrt==$(JAX_GPU) nvidia-cudnn-cu13==9.28.1.4
	.venv-gpu/bin/python -m pip install -q 'jax[tpu]==$(JAX_GPU)'
	.venv-gpu/bin/python -m pip install -q -e .
	touch $@

# The server's environment: Gradio wants Pillow < 13, the tests' references Pillow 13.
.venv-serve/.serve: pyproject.toml
	$(PYTHON) -m venv .venv-serve
	.venv-serve/bin/python -m pip install -q --upgrade pip
	.venv-serve/bin/python -m pip install -q -e '.[serve$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	touch $@

# The one GPU call's luggage (bench/README.md): wheels the GPU machine lacks, the PyTorch
# references; then, there: bench/gpu.sh OUT (carry gpu-bundle).
.PHONY: gpu-bundle
gpu-bundle: $(VENV)/.test .venv-gpu/.aot
	$(PY) bench/bundle.py

.PHONY: demo serve test
demo: $(VENV)/.runtime
	$(PY) infer.py --model $(MODEL) -i tests/data -o outputs/demo --compare

serve: .venv-serve/.serve
	.venv-serve/bin/tsdsr-serve --model $(MODEL)

# Two pytest workers, a test file each at a time: the GPU compiles and the subprocess tests
# overlap with the rest (JOBS=1 runs them one after another).
JOBS ?= 2

test: $(VENV)/.test .venv-gpu/.aot .venv-serve/.serve
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile
