# Every target sets up its own virtualenv, so a fresh clone needs only python3.11 and make.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline-friendly, quiet Prefect and torch on a small shared CPU (see README "Environment").
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export OMP_WAIT_POLICY := PASSIVE
export PYTHONDONTWRITEBYTECODE := 1

DEMO_HOME ?= $(CURDIR)/.demo

.PHONY: demo test lint bench soak lock clean venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	MULTITAG_HOME=$(DEMO_HOME) $(VENV)/bin/multitag demo

# The static checks first (seconds), then the suite.
test: lint
	$(PY) -m pytest

# ruff (style), mypy (types of multitag/, tasks/, flows/; settings in pyproject.toml) and
# import-linter (imports point down: flows -> tasks -> multitag, no Prefect in multitag, no
# circles; the contracts are in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Reliability soak (issue 15): >= 5,000 images from a moto S3 server through the fault proxy,
# a kill -9, two runs at once, a final rerun; then odd local files. Not part of `make test`.
# SOAK_ARGS=--quick (300 images) checks the harness in a few minutes.
soak: $(STAMP)
	$(PY) -m benchmarks.soak --images 5000 --append-results $(SOAK_ARGS)

lock:
	$(PY) -m pip freeze --exclude-editable > requirements.txt.new && mv requirements.txt.new requirements.txt

clean:
	rm -rf $(VENV) $(DEMO_HOME) .pytest_cache .ruff_cache
