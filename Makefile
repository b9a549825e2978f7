# Everything a fresh clone needs: `make quickstart` and `make test` create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test test-fast lint install

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed  ## the whole path on the embedded corpus (the Python standard library)
	$(VENV)/bin/dist-clm quickstart

test: $(VENV)/.installed  ## the whole suite (~45 min on 2 cores; SLURM tests skip without a cluster)
	$(PY) -m pytest --durations=25

test-fast: $(VENV)/.installed  ## without the multi-process runs
	$(PY) -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
