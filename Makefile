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

.PHONY: demo test lint bench lock clean venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	MULTITAG_HOME=$(DEMO_HOME) $(VENV)/bin/multitag demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

lock:
	$(PY) -m pip freeze --exclude-editable > requirements.txt.new && mv requirements.txt.new requirements.txt

clean:
	rm -rf $(VENV) $(DEMO_HOME) .pytest_cache .ruff_cache
