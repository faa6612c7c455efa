# `make test` creates .venv if absent, installs genfast with its dev extras into it, and runs the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.genfast-installed

.PHONY: test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadgroup -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
