# Two commands do everything on a fresh machine:
#   make train   create .venv if missing, install, train the default model on the stdlib corpus
#   make test    create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: train test test-large test-random bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements-dev.txt pyproject.toml
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# ends with the trained model's greedy continuation of a fixed prompt: what it learned
train: $(STAMP)
	$(BIN)/plait train --sample "def " $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# big models (medium, 528M parameters, on 8 ranks), long multi-process runs and every benchmark at its
# smallest: not part of `make test`
test-large: $(STAMP)
	$(BIN)/python -m pytest -m large $(PYTEST_ARGS)

# many randomized layouts against one process (make test runs 3 of a fixed seed); a fresh seed
# each time unless SEED=N; a failing draw prints the `plait compare` command that reproduces it
DRAWS ?= 40
SEED  ?= $(shell date +%s)
test-random: $(STAMP)
	PLAIT_RANDOM_DRAWS=$(DRAWS) PLAIT_RANDOM_SEED=$(SEED) $(BIN)/python -m pytest -s tests/test_random_layouts.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/single_rank.py
	$(BIN)/python benchmarks/sequence_parallel_memory.py
	$(BIN)/python benchmarks/sequence_parallel_memory.py --tp 4
	$(BIN)/python benchmarks/zero.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/checkpoint.py
	$(BIN)/python benchmarks/planner.py

# On a GPU machine (no network, its own preinstalled torch): install plait without dependencies
# and run every GPU check within ~8 minutes; results in $(GPU_CHECK_OUT)/results.{json,md}.
# DEVICE=cpu runs the same script here with tiny shapes (tests/test_gpu_check.py does).
DEVICE        ?= cuda
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:
ifeq ($(DEVICE),cpu)
	$(MAKE) $(STAMP)
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(BIN)/python benchmarks/gpu_check.py --device cpu
else
	$(PYTHON) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e . \
		|| echo "gpu-check: editable install failed; using PYTHONPATH=src"
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py --device $(DEVICE)
endif

clean:
	rm -rf $(VENV) runs .pytest_cache
