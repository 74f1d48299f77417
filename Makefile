# Deploying PyTorch Models - the two commands a newcomer needs are `make lab` and `make test`.
# Both create .venv and install the pinned dependencies on first use; later runs reuse them
# (a stamp file records the install, and is redone only when pyproject.toml or
# constraints.txt change).

# Python 3.11 is what constraints.txt was resolved for; any 3.10-3.13 works with the ranges.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
LAB_ARGS ?=
# nbval's options: run in this venv's kernel, normalise volatile text, stop a hung cell.
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 300

# jupyter_core: use the standard platform dirs (and stop warning about the migration).
export JUPYTER_PLATFORM_DIRS := 1
# Our venv's kernel first on PATH for jupyter's `python` kernelspec.
export PATH := $(BIN):$(PATH)

.PHONY: help setup lab test unit notebooks lint serve refresh data bench lock clean

help:
	@echo "make lab      - set up (first time) and open JupyterLab on notebooks/  [LAB_ARGS=...]"
	@echo "make test     - set up (first time) and run everything: ruff, unit tests, strict nbval"
	@echo "make serve    - start the inference service (FastAPI, trained CNN) on 127.0.0.1:8000  [SERVE_ARGS=...]"
	@echo "make unit     - unit tests and doctests of course_utils only"
	@echo "make notebooks- strict nbval over notebooks/ only"
	@echo "make refresh  - re-execute every notebook in place (authors, before committing)"
	@echo "make data     - rebuild data/ from scratch (splits, samples, checkpoint, manifest)"
	@echo "make bench    - measure every deployment variant (several minutes) -> reports/"
	@echo "make lock     - re-resolve constraints.txt in a scratch venv"
	@echo "make clean    - remove .venv, caches and artifacts/"

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: no python3 found; install Python 3.10-3.13" >&2; exit 1; }
	@echo ">> creating $(VENV) with $(PYTHON) and installing pinned dependencies (first run: 2-3 min)"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	$(VENV)/bin/python -c "import torch, torchvision, onnxruntime, course_utils; print('>> installed torch', torch.__version__)"
	@touch $(STAMP)

setup: $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest --doctest-modules course_utils tests $(NBVAL) $(NOTEBOOKS)

SERVE_PORT ?= 8000
serve: $(STAMP)
	@echo ">> http://127.0.0.1:$(SERVE_PORT)  (docs: http://127.0.0.1:$(SERVE_PORT)/docs, stop: Ctrl-C)"
	@echo ">> try:  curl -F file=@data/samples/digit_7.png http://127.0.0.1:$(SERVE_PORT)/predict"
	$(BIN)/python -m course_utils.serving --port $(SERVE_PORT) $(SERVE_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest --doctest-modules course_utils tests

notebooks: $(STAMP)
	$(BIN)/python -m pytest $(NBVAL) $(NOTEBOOKS)

lint: $(STAMP)
	$(BIN)/ruff check .

refresh: $(STAMP)
	$(BIN)/python tools/refresh_notebooks.py $(NOTEBOOKS)

data: $(STAMP)
	$(BIN)/python -m course_utils.build_data

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/serving.py

lock:
	rm -rf /tmp/course-lock-venv && $(PYTHON) -m venv /tmp/course-lock-venv
	/tmp/course-lock-venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 ".[dev]"
	{ head -3 constraints.txt; /tmp/course-lock-venv/bin/python -m pip freeze --exclude course-utils | sort -f; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache artifacts notebooks/artifacts
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
