# Everything a fresh clone needs: `make quickstart` and `make test` create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test test-fast test-unit test-readme lint install

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed  ## the whole path on the embedded corpus (the Python standard library)
	$(VENV)/bin/dist-clm quickstart

# two workers, each taking a test module whole; the cluster tier is one unit, in order (tests/conftest.py)
test: $(VENV)/.installed  ## every tier, as CI runs it (SLURM and S3 tests need launchers/local_slurm and local_s3)
	$(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder --durations=25

test-readme: $(VENV)/.installed  ## the README test alone (part of make test): every README command as written
	$(PY) -m pytest tests/cluster/test_readme.py -s

test-fast: $(VENV)/.installed  ## the unit tier and the single-process integration tests (~5 min on 2 cores)
	$(PY) -m pytest tests/unit tests/integration -m "not slow" --durations=10

test-unit: $(VENV)/.installed  ## the unit tier alone (under a minute)
	$(PY) -m pytest tests/unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
