# Two commands for a fresh machine: `make demo` (install + run the pipeline on the built-in
# dataset: pretrain -> finetune -> distill -> ONNX/int8 export and report) and `make test` (install,
# ruff and mypy on hybridvision/, then the test suite). Both install with pip first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_DIR ?= runs/demo

.PHONY: install install-dev demo test lint bench

install:
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q -e ".[dev]"

demo: install
	$(PYTHON) pretrain/run.py train.output_dir=$(DEMO_DIR)/pretrain
	$(PYTHON) finetune/run.py train.output_dir=$(DEMO_DIR)/finetune model.init=$(DEMO_DIR)/pretrain/encoder
	$(PYTHON) distill/run.py train.output_dir=$(DEMO_DIR)/distill teacher=$(DEMO_DIR)/finetune/model export.int8=true

test: install-dev
	ruff check hybridvision
	$(PYTHON) -m mypy
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

lint: install-dev
	ruff check . && ruff format --check .

bench: install-dev
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) benchmarks/models.py
