# make demo   -> set up .venv and run the main job (a layer-wise merge search) on the demo zoo
# make test   -> set up .venv and run the test suite
# GPU machines: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench bench-trial bench-eval bench-search gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA packages on a CPU machine
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(PY) -m optimizer study_name=demo n_trials=30

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/merge_kernels.py

bench-trial: setup
	$(PY) benchmarks/trial_cost.py --threads 1

bench-eval: setup
	$(PY) benchmarks/eval_cost.py && $(PY) benchmarks/pruning_cost.py

bench-search: setup
	$(PY) benchmarks/search_quality.py

gpu-check: setup
	bash benchmarks/gpu_check.sh
