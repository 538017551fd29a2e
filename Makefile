# fleetwright: the two commands a person needs.
#   make demo   sets up this machine and runs the main job on the embedded example fleet
#   make test   sets up this machine and runs every test (unit + integration against real counterparts)
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.fleetwright-installed

.PHONY: setup demo test test-heavy unit bench clean

$(VENV_STAMP): pyproject.toml requirements.lock
	command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
	[ -x $(PY) ] || uv venv -q -p 3.11 .venv
	# --compile-bytecode: every flow-run process imports Prefect; from source (no .pyc, e.g. under
	# PYTHONDONTWRITEBYTECODE) that costs about 1.6 s of CPU more per process (bench/RESULTS.md, Sweep)
	uv pip install -q -p $(PY) --compile-bytecode -r requirements.lock
	uv pip install -q -p $(PY) --no-deps -e .
	touch $(VENV_STAMP)

setup: $(VENV_STAMP)

demo: setup
	.venv/bin/fleetwright demo $(DEMO_ARGS)

test: setup
	tests/run.sh $(PYTEST_ARGS)

test-heavy: setup
	FLEETWRIGHT_TEST_HEAVY=1 tests/run.sh -m heavy $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

bench: setup
	$(PY) bench/core.py

clean:
	rm -rf .venv .pytest_cache .hypothesis
