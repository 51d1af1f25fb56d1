# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all clean gpu-check tpu-check

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,experiments]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.main

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --runslow tests

# On a GPU / TPU machine: the kernel tests that skip on CPU, then the kernel benchmarks (within 8 minutes on
# one H100/H200); writes experiments/results/gpu_check_<device>.*. On CPU it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python -m experiments.gpu_check --require gpu

tpu-check: $(STAMP)
	$(BIN)/python -m experiments.gpu_check --require tpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
