# The README's two commands: `make demo` and `make test` (each sets up first if needed).
# `make pretrain`: the shapes recipes' pretrained backbone (their MODEL.WEIGHTS), once.
VENV ?= .venv
PY := $(VENV)/bin/python
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets

.PHONY: setup demo test bench pretrain clean-output

setup:
	@VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_demo.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) tools/benchmark_ops.py

pretrain: setup
	$(PY) tools/pretrain_backbone.py --config-file configs/shapes/pretrain/R18_half.yaml

clean-output:
	rm -rf output
