# Two commands from a fresh machine:
#   make quickstart   the whole pipeline (train -> sample array -> assemble) on the embedded default
#   make test         the test suite, SLURM integration tests included (needs root for the local cluster)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds this project is tested with; override for your GPU and driver (torch >= 2.10).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The index torch comes from; empty: pip's configuration. PyPI's default torch is a CUDA 12.8 build for 2.10 and
# CUDA 13.0 for 2.11-2.14 (each wheel's torch/version.py): kernels for sm >= 75 only, NVIDIA driver >= 580.65. A V100
# or P100 (sm < 75), or a driver older than 580.65, takes cu126, capped below 2.15 (README, "On a cluster", the route
# table; `make clean` first if .venv exists):
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cu126 TORCH_SPEC='torch>=2.10,<2.15 torchvision'
TORCH_INDEX ?=

.PHONY: venv quickstart quickstart-sweep test lint bench clean

venv: $(VENV)/.installed

# uv installs the 5.5 GB torch build in about 40 s (pip: 90 s), from the indexes pip is configured with
# (tools/pip_index_args.py); without uv (no network to fetch it) pip does the same, and where uv fails (a proxy or
# CA certificate that pip is configured for and uv is not) pip does it again, with one line saying so.
# --compile-bytecode (pip does it by default): without .pyc files every process compiles torch's sources again where
# PYTHONDONTWRITEBYTECODE is set or the venv is read-only (a shared venv, a container): `import torch, ddpm.train`
# took 9.1 s instead of 4.5 s here, for each job start, sampling task and test subprocess. It adds ~13 s once.
UV_INSTALL = $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) --index-strategy unsafe-best-match
PIP_INSTALL = $(PY) -m pip install -q
TORCH_ARGS = $(foreach spec,$(TORCH_SPEC),'$(spec)')

$(VENV)/.installed: pyproject.toml
	@req=$$(sed -n 's/^requires-python *= *">= *\([0-9][0-9.]*\)".*/\1/p' pyproject.toml); \
	[ -n "$$req" ] || { echo "make venv: no requires-python = \">=X.Y\" in pyproject.toml" >&2; exit 1; }; \
	have=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') || \
	{ echo "make venv: $(PYTHON) does not run; this project needs Python >= $$req: make venv PYTHON=python$$req" >&2; \
	  exit 1; }; \
	if ! awk -v h="$$have" -v r="$$req" 'BEGIN { split(h, a, "."); split(r, b, "."); \
	    exit !(a[1] > b[1] || (a[1] == b[1] && a[2] >= b[2])) }'; then \
	  major=$${req%%.*}; minor=$${req#*.}; minor=$${minor%%.*}; use=python$$req; i=$$((minor + 6)); \
	  while [ $$i -ge $$minor ]; do \
	    if command -v python$$major.$$i >/dev/null; then use=python$$major.$$i; break; fi; i=$$((i - 1)); done; \
	  echo "make venv: $(PYTHON) is Python $$have; this project needs >= $$req: make venv PYTHON=$$use" >&2; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv || echo "uv not available: installing with pip"
	install_with() { base="$$1"; all="$$2"; \
	  if [ -n "$(TORCH_INDEX)" ]; then torch="$$base --index-url $(TORCH_INDEX)"; else torch="$$all"; fi; \
	  $$torch $(TORCH_ARGS) && $$all -e '.[test]'; }; \
	if [ -x $(VENV)/bin/uv ]; then \
	  install_with "$(UV_INSTALL)" "$(UV_INSTALL) $$($(PYTHON) tools/pip_index_args.py)" || \
	  { echo "make venv: uv failed (a proxy or CA that pip is configured for and uv is not?): installing with pip"; \
	    install_with "$(PIP_INSTALL)" "$(PIP_INSTALL)"; }; \
	else install_with "$(PIP_INSTALL)" "$(PIP_INSTALL)"; fi
	touch $@

quickstart: venv
	$(PY) -m tools.digits --out data/digits --size 8
	$(PY) launch.py --config configs/quickstart_digits.yaml --cluster local

# A 2 x 2 sweep on the digits (learning rate x EMA decay, 600 steps each), scored by FID with test-written
# Inception weights (tools/fid_test_weights.py: no download; they rank the points, they are not published FIDs)
FID_TEST = data/fid_test
QUICK_SWEEP = sampling.fid=true sampling.fid_weights=$(FID_TEST)/pt_inception-2015-12-05-6726825d.pth \
	sampling.fid_reference=$(FID_TEST)/digits_ref.npz training.num_iterations=600 training.cooldown_steps=100 \
	training.save_every=600 training.sample_every=600 run.name=quickstart_sweep

quickstart-sweep: venv
	$(PY) -m tools.digits --out data/digits --size 8
	$(PY) -m tools.fid_test_weights --out $(FID_TEST)/pt_inception-2015-12-05-6726825d.pth
	$(PY) -m ddpm.fid ref --config configs/quickstart_digits.yaml --max-images 512 \
	  --weights $(FID_TEST)/pt_inception-2015-12-05-6726825d.pth --out $(FID_TEST)/digits_ref.npz
	$(PY) launch.py sweep --config configs/quickstart_digits.yaml --cluster local \
	  --grid 'training.learning_rate=[5e-4,2e-3]' --grid 'training.ema_decay=[0.99,0.999]' $(QUICK_SWEEP)

# The suite in two parts: the tests that need no cluster on TEST_WORKERS pytest-xdist workers (one torch thread
# each: threads x processes <= cores), then the SLURM tests one at a time (one local cluster; their jobs use both
# cores). Both parts always run; the slowest tests are listed, for keeping the suite short. (Both at once, the
# first at nice 15, was slower: 848 s for the first part and the SLURM tests slowed down, 2026-12-07.)
TEST_WORKERS ?= 2

test: venv
	$(PY) -m ruff check .
	@rc=0; set -x; \
	$(PY) -m pytest -q tests -m "not slurm" -n $(TEST_WORKERS) --durations=10 || rc=1; \
	$(PY) -m pytest -q tests -m slurm --durations=10 || rc=1; \
	{ set +x; } 2>/dev/null; exit $$rc

bench: venv
	$(PY) -m tools.bench

clean:
	rm -rf $(VENV) runs data/digits $(FID_TEST)
