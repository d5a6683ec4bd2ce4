# dmad_jax: `make demo` and `make test` work on a fresh machine; each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config names local indexes that lack most packages; hide that noise only.
QUIET  := 2>&1 | { grep -v '^WARNING: Location' || true; }

.PHONY: demo test lint bench accel-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install whenever pyproject.toml changes. --no-compile: pip would byte-compile
# every module of every wheel (TensorFlow and torch hold tens of thousands), which took half of a
# 2 min 39 s install here (1 min 16 s without); Python compiles what is imported, once, instead.
$(VENV)/.installed-runtime: pyproject.toml | $(PY)
	$(PIP) install --no-compile -e . $(QUIET)
	$(PY) -c "import dmad_jax, jax, flax, optax, orbax.checkpoint, grain"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install --no-compile -e '.[test,tfds,tensorboard]' $(QUIET)
	$(PY) -c "import dmad_jax, torch, pytest, xdist, hypothesis, chex, tensorflow_datasets, skimage, nbclient; import importlib.util as u; assert u.find_spec('torchvision')"
	touch $@ $(VENV)/.installed-runtime

# The main job on real data that ships with scikit-learn: train DMAD-PDM on odd digits, run the
# separate eval job, print image AUROC and where the figures are.
demo: $(VENV)/.installed-runtime
	rm -rf runs/demo
	$(VENV)/bin/dmad train --config configs/digits_pdm.py --workdir runs/demo
	$(VENV)/bin/dmad eval --config configs/digits_pdm.py --workdir runs/demo

# worksteal: a worker that runs out of tests takes queued ones from the other (with xdist's default
# `load`, one worker held the long tests' queue while the other idled for 19 minutes).
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n auto --dist worksteal --durations=15 $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider tests/layers_test.py

bench: $(VENV)/.installed-test
	$(PY) experiments/bench_ops.py
	$(PY) experiments/bench_train.py

# On a GPU or TPU host: the tests marked `gpu` and the training benchmark, one summary
# (experiments/results/accel_check_<platform>.json). Refuses on a CPU-only host.
accel-check: $(VENV)/.installed-test
	$(PY) experiments/accel_check.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
