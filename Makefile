# Two commands do everything on a fresh machine (see README):
#   make repro   - create .venv, install the pinned dependencies, run `dvc repro`
#   make test    - the same set-up if needed, then the whole test suite (slow tests included)
#   make reference - the reference configuration (reference/params.yaml; about 75 minutes on a 2-core AMD EPYC Zen 4)
#   make fashion   - the Fashion-MNIST configuration (fashion_mnist/params.yaml; needs the dataset)
PYTHON ?= python3
VENV   := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro reference fashion test bench clean-venv

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -r requirements.lock
	$(VENV)/bin/python -m pip install --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

repro: setup
	dvc repro

reference: setup
	cd reference && dvc repro

fashion: setup
	cd fashion_mnist && dvc repro

test: setup
	python -m pytest tests

bench: setup
	python -m pytest benchmarks --benchmark-enable --benchmark-autosave --benchmark-storage=results/benchmarks

clean-venv:
	rm -rf $(VENV)
