# The README's two commands: `make demo` and `make test` (each sets up first if needed).
VENV ?= .venv
PY := $(VENV)/bin/python
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets

.PHONY: setup demo test bench clean-output

setup:
	@VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_demo.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) tools/benchmark_ops.py

clean-output:
	rm -rf output
