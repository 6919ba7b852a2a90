# Two commands from a fresh machine:
#   make quickstart   the whole pipeline (train -> sample array -> assemble) on the embedded default
#   make test         the test suite, SLURM integration tests included (needs root for the local cluster)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds this project is tested with; override for your CUDA (torch >= 2.10).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The index torch comes from; empty: pip's configuration (PyPI: CUDA 13 builds, NVIDIA driver >= 580). For an
# older driver, e.g. (README, "On a cluster"; `make clean` first if .venv exists):
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cu126 TORCH_SPEC='torch>=2.10 torchvision'
TORCH_INDEX ?=

.PHONY: venv quickstart test lint bench clean

venv: $(VENV)/.installed

# uv installs the 5.5 GB torch build in about 40 s (pip: 90 s), from the indexes pip is configured with
# (tools/pip_index_args.py); without uv (no network to fetch it) pip does the same.
UV_INSTALL = $(VENV)/bin/uv pip install -q --python $(PY) --index-strategy unsafe-best-match

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv || echo "uv not available: installing with pip"
	if [ -x $(VENV)/bin/uv ]; then base="$(UV_INSTALL)"; install="$$base $$($(PYTHON) tools/pip_index_args.py)"; \
	else base="$(PY) -m pip install -q"; install="$$base"; fi; \
	if [ -n "$(TORCH_INDEX)" ]; then torch_install="$$base --index-url $(TORCH_INDEX)"; \
	else torch_install="$$install"; fi; \
	$$torch_install $(foreach spec,$(TORCH_SPEC),'$(spec)') && $$install -e '.[test]'
	touch $@

quickstart: venv
	$(PY) -m tools.digits --out data/digits --size 8
	$(PY) launch.py --config configs/quickstart_digits.yaml --cluster local

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests --durations=20   # the slowest tests, for keeping the suite short

bench: venv
	$(PY) -m tools.bench

clean:
	rm -rf $(VENV) runs data/digits
